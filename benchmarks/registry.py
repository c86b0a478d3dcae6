"""`safejax bench NAME`: each benchmark is a module here with a `main(argv) -> int`."""

from __future__ import annotations

import importlib

from safejax import errors

BENCHMARKS = {"train": "benchmarks.train", "sample": "benchmarks.sample", "data": "benchmarks.data",
              "score": "benchmarks.score"}


def run(name: str, argv: list[str]) -> int:
    if name not in BENCHMARKS:
        raise errors.UserError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name]).main(argv)
