"""Training throughput and MFU of the LM configs on this machine, one JSON line per config.

Runs the real train step (sharded state, donation, optimizer) on real batches of the bundled
corpus, after warm-up steps, and divides by the fp32 matmul peak measured in the same process:

    safejax bench train [--configs tiny small] [--steps 10] [--warmup 2]

The same dimensions run under LitGPT with benchmarks/peers/litgpt_train.py (see benchmarks/PEERS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

from safejax import config, hardware
from safejax.data import pipeline
from safejax.train import pretrain
from safejax.train.metrics import model_flops_utilization


def bench_config(name: str, steps: int, warmup: int, bindings: list[str]) -> dict:
    config.parse([os.path.join(config.CONFIG_DIR, "lm", f"{name}.gin")],
                 ["TrainConfig.progress_bar = False"] + bindings)
    trainer, data, _ = pretrain.build_trainer()
    batches = pipeline.in_background(pipeline.train_batches(data, 0), buffer=4)
    state = trainer.init_state()
    trainer.compile()
    for _ in range(warmup):
        state, metrics = trainer.train_step(state, trainer.global_batch(next(batches)))
    jax.block_until_ready(metrics)
    host_batches = [next(batches) for _ in range(steps)]  # the input pipeline is timed apart
    start, cpu_start = time.perf_counter(), time.process_time()
    for b in host_batches:
        state, metrics = trainer.train_step(state, trainer.global_batch(b))
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # all threads: under load, steadier than wall time
    tokens_per_sec = steps * trainer.global_batch_size * data.seq_len / elapsed
    flops_per_token = trainer.objective.flops_per_example() / data.seq_len
    peak, peak_source = hardware.peak_flops()
    return {"config": name, "tokens_per_sec": round(tokens_per_sec, 1),
            "mfu": round(model_flops_utilization(flops_per_token, tokens_per_sec, peak), 4),
            "peak_flops": round(peak), "peak_source": peak_source, "step_time_s": round(elapsed / steps, 4),
            "step_cpu_s": round(cpu / steps, 4), "loadavg_1m": round(os.getloadavg()[0], 2),
            "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "batch": trainer.global_batch_size, "dtype": trainer.objective.model_config.dtype,
            "mesh": dict(trainer.mesh.shape), "final_loss": round(float(metrics["loss"]), 4),
            **trainer.objective.describe()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safejax bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gin", action="append", default=[], help="extra gin binding, e.g. 'BATCH_SIZE = 16'")
    args = parser.parse_args(argv)
    for name in args.configs:
        print(json.dumps(bench_config(name, args.steps, args.warmup, args.gin)), flush=True)
    return 0
