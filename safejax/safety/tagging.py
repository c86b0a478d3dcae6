"""Harmfulness tags (PAPER.md section 4): insert the tag id before each word after the first with
probability p, in token space.

Tags are inserted as ids after tokenization, never as text: raw text cannot forge one (the tag
is a control piece) and removing the tag ids from a tagged document gives exactly the untagged
document's tokens, so the model learns one tokenization of the text around its tags.

A word starts at a piece that has a visible character and either begins with whitespace
(SentencePiece's space marker, a newline, a tab) or follows a piece that ends with whitespace.
"""

from __future__ import annotations

import numpy as np
import seqio
import tensorflow as tf

from safejax import vocab as vocab_lib

_WHITESPACE = "\u2581 \n\t\r"


def piece_classes(vocabulary: seqio.Vocabulary) -> dict[str, np.ndarray]:
    """Per-id flags: has a visible character, begins with whitespace, ends with whitespace."""
    texts = vocab_lib.piece_texts(vocabulary)
    visible, begins, ends = (np.zeros(len(texts), bool) for _ in range(3))
    for i, piece in enumerate(texts):
        if piece is None:
            continue
        visible[i] = any(c not in _WHITESPACE for c in piece)
        begins[i] = piece[:1] in tuple(_WHITESPACE)
        ends[i] = piece[-1:] in tuple(_WHITESPACE)
    return {"visible": visible, "begins": begins, "ends": ends}


def word_starts(tokens: tf.Tensor, classes: dict[str, tf.Tensor]) -> tf.Tensor:
    """Bool per token: it begins a word other than the document's first."""
    visible = tf.gather(classes["visible"], tokens)
    begins = tf.gather(classes["begins"], tokens)
    prev_ends = tf.concat([[False], tf.gather(classes["ends"], tokens)[:-1]], axis=0)
    starts = visible & (begins | prev_ends)
    first_visible = tf.argmax(tf.cast(visible, tf.int32), output_type=tf.int32)
    return starts & (tf.range(tf.size(tokens)) > first_visible)


def insert_tags(tokens: tf.Tensor, seed: tf.Tensor, rate: float, tag_id: int,
                classes: dict[str, tf.Tensor], mask: tf.Tensor | None = None):
    """Inserts `tag_id` before each word start (after the first word) with probability `rate`.

    `seed` is a shape-[2] integer tensor: the same seed and tokens give the same tags. With a
    0/1 `mask` beside the tokens (chat finetuning's loss mask), tags go only where it is 1, and
    the mask comes back too, grown alongside (a tag takes the mask of the word it precedes).
    """
    draw = tf.random.stateless_uniform(tf.shape(tokens), seed=seed) < rate
    insert = word_starts(tokens, classes) & draw
    if mask is not None:
        insert &= mask > 0
    tags = tf.where(insert, tf.cast(tag_id, tokens.dtype), tf.constant(-1, tokens.dtype))
    pairs = tf.reshape(tf.stack([tags, tokens], axis=1), [-1])
    keep = pairs >= 0
    if mask is None:
        return tf.boolean_mask(pairs, keep)
    return tf.boolean_mask(pairs, keep), tf.boolean_mask(tf.repeat(mask, 2), keep)


def document_seed(doc_id: tf.Tensor, seed: int) -> tf.Tensor:
    """A per-document seed from its id: the same document gets the same tags on any host, in
    any order, after any resume."""
    return tf.stack([tf.constant(seed, tf.int64), tf.strings.to_hash_bucket_fast(doc_id, 2**62)])


def tag_preprocessor(rate: float = 0.05, score_range: tuple[int, int] | None = None,
                     seed: int = 0, feature: str = "targets", mask_feature: str | None = None):
    """A seqio preprocessor that tags tokenized documents, seeded by document id.

    With `score_range` (inclusive), only documents whose `score` feature lies in it are tagged;
    the others (safe, unscored, synthetic) pass through unchanged. Without it, every document is.
    With `mask_feature`, tags go only where that feature is 1 (the assistant's tokens of a chat
    example), and it grows with the tokens. The `tagged` feature says which documents went
    through tagging (for the tag-rate statistics).
    """

    def preprocess(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
        vocabulary = output_features[feature].vocabulary
        tag_id = vocab_lib.harm_tag_id(vocabulary)
        classes = {k: tf.constant(v) for k, v in piece_classes(vocabulary).items()}

        def tag(example):
            tokens = example[feature]
            eligible = tf.constant(True)
            if score_range is not None:
                eligible = (example["score"] >= score_range[0]) & (example["score"] <= score_range[1])
            seed_of = document_seed(example["id"], seed)
            out = {**example, "tagged": tf.cast(eligible, tf.int32)}
            if mask_feature is None:
                out[feature] = tf.cond(eligible, lambda: insert_tags(tokens, seed_of, rate, tag_id, classes),
                                       lambda: tokens)
            else:
                mask = example[mask_feature]
                out[feature], out[mask_feature] = tf.cond(
                    eligible, lambda: insert_tags(tokens, seed_of, rate, tag_id, classes, mask),
                    lambda: (tokens, mask))
            return out

        return dataset.map(tag, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return preprocess
