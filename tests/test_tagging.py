"""Harm-tag insertion: exact removal, first word untouched, rate as configured, deterministic."""

import numpy as np
import tensorflow as tf

from safejax import vocab
from safejax.data import sources
from safejax.safety import tagging

VOCAB = vocab.load_vocabulary(vocab.BUNDLED_VOCAB)
TAG = vocab.reserved_ids(VOCAB)[vocab.HARM_TAG]
CLASSES = {k: tf.constant(v) for k, v in tagging.piece_classes(VOCAB).items()}


def _tag(text, seed=(1, 2), rate=0.05):
    tokens = tf.constant(VOCAB.encode(text), tf.int32)
    return tokens.numpy(), tagging.insert_tags(tokens, tf.constant(seed), rate, TAG, CLASSES).numpy()


def test_removing_the_tags_gives_the_untagged_tokens_exactly():
    text = "One two three.\nFour  five, six\tseven eight nine ten."
    tokens, tagged = _tag(text, rate=1.0)
    assert (tagged == TAG).sum() > 0
    np.testing.assert_array_equal(tagged[tagged != TAG], tokens)
    assert VOCAB.decode(tagged.tolist()) == text  # the tag is a control piece: invisible in text


def test_rate_one_tags_every_word_but_the_first():
    text = "alpha beta gamma\ndelta  epsilon"
    tokens, tagged = _tag(text, rate=1.0)
    assert (tagged == TAG).sum() == len(text.split()) - 1
    assert tagged[0] != TAG


def test_same_seed_same_tags_other_seed_other_tags():
    text = " ".join(["word"] * 400)
    a, b, c = _tag(text, (1, 2))[1], _tag(text, (1, 2))[1], _tag(text, (3, 4))[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tag_rate_on_the_bundled_corpus_matches_p():
    tags = words = 0
    for i, text in enumerate(sources.iter_texts(sources.bundled_corpus_files()[:2])):
        tokens, tagged = _tag(text, seed=(i, 7), rate=0.05)
        tags += int((tagged == TAG).sum())
        words += int(tagging.word_starts(tf.constant(tokens), CLASSES).numpy().sum())
    assert words > 50_000
    assert abs(tags / words - 0.05) < 0.005


def _tagged_dataset(records, **kwargs):
    import seqio

    ds = tf.data.Dataset.from_generator(
        lambda: ({"id": i, "score": s, "targets": VOCAB.encode(t)} for i, s, t in records),
        output_signature={"id": tf.TensorSpec([], tf.string), "score": tf.TensorSpec([], tf.int32),
                          "targets": tf.TensorSpec([None], tf.int32)})
    out = tagging.tag_preprocessor(**kwargs)(ds, {"targets": seqio.Feature(VOCAB)})
    return [x["targets"] for x in out.as_numpy_iterator()]


def test_seqio_preprocessor_tags_only_the_requested_score_range():
    text = "a document with several words in it"
    records = [(f"doc-{s}", s, text) for s in range(6)]
    out = _tagged_dataset(records, rate=1.0, score_range=(1, 3))
    tags = [int((t == TAG).sum()) for t in out]
    assert tags == [0, 6, 6, 6, 0, 0]
    assert [int((t == TAG).sum()) for t in _tagged_dataset(records, rate=1.0)] == [6] * 6


def test_tags_depend_on_the_document_id_not_its_position():
    text = " ".join(["word"] * 300)
    forward = _tagged_dataset([("a", 1, text), ("b", 1, text)], rate=0.1, seed=7)
    backward = _tagged_dataset([("b", 1, text), ("a", 1, text)], rate=0.1, seed=7)
    np.testing.assert_array_equal(forward[0], backward[1])
    np.testing.assert_array_equal(forward[1], backward[0])
    assert not np.array_equal(forward[0], forward[1])
    other_seed = _tagged_dataset([("a", 1, text)], rate=0.1, seed=8)
    assert not np.array_equal(forward[0], other_seed[0])
