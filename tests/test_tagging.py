"""Harm-tag insertion: exact removal, first word untouched, rate as configured, deterministic."""

import numpy as np
import tensorflow as tf

from safejax import vocab
from safejax.data import sources, tasks
from safejax.safety import tagging

VOCAB = vocab.load_vocabulary(tasks.BUNDLED_VOCAB)
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


def test_seqio_preprocessor_tags_tokenized_documents():
    import seqio

    texts = ["first doc has several words in it", "second one too, with more words"]
    ds = tf.data.Dataset.from_tensor_slices({"targets": tf.ragged.constant([VOCAB.encode(t) for t in texts])})
    ds = ds.map(lambda x: {"targets": x["targets"]})
    with seqio.utils.map_seed_manager(42):
        out = list(tagging.tag_preprocessor(rate=1.0)(ds, {"targets": seqio.Feature(VOCAB)}).as_numpy_iterator())
    for text, example in zip(texts, out):
        assert (example["targets"] == TAG).sum() == len(text.split()) - 1
