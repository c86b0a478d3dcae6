"""Reading JSONL corpora (one JSON object a line, optionally gzip): as a seqio DataSource and in Python.

A held-out split is carved out of the same files by hashing each document id, so the split is
stable whatever the file order, sharding or host count.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator, Sequence

import seqio
import tensorflow as tf

from safejax import errors

BUNDLED_CORPUS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "corpus")
HASH_BUCKETS = 1000


def bundled_corpus_files() -> list[str]:
    return sorted(glob.glob(os.path.join(BUNDLED_CORPUS_DIR, "*.jsonl.gz")))


def expand_files(patterns: Sequence[str] | str) -> list[str]:
    """Expands globs and checks each file can be opened and its first line parsed."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise errors.UserError(f"corpus file not found: {pattern}")
        files.extend(matches)
    for path in files:
        check_readable(path)
    return files


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def check_readable(path: str) -> None:
    try:
        with _open(path) as f:
            first = f.readline()
        if first.strip():
            json.loads(first)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.UserError(f"cannot read corpus file {path}: {type(e).__name__}: {e}") from e


def iter_texts(files: Sequence[str]) -> Iterator[str]:
    """Document texts in file order (for vocabulary training and statistics)."""
    for path in files:
        with _open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]


def _parse_line(line: bytes) -> tuple[bytes, bytes]:
    record = json.loads(line)
    return str(record.get("id", "")).encode(), str(record.get("text", "")).encode()


class JsonlDataSource(seqio.FileDataSource):
    """A seqio source over JSONL(.gz) files with `train` and `validation` splits.

    Yields {"id", "text"}. A document goes to `validation` when its id hashes into the first
    `validation_permille` of 1000 buckets.
    """

    def __init__(self, files: Sequence[str], validation_permille: int = 20):
        if not 0 <= validation_permille < HASH_BUCKETS:
            raise errors.UserError(f"validation_permille must be in [0, {HASH_BUCKETS}), "
                                   f"got {validation_permille}")
        self._validation_permille = validation_permille
        compression = "GZIP" if all(f.endswith(".gz") for f in files) else ""
        if compression == "" and any(f.endswith(".gz") for f in files):
            raise errors.UserError("mix of gzip and plain JSONL files in one source; use one kind")

        def read_file(path):
            lines = tf.data.TextLineDataset(path, compression_type=compression)
            lines = lines.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
            return lines.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE)

        super().__init__(read_file_fn=read_file,
                         split_to_filepattern={"train": list(files), "validation": list(files)})

    @staticmethod
    def _parse(line):
        doc_id, text = tf.numpy_function(_parse_line, [line], [tf.string, tf.string], stateful=False)
        doc_id.set_shape([])
        text.set_shape([])
        return {"id": doc_id, "text": text}

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
        ds = super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)
        permille = self._validation_permille
        in_validation = lambda ex: tf.strings.to_hash_bucket_fast(ex["id"], HASH_BUCKETS) < permille  # noqa: E731
        if split == "validation":
            return ds.filter(in_validation)
        return ds.filter(lambda ex: tf.logical_not(in_validation(ex)))

    def list_shards(self, split: str) -> list[str]:
        return list(self._split_to_filepattern[split])

