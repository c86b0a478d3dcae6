"""Preprocess and cache the safety tasks at corpus scale with Apache Beam, in seqio's cache format.

Every Task of a task or mixture is read shard by shard on the workers and run through its
per-document steps (validation, score join, filters, tokenization, tags, dialogue formatting: all
that comes before its `CacheDatasetPlaceholder`), then written as TFRecord shards with seqio's
info and stats files and a COMPLETED marker:

    CACHE_DIR/TASK/train.tfrecord-00000-of-00004, info.train.json, stats.train.json, COMPLETED

Training then reads the cache instead of the raw files with `DataConfig.use_cached = True` and
`DataConfig.cache_dirs = [CACHE_DIR]`; only chunking, shuffling, mixing and packing remain.
Malformed records are set aside by each worker in CACHE_DIR/quarantine/.

Workers rebuild the task registry from the same gin config (shipped as text in the pipeline),
so any runner works: DirectRunner locally and in tests, Dataflow, Flink or Spark at scale
(launch/beam_dataflow.sh).
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Sequence

import apache_beam as beam
import seqio
import tensorflow as tf
from seqio import beam_utils

from safejax import errors
from safejax.data.quarantine import QUARANTINE


class RegisterTasks:
    """Runs on each worker before it reads a shard: registers the tasks from the gin config once
    per process (the launching process has them already)."""

    _lock = threading.Lock()
    _done: set[str] = set()

    def __init__(self, gin_config: str, cache_dir: str):
        self._gin_config, self._cache_dir = gin_config, cache_dir

    @classmethod
    def mark_registered(cls, gin_config: str) -> None:
        cls._done.add(gin_config)

    def __call__(self) -> None:
        import gin

        from safejax import config
        from safejax.data import tasks

        with self._lock:
            if QUARANTINE.path is None:
                QUARANTINE.write_to(os.path.join(self._cache_dir, "quarantine", f"{uuid.uuid4().hex}.jsonl"))
            if self._gin_config in self._done:
                return
            config.register_configurables()
            gin.clear_config()
            gin.parse_config(self._gin_config)
            tasks.safety_data()
            self._done.add(self._gin_config)


def task_names(name: str) -> list[str]:
    """The tasks behind a task or mixture name."""
    try:
        target = seqio.get_mixture_or_task(name)
    except ValueError:
        raise errors.UserError(f"data {name!r} is not registered (see `safejax data list`)") from None
    return sorted(t.name for t in target.tasks) if isinstance(target, seqio.Mixture) else [name]


def _seed(task: str, base_seed: int) -> int:
    return (int.from_bytes(hashlib.md5(task.encode()).digest()[:7], "little") + base_seed) % (2**63 - 1)


def build(pipeline: beam.Pipeline, names: Sequence[str], cache_dir: str, gin_config: str,
          base_seed: int = 0, min_shards: int = 1) -> None:
    """Adds the caching of every split of `names` (tasks) to `pipeline`."""
    setup = RegisterTasks(gin_config, cache_dir)
    completions = []
    for name in names:
        task = seqio.TaskRegistry.get(name)
        if not task.supports_caching:
            raise errors.UserError(f"task {name!r} has no cache point; it cannot be cached")
        out = os.path.join(cache_dir, seqio.get_task_dir_from_name(name))
        for split in task.splits:
            label = f"{name}_{split}"
            read = beam_utils.PreprocessTask(task, split, preprocessors_seed=_seed(name, base_seed),
                                             setup_fn=setup)
            shards = max(len(read.shards), min_shards)
            examples = pipeline | f"{label}_read" >> read | f"{label}_shuffle" >> beam.Reshuffle()
            completions += [
                examples | f"{label}_write" >> beam_utils.WriteExampleTfRecord(
                    seqio.get_cached_tfrecord_prefix(out, split), num_shards=shards),
                examples | f"{label}_info" >> beam_utils.GetInfo(shards)
                | f"{label}_write_info" >> beam_utils.WriteJson(seqio.get_cached_info_path(out, split)),
                examples | f"{label}_stats" >> beam_utils.GetStats(task.output_features)
                | f"{label}_write_stats" >> beam_utils.WriteJson(seqio.get_cached_stats_path(out, split)),
            ]
    marker_dirs = [os.path.join(cache_dir, seqio.get_task_dir_from_name(n)) for n in names]
    _ = (completions | "all_written" >> beam.Flatten()
         | "once" >> beam.combiners.Count.Globally()
         | "mark_completed" >> beam.FlatMap(lambda _: [_mark_completed(d) for d in marker_dirs]))


def _mark_completed(directory: str) -> str:
    """seqio finds a task's cache only once this file exists: written after every split."""
    with tf.io.gfile.GFile(os.path.join(directory, "COMPLETED"), "w") as f:
        f.write("written by safejax data cache\n")
    return directory


def run(name: str, cache_dir: str, gin_config: str, beam_args: Sequence[str] = (),
        base_seed: int = 0, min_shards: int = 1) -> dict:
    """Caches the tasks behind `name`; returns a summary. Runner and options come in `beam_args`
    (e.g. --runner=DataflowRunner --project=... --region=... --temp_location=gs://...)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    names = task_names(name)
    RegisterTasks.mark_registered(gin_config)
    if QUARANTINE.path is None:
        QUARANTINE.write_to(os.path.join(cache_dir, "quarantine", "launcher.jsonl"))
    tf.io.gfile.makedirs(cache_dir)
    with tf.io.gfile.GFile(os.path.join(cache_dir, "config.gin"), "w") as f:
        f.write(gin_config)
    options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"], save_main_session=False)
    with beam.Pipeline(options=options) as pipeline:
        build(pipeline, names, cache_dir, gin_config, base_seed, min_shards)
    return {"cached": names, "cache_dir": cache_dir, "quarantined": QUARANTINE.counts()}
