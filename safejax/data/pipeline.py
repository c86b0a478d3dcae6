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

from safejax import errors
from safejax.train.lm import FEATURES


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = gin.REQUIRED  # name of a registered seqio Task or Mixture
    seq_len: int = 128
    global_batch_size: int = 8
    seed: int = 42
    pack: bool = True
    eval_batches: int = 4  # held-out batches per evaluation (0 turns evaluation off)


def _local_batch_size(cfg: DataConfig) -> int:
    processes = jax.process_count()
    if cfg.global_batch_size % processes:
        raise errors.UserError(f"global batch {cfg.global_batch_size} is not divisible by the "
                               f"{processes} processes")
    return cfg.global_batch_size // processes


def _dataset(cfg: DataConfig, split: str, *, train: bool) -> tf.data.Dataset:
    """Shuffled (with the fixed seed) in both cases: held-out batches then mix every source."""
    shard = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
    return seqio.get_dataset(
        cfg.task, {"targets": cfg.seq_len}, seqio.DecoderFeatureConverter(pack=cfg.pack),
        dataset_split=split, shuffle=True, num_epochs=None if train else 1, shard_info=shard,
        seed=cfg.seed, batch_size=_local_batch_size(cfg), verbose=False)


def _to_model_features(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {FEATURES[k]: v for k, v in batch.items() if k in FEATURES}
    if "segment_ids" not in out:  # unpacked: one document a row
        out["segment_ids"] = (out["targets"] != 0).astype(np.int32)
        out["positions"] = np.broadcast_to(np.arange(out["targets"].shape[1], dtype=np.int32),
                                           out["targets"].shape).copy()
    return out


def train_batches(cfg: DataConfig, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless per-process batches, starting after the first `start` batches of the stream."""
    ds = _dataset(cfg, "train", train=True).skip(start)
    for batch in ds.as_numpy_iterator():
        yield _to_model_features(batch)


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
    batches = [_to_model_features(b) for b in
               _dataset(cfg, "validation", train=False).take(cfg.eval_batches).as_numpy_iterator()]
    if not batches:
        raise errors.UserError(f"task {cfg.task!r} has no validation data for evaluation; "
                               f"set DataConfig.eval_batches = 0 or add documents")
    while len(batches) < cfg.eval_batches:
        batches.append({k: np.zeros_like(v) for k, v in batches[0].items()})
    return batches
