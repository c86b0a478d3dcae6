"""`safejax data list | stats | --show`: what the registered tasks and mixtures hold.

Statistics are taken per document, before chunking (the Task's steps up to its cache point):
documents, tokens (EOS included, as trained), tagged documents (those the tag step applied to:
scored within the tag range) and the tag rate, i.e. tags per taggable word (every word after
the first) in the tagged documents, which PAPER.md sets to p.
"""

from __future__ import annotations

import collections

import seqio
import tensorflow as tf

from safejax import errors, native_logs
from safejax import vocab as vocab_lib
from safejax.data import tasks
from safejax.data.quarantine import QUARANTINE
from safejax.safety import tagging

COUNTS = ("documents", "tokens", "tagged_documents", "tags", "tagged_words")


def list_data() -> dict:
    return {"tasks": sorted(seqio.TaskRegistry.names()),
            "mixtures": sorted(seqio.MixtureRegistry.names()),
            "unavailable": tasks.unavailable()}


def _lookup(name: str):
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        reason = tasks.unavailable().get(name, "not registered (see `safejax data list`)")
        raise errors.UserError(f"data {name!r}: {reason}") from None


def documents(task: seqio.Task, split: str, seed: int, limit: int | None) -> tf.data.Dataset:
    """The task's tokenized documents in source order (its steps before the cache point)."""
    ds = task.source.get_dataset(split=split, shuffle=False, seed=seed)
    if limit:
        ds = ds.take(limit)
    return task.preprocess_precache(ds, seed=seed)


def task_stats(task: seqio.Task, split: str = "train", seed: int = 42, limit: int | None = None) -> dict:
    vocabulary = task.output_features["targets"].vocabulary
    tag_id = vocab_lib.harm_tag_id(vocabulary)
    classes = {k: tf.constant(v) for k, v in tagging.piece_classes(vocabulary).items()}

    def measure(example):
        tokens = example["targets"]
        is_tag = tf.equal(tokens, tag_id)
        words = tagging.word_starts(tf.boolean_mask(tokens, ~is_tag), classes)
        return {"tokens": tf.size(tokens) + 1,
                "tags": tf.reduce_sum(tf.cast(is_tag, tf.int64)),
                "words": tf.reduce_sum(tf.cast(words, tf.int64)),
                "score": example.get("score", tf.constant(-1, tf.int32)),
                "tagged": example.get("tagged", tf.constant(0, tf.int32))}

    totals = collections.Counter()
    scores = collections.Counter()
    measured = documents(task, split, seed, limit).map(measure, num_parallel_calls=tf.data.AUTOTUNE)
    for m in native_logs.first_quietly(measured.as_numpy_iterator()):
        totals["documents"] += 1
        totals["tokens"] += int(m["tokens"])
        if m["tagged"]:
            totals["tagged_documents"] += 1
            totals["tags"] += int(m["tags"])
            totals["tagged_words"] += int(m["words"])
        if m["score"] >= 0:
            scores[int(m["score"])] += 1
    out = {k: totals[k] for k in COUNTS}
    out["tag_rate"] = totals["tags"] / totals["tagged_words"] if totals["tagged_words"] else 0.0
    if scores:
        out["scores"] = {str(k): scores[k] for k in sorted(scores)}
    return out


def mixture_shares(mixture: seqio.Mixture, samples: int, seed: int) -> dict[str, float]:
    """Shares of each kind in the first `samples` chunks of the mixture's training stream."""
    lengths = {name: 128 for name in mixture.output_features}  # chat mixtures have a loss_mask too
    ds = mixture.get_dataset(lengths, split="train", shuffle=True, seed=seed,
                             num_epochs=None, passthrough_features=["kind"])
    kinds = native_logs.first_quietly(ds.take(samples).as_numpy_iterator())
    counts = collections.Counter(x["kind"].decode() for x in kinds)
    return {kind: counts[kind] / samples for kind in sorted(counts)}


def stats(name: str, split: str = "train", seed: int = 42, limit: int | None = None,
          share_samples: int = 2000) -> dict:
    """JSON-ready statistics of a task, or of a mixture with each task's and the shares."""
    target = _lookup(name)
    QUARANTINE.reset()
    if isinstance(target, seqio.Mixture):
        per_task = {t.name: task_stats(t, split, seed, limit) for t in target.tasks}
        total_rate = sum(target.get_rate(t) for t in target.tasks)
        out = {key: sum(s[key] for s in per_task.values()) for key in COUNTS}
        out["tag_rate"] = out["tags"] / out["tagged_words"] if out["tagged_words"] else 0.0
        out["shares"] = {t.name: target.get_rate(t) / total_rate for t in target.tasks}
        if share_samples:
            out["measured_shares"] = mixture_shares(target, share_samples, seed)
        out["tasks"] = per_task
    else:
        out = task_stats(target, split, seed, limit)
    out["quarantined"] = QUARANTINE.total()
    out["quarantined_by_reason"] = QUARANTINE.counts()
    if QUARANTINE.path:
        out["quarantine_file"] = QUARANTINE.path
    return {"name": name, "split": split, **out}


def decode_with_markers(vocabulary: seqio.SentencePieceVocabulary, ids: list[int]) -> str:
    """Decodes ids, writing reserved control tokens (tag, role markers) as their text form."""
    processor = vocabulary.tokenizer
    parts, run = [], []

    def flush():
        text = vocabulary.decode(run)
        # SentencePiece drops the space marker of a text's first piece; after a tag it is real.
        if run and parts and processor.id_to_piece(run[0]).startswith("\u2581"):
            text = " " + text
        parts.append(text)

    for i in ids:
        if processor.is_control(i) and i > vocab_lib.BOS_ID:
            flush()
            parts.append(processor.id_to_piece(i))
            run = []
        else:
            run.append(i)
    flush()
    return "".join(parts)


def show(name: str, count: int, split: str = "train", seed: int = 42) -> list[dict]:
    """The first `count` documents decoded, with the harm tag shown as its text form."""
    target = _lookup(name)
    task_list = target.tasks if isinstance(target, seqio.Mixture) else [target]
    shown = []
    for task in task_list:
        vocabulary = task.output_features["targets"].vocabulary
        examples = documents(task, split, seed, None).take(count - len(shown))
        for example in native_logs.first_quietly(examples.as_numpy_iterator()):
            ids = example["targets"].tolist()
            item = {"task": task.name, "id": example["id"].decode(), "tokens": len(ids),
                    "text": decode_with_markers(vocabulary, ids)}
            for key in ("score", "roles"):
                if key in example:
                    value = example[key]
                    item[key] = value.decode() if isinstance(value, bytes) else int(value)
            shown.append(item)
        if len(shown) >= count:
            break
    return shown
