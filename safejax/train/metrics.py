"""Training metrics: one JSON object a line in WORKDIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes; the other processes get a writer that does nothing. A resumed run first
drops the rows past the step it resumed from (written after that checkpoint by a run killed
later, and about to be written again by the replayed steps), so each step has one row.
"""

from __future__ import annotations

import json
import math
import os

import jax
import tensorflow as tf


class MetricsWriter:
    def __init__(self, workdir: str, start_step: int = 0):
        """`start_step`: the step the run resumes from (0: a fresh run)."""
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        drop_rows_after(path, start_step)
        self._jsonl = open(path, "a", encoding="utf-8")
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=step):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tf.summary.scalar(key, value)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def drop_rows_after(path: str, step: int) -> int:
    """Rewrites `path` (atomically) without its rows past `step` and a torn last line; returns
    how many rows went."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if line.endswith("\n") and json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            pass  # a torn line of a killed run
    if len(kept) == len(lines):
        return 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):  # NaN and inf are not valid JSON
        return None
    return value


def model_flops_utilization(flops_per_token: float, tokens_per_sec: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_sec / peak_flops
