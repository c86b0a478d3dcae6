"""`safejax bench NAME`: each benchmark is a module of safejax/bench with a `main(argv) -> int`.
The PyTorch peers they are compared with are scripts in the repository's benchmarks/peers/."""

from __future__ import annotations

import importlib

from safejax import errors

BENCHMARKS = {  # name -> (module, what it measures)
    "train": ("safejax.bench.train", "training tokens/s and MFU of the LM configs"),
    "sample": ("safejax.bench.sample", "decoding tokens/s of every strategy"),
    "data": ("safejax.bench.data", "input-pipeline tokens/s, raw corpus vs the safety mixture"),
    "score": ("safejax.bench.score", "classifier windows/s and tokens/s, the full-corpus estimate"),
    "eval": ("safejax.bench.eval", "eval harness: generation tokens/s over the bare sampler's, classifier judge time over generation's"),
    "synth": ("safejax.bench.synth", "synthesis records/s: endpoint client at concurrency 1 and 32, template with and without the gate"),
    "serve": ("safejax.bench.serve", "server requests/s and p50/p99 latency under 64 concurrent greedy clients"),
}


def run(name: str, argv: list[str]) -> int:
    if name not in BENCHMARKS:
        raise errors.UserError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name][0]).main(argv)
