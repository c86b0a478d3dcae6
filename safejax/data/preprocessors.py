"""seqio preprocessors for the safety data kinds: small, stateless and deterministic.

A Task chains them over records {"id", "text", "json"} from a source (data/sources.py):

    mark_kind -> [join_scores -> keep_scores] -> text_to_targets -> tokenize -> [tag]
      -> drop_raw_text -> CacheDatasetPlaceholder -> split_into_chunks

Everything before the placeholder works per document (and is what the Beam job caches and what
`safejax data stats` measures); chunking to the sequence length comes after.
"""

from __future__ import annotations

import gin
import tensorflow as tf

from safejax import errors
from safejax.data import scores as scores_lib
from safejax.data.quarantine import QUARANTINE

DOCUMENTS_INTERLEAVED = 64
MISSING_SCORE_POLICIES = ("error", "skip")


def mark_kind(kind: str):
    """Adds a `kind` feature naming the data kind; mixtures pass it through for share counts."""

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.map(lambda ex: {**ex, "kind": tf.constant(kind)})

    return preprocess


def text_to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The text becomes the `targets` feature (what seqio tokenizes); the rest is kept."""
    return dataset.map(lambda ex: {**ex, "targets": ex["text"]})


def drop_raw_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Drops the raw text and record before the cache point: only tokens and labels are cached."""
    return dataset.map(lambda ex: {k: v for k, v in ex.items() if k not in ("text", "json")})


def check_missing_policy(on_missing: str) -> None:
    if on_missing not in MISSING_SCORE_POLICIES:
        raise errors.UserError(f"on_missing_score must be one of {MISSING_SCORE_POLICIES}, got {on_missing!r}")


def join_scores(score_files: tuple[str, ...], task: str, on_missing: str = "error"):
    """Adds each document's `score` from the score shards (data/scores.py), by id.

    A document no shard scores is, by `on_missing`, an error naming it ("error") or set aside in
    the quarantine and counted ("skip").
    """
    check_missing_policy(on_missing)

    def note_unscored(doc_id: bytes) -> bool:
        doc = doc_id.decode(errors="replace")
        QUARANTINE.add("no_score", (task, doc), task=task, id=doc)
        return False

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        table = scores_lib.score_table(tuple(score_files))

        def join(ex):
            score = table.lookup(ex["id"])
            if on_missing == "error":
                check = tf.debugging.Assert(score >= 0, [
                    "document has no score in the score shards (set on_missing_score='skip' to "
                    "skip such documents); id:", ex["id"]])
                with tf.control_dependencies([check]):
                    score = tf.identity(score)
            return {**ex, "score": score}

        def scored(ex):
            return tf.cond(ex["score"] >= 0, lambda: True,
                           lambda: tf.numpy_function(note_unscored, [ex["id"]], tf.bool, stateful=True))

        return dataset.map(join, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).filter(scored)

    return preprocess


def keep_scores(low: int, high: int):
    """Keeps documents whose score lies in [low, high] (inclusive)."""
    if not 0 <= low <= high < scores_lib.NUM_SCORES:
        raise errors.UserError(f"score range must satisfy 0 <= low <= high <= 5, got [{low}, {high}]")

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.filter(lambda ex: (ex["score"] >= low) & (ex["score"] <= high))

    return preprocess


def split_into_chunks(dataset: tf.data.Dataset, sequence_length, output_features) -> tf.data.Dataset:
    """Appends EOS to each tokenized document and splits it into pieces of the target length.

    Long documents are used whole, not truncated. Each chunk keeps the document's `kind`.
    """
    size = sequence_length["targets"]
    eos = output_features["targets"].vocabulary.eos_id

    def chunks(example):
        tokens = tf.concat([example["targets"], [eos]], axis=0)
        total = tf.size(tokens, out_type=tf.int64)
        count = (total + size - 1) // size
        lengths = tf.concat([tf.fill([count - 1], tf.cast(size, tf.int64)), [total - size * (count - 1)]], 0)
        pieces = {"targets": tf.RaggedTensor.from_row_lengths(tokens, lengths)}
        if "kind" in example:
            pieces["kind"] = tf.fill([count], example["kind"])
        return tf.data.Dataset.from_tensor_slices(pieces)

    # Round-robin over many documents, so consecutive chunks rarely come from one document even
    # before the shuffle buffer (a long thread would otherwise fill whole batches by itself).
    return dataset.interleave(chunks, cycle_length=DOCUMENTS_INTERLEAVED, block_length=1)


@gin.configurable
def dialogue_role_names(pairs=(("User", "Assistant"), ("Student", "Teacher"), ("Human", "AI"),
                               ("Visitor", "Guide"), ("Customer", "Agent"), ("Learner", "Tutor"))):
    """The (user, assistant) name pairs RefuseWeb dialogues are written with, picked per
    dialogue by id hash unless the record names its own (`roles`)."""
    if not pairs or any(len(p) != 2 or not all(isinstance(n, str) and n for n in p) for p in pairs):
        raise errors.UserError("dialogue_role_names.pairs must be non-empty (user, assistant) name pairs")
    return tuple(tuple(p) for p in pairs)
