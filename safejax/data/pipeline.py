"""Batches for the trainer: each process reads its own shard of a seqio Task or Mixture.

The stream is deterministic for a seed and resumable by position: a run restarted at position n
rebuilds the same stream and skips its first n batches, so it sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from safejax import errors, native_logs
from safejax import vocab as vocab_lib
from safejax.data import chat, mixing


# The batch features the pipeline emits: seqio decoder feature -> the name objectives read
FEATURES = {
    "decoder_input_tokens": "tokens",
    "decoder_target_tokens": "targets",
    "decoder_loss_weights": "weights",
    "decoder_positions": "positions",
    "decoder_segment_ids": "segment_ids",
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = gin.REQUIRED  # name of a registered seqio Task or Mixture
    seq_len: int = 128
    global_batch_size: int = 8
    seed: int = 42
    pack: bool = True
    eval_batches: int = 4  # held-out batches per evaluation (0 turns evaluation off)
    loss_on_tag: bool = True  # train on predicting the harm tag (Safe Beam Search reads it)
    use_cached: bool = False  # read the Beam job's cache (data/beam_cache.py) instead of the source
    cache_dirs: tuple[str, ...] = ()  # where `safejax data cache` wrote it
    # tf.data's autotuner: off, AUTOTUNE stages then run one call per core. Its model costs CPU
    # per stage and element, and a mixture has a pipeline per task (on 2 cores the full safety
    # mixture spent more CPU per token than the raw corpus with it on, none more with it off;
    # benchmarks/PEERS.md).
    autotune: bool = False


def _local_batch_size(cfg: DataConfig) -> int:
    processes = jax.process_count()
    if cfg.global_batch_size % processes:
        raise errors.UserError(f"global batch {cfg.global_batch_size} is not divisible by the "
                               f"{processes} processes")
    return cfg.global_batch_size // processes


def _dataset(cfg: DataConfig, split: str, *, train: bool) -> tf.data.Dataset:
    """Shuffled (with the fixed seed) in both cases: held-out batches then mix every source."""
    vocabulary(cfg)  # a clear error for an unknown task
    if cfg.use_cached:
        if not cfg.cache_dirs:
            raise errors.UserError("DataConfig.use_cached needs DataConfig.cache_dirs (see `safejax data cache`)")
        seqio.utils.set_global_cache_dirs(list(cfg.cache_dirs))
    shard = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
    lengths, converter = {"targets": cfg.seq_len}, seqio.DecoderFeatureConverter(pack=cfg.pack)
    if chat.is_chat(cfg.task):  # conversations: the loss weights are their loss_mask
        lengths, converter = {**lengths, "loss_mask": cfg.seq_len}, chat.ChatFeatureConverter(pack=cfg.pack)
    if train:  # mixtures mix until every member is exhausted (data/mixing.py): an empty one is an error
        mixing.check_members(cfg.task, split, lengths, cfg.use_cached)
    ds = seqio.get_dataset(
        cfg.task, lengths, converter,
        dataset_split=split, shuffle=True, num_epochs=None if train else 1, shard_info=shard,
        seed=cfg.seed, batch_size=_local_batch_size(cfg), use_cached=cfg.use_cached, verbose=False)
    options = tf.data.Options()
    options.autotune.enabled = cfg.autotune
    return ds.with_options(options)


def vocabulary(cfg: DataConfig) -> seqio.SentencePieceVocabulary:
    """The vocabulary of the task's (or mixture's) targets: the one the model trains on."""
    if cfg.task not in {*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()}:
        raise errors.UserError(f"DataConfig.task {cfg.task!r} is not a registered task or mixture")
    return seqio.get_mixture_or_task(cfg.task).output_features["targets"].vocabulary


def _tag_id(cfg: DataConfig) -> int | None:
    """The harm tag's id when its loss is switched off (its weights are then zeroed)."""
    return None if cfg.loss_on_tag else vocab_lib.harm_tag_id(vocabulary(cfg))


def _to_model_features(batch: dict[str, np.ndarray], tag_id: int | None = None) -> dict[str, np.ndarray]:
    out = {FEATURES[k]: v for k, v in batch.items() if k in FEATURES}
    if "segment_ids" not in out:  # unpacked: one document a row
        out["segment_ids"] = (out["targets"] != 0).astype(np.int32)
        out["positions"] = np.broadcast_to(np.arange(out["targets"].shape[1], dtype=np.int32),
                                           out["targets"].shape).copy()
    if tag_id is not None:
        out["weights"] = np.where(out["targets"] == tag_id, 0, out["weights"]).astype(out["weights"].dtype)
    return out


def _iterate(ds: tf.data.Dataset, task: str) -> Iterator[dict[str, np.ndarray]]:
    """Batches as numpy; a failed data check (a document without a score) as a UserError."""
    try:
        yield from native_logs.first_quietly(ds.as_numpy_iterator())
    except tf.errors.InvalidArgumentError as e:
        if "assertion failed" not in e.message:
            raise
        check = " ".join(e.message[e.message.index("assertion failed:") + 17:].split())
        raise errors.UserError(f"data {task!r}: {check[:500]}") from None


def train_batches(cfg: DataConfig, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless per-process batches, starting after the first `start` batches of the stream; a
    stream with nothing in it (every record empty or set aside) is a UserError, not the end."""
    tag_id = _tag_id(cfg)
    for batch in _iterate(_dataset(cfg, "train", train=True).skip(start), cfg.task):
        yield _to_model_features(batch, tag_id)
    raise errors.UserError(f"data {cfg.task!r} has no training examples: its files are empty or every "
                           "record was set aside (see the quarantine file in the workdir)")


def in_background(iterator: Iterator, buffer: int = 2) -> Iterator:
    """Starts running `iterator` in a thread now, `buffer` items ahead, keeping its order.

    The first batches are then ready when the train step has compiled, and later ones are made
    while the device computes. An exception in the producer is raised in the consumer.
    """
    items: queue.Queue = queue.Queue(maxsize=buffer)
    done = object()

    def produce():
        try:
            for item in iterator:
                items.put(item)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            items.put(e)
        items.put(done)

    threading.Thread(target=produce, daemon=True, name="batches").start()

    def consume():
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    return consume()


def eval_batches(cfg: DataConfig) -> list[dict[str, np.ndarray]]:
    """The first `eval_batches` held-out batches; the same ones at every evaluation.

    Every process returns the same number of batches (padding with empty ones if its shard is
    short), since evaluation steps are collective.
    """
    if cfg.eval_batches <= 0:
        return []
    tag_id = _tag_id(cfg)
    batches = [_to_model_features(b, tag_id) for b in
               _iterate(_dataset(cfg, "validation", train=False).take(cfg.eval_batches), cfg.task)]
    if not batches:
        raise errors.UserError(f"task {cfg.task!r} has no validation data for evaluation; "
                               f"set DataConfig.eval_batches = 0 or add documents")
    while len(batches) < cfg.eval_batches:
        batches.append({k: np.zeros_like(v) for k, v in batches[0].items()})
    return batches
