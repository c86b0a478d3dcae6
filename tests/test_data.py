"""The LM data pipeline: the bundled corpus, splits, per-host shards, determinism and resume."""

import dataclasses
import gzip
import itertools
import json

import numpy as np
import seqio

from safejax.data import pipeline, preprocessors, sources


def test_bundled_corpus_is_gzip_jsonl_with_ids_and_texts():
    files = sources.bundled_corpus_files()
    assert len(files) == 6
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            record = json.loads(f.readline())
        assert record["id"] and record["text"]


def _ids(source, split, shard=None):
    ds = source.get_dataset(split=split, shuffle=False, shard_info=shard)
    return [x["id"].decode() for x in ds.as_numpy_iterator()]


def test_train_and_validation_splits_are_disjoint_and_cover_the_corpus():
    source = sources.JsonlDataSource(sources.bundled_corpus_files(), validation_permille=50)
    train, validation = _ids(source, "train"), _ids(source, "validation")
    all_ids = [json.loads(line)["id"] for path in sources.bundled_corpus_files()
               for line in gzip.open(path, "rt", encoding="utf-8")]
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(all_ids)
    assert 0.02 < len(validation) / len(all_ids) < 0.09


def test_two_hosts_read_disjoint_shards_that_cover_every_document():
    source = sources.JsonlDataSource(sources.bundled_corpus_files())
    shards = [_ids(source, "train", seqio.ShardInfo(i, 2)) for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(_ids(source, "train"))


def test_long_documents_are_chunked_not_truncated():
    """Every token reaches the model: each document + EOS is cut into target-length chunks."""
    import tensorflow as tf

    docs = [np.arange(10, 80), np.arange(100, 111)]  # 70 and 11 tokens
    ds = tf.data.Dataset.from_generator(lambda: ({"targets": d} for d in docs),
                                        output_signature={"targets": tf.TensorSpec([None], tf.int64)})
    vocabulary = seqio.PassThroughVocabulary(size=1000, eos_id=1)
    out = [x["targets"] for x in preprocessors.split_into_chunks(
        ds, {"targets": 32}, {"targets": seqio.Feature(vocabulary)}).as_numpy_iterator()]
    assert sorted(len(c) for c in out) == [7, 12, 32, 32]
    first = np.concatenate([c for c in out if c[0] < 100 and c[0] != 1])
    second = np.concatenate([c for c in out if c[0] >= 100])
    np.testing.assert_array_equal(first, np.append(docs[0], 1))
    np.testing.assert_array_equal(second, np.append(docs[1], 1))


def test_same_seed_same_batches_and_resume_skips_exactly(tiny_config):
    data = pipeline.DataConfig()
    stream = pipeline.train_batches(data, 0)
    first = [next(stream) for _ in range(6)]
    again = pipeline.train_batches(data, 0)
    for a in first:
        b = next(again)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    resumed = pipeline.train_batches(data, 4)
    for a in first[4:]:
        b = next(resumed)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_autotune_changes_speed_not_batches(tiny_config):
    off = pipeline.DataConfig()
    on = dataclasses.replace(off, autotune=True)
    assert not pipeline._dataset(off, "train", train=True).options().autotune.enabled
    for a, b in zip(itertools.islice(pipeline.train_batches(off), 4), pipeline.train_batches(on)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_batches_are_packed_decoder_features(tiny_config):
    batch = next(pipeline.train_batches(pipeline.DataConfig(), 0))
    assert set(batch) == {"tokens", "targets", "weights", "positions", "segment_ids"}
    assert batch["tokens"].shape == (8, 64)
    # Inputs are targets shifted right within each packed document.
    row = 0
    seg = batch["segment_ids"][row]
    t, x = batch["targets"][row], batch["tokens"][row]
    same = (seg[1:] == seg[:-1]) & (seg[1:] != 0)
    np.testing.assert_array_equal(x[1:][same], t[:-1][same])


def test_background_iterator_keeps_order_and_raises_errors():
    assert list(pipeline.in_background(iter(range(50)), buffer=3)) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("boom")

    it = pipeline.in_background(failing())
    assert next(it) == 1
    try:
        next(it)
    except RuntimeError as e:
        assert "boom" in str(e)
    else:
        raise AssertionError("the producer's error was lost")
