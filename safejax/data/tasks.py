"""seqio Tasks for language-model pretraining on plain-text JSONL.

A document is tokenized, ends with EOS, and is cut into chunks of the target length (so long
documents are used whole, not truncated); seqio's decoder feature converter then packs chunks.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import gin
import seqio
import tensorflow as tf

from safejax import vocab as vocab_lib
from safejax.data import sources

BUNDLED_VOCAB = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "vocab",
                             "bundled_8k.model")


DOCUMENTS_INTERLEAVED = 64


def split_into_chunks(dataset: tf.data.Dataset, sequence_length, output_features) -> tf.data.Dataset:
    """Appends EOS to each tokenized document and splits it into pieces of the target length."""
    size = sequence_length["targets"]
    eos = output_features["targets"].vocabulary.eos_id

    def chunks(example):
        tokens = tf.concat([example["targets"], [eos]], axis=0)
        total = tf.size(tokens, out_type=tf.int64)
        count = (total + size - 1) // size
        lengths = tf.concat([tf.fill([count - 1], tf.cast(size, tf.int64)), [total - size * (count - 1)]], 0)
        return tf.data.Dataset.from_tensor_slices(
            {"targets": tf.RaggedTensor.from_row_lengths(tokens, lengths)})

    # Round-robin over many documents, so consecutive chunks rarely come from one document even
    # before the shuffle buffer (a long thread would otherwise fill whole batches by itself).
    return dataset.interleave(chunks, cycle_length=DOCUMENTS_INTERLEAVED, block_length=1)


@gin.configurable
def jsonl_lm_task(name: str = "bundled_corpus", files: Sequence[str] | None = None,
                  vocab_path: str = BUNDLED_VOCAB, validation_permille: int = 20,
                  shuffle_buffer_size: int = 1024) -> str:
    """Registers (or re-registers) an LM Task over JSONL files and returns its name."""
    files = sources.expand_files(files) if files else sources.bundled_corpus_files()
    vocabulary = vocab_lib.load_vocabulary(vocab_path)
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=sources.JsonlDataSource(files, validation_permille),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
            split_into_chunks,
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False)},
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return name
