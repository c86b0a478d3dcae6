"""Serving throughput: requests/s and latency percentiles of `safejax serve` under many clients.

    safejax bench serve [--config small] [--clients 64] [--rounds 3] [--new_tokens 16]
                        [--max_batch N] [--server_file PATH]

The server runs in this process on 127.0.0.1 over a randomly initialised model of an LM config
with the bundled vocabulary (speed does not depend on the weights); every client is an httpx
connection that sends greedy /v1/completions requests of `--new_tokens` tokens one after the
other (min_tokens is not sent, so a server without it can be measured). Untimed rounds of 1, 2, 4,
... max_batch clients and one of all compile the batch shapes, then `--rounds` rounds of one request per client are timed.
`--server_file` measures another implementation with the same `Server(generator, config,
model_name)` interface (e.g. an older revision of safejax/inference/server.py) under the same
load. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import sys
import time

import gin
import httpx
import jax
import numpy as np
from flax import nnx

from safejax import config, parallel
from safejax import vocab as vocab_lib
from safejax.inference import checkpoint, params, server  # noqa: F401 (params, server: their gin configurables)
from safejax.inference.generate import Generator
from safejax.models.decoder import Decoder, DecoderConfig

PROMPT_WORDS = ("the river", "a quiet market", "once upon a time", "the old library", "in the morning",
                "a letter from", "the children of", "across the valley")


def random_generator(config_name: str) -> Generator:
    """A Generator over a randomly initialised model of configs/lm/NAME.gin."""
    config.parse([os.path.join(config.CONFIG_DIR, "lm", f"{config_name}.gin"),
                  os.path.join(config.CONFIG_DIR, "sample", "default.gin")], [])
    cfg = DecoderConfig()
    vocabulary = vocab_lib.load_vocabulary(vocab_lib.BUNDLED_VOCAB)
    loaded = checkpoint.Loaded(Decoder(cfg, rngs=nnx.Rngs(0)), cfg, vocabulary, vocab_lib.reserved_ids(vocabulary),
                               context=int(gin.query_parameter("%SEQ_LEN")), step=0, mesh=parallel.build_mesh(),
                               rules=parallel.logical_rules())
    return Generator(loaded)


def load_server_module(path: str | None):
    if path is None:
        return server
    spec = importlib.util.spec_from_file_location("bench_other_server", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def _round(url: str, clients: int, new_tokens: int, offset: int) -> tuple[list[float], int, int]:
    """One request per client, all at once: the latencies (s) of those answered, the new tokens
    returned, and how many failed (refused or dropped connection, non-200 reply)."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        async def one(i: int) -> tuple[float, int] | None:
            prompt = f"{PROMPT_WORDS[(i + offset) % len(PROMPT_WORDS)]} {i}"
            start = time.perf_counter()
            try:
                response = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": new_tokens,
                                                                      "temperature": 0})
            except httpx.HTTPError:
                return None
            if response.status_code != 200:
                return None
            return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]

        results = await asyncio.gather(*(one(i) for i in range(clients)))
    answered = [r for r in results if r is not None]
    return [r[0] for r in answered], sum(r[1] for r in answered), len(results) - len(answered)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safejax bench serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--max_batch", type=int, help="requests decoded together (default: ServerConfig.max_batch)")
    parser.add_argument("--server_file", help="another server implementation to measure (default: safejax's)")
    args = parser.parse_args(argv)
    generator = random_generator(args.config)
    module = load_server_module(args.server_file)
    cfg = module.ServerConfig()
    cfg = dataclasses.replace(cfg, port=0, **({} if args.max_batch is None else {"max_batch": args.max_batch}))
    server = module.Server(generator, cfg, model_name="bench").start()
    try:
        for size in [1 << i for i in range(cfg.max_batch.bit_length())] + [args.clients]:  # compiles; not timed
            asyncio.run(_round(server.url, size, args.new_tokens, offset=0))
        latencies, tokens, failed = [], 0, 0
        start = time.perf_counter()
        for r in range(args.rounds):
            lat, new, bad = asyncio.run(_round(server.url, args.clients, args.new_tokens, offset=r + 1))
            latencies, tokens, failed = latencies + lat, tokens + new, failed + bad
        seconds = time.perf_counter() - start
    finally:
        server.shutdown()
    percentile = lambda q: round(float(np.percentile(latencies, q)), 3) if latencies else None  # noqa: E731
    result = {"requests_per_sec": round(len(latencies) / seconds, 2),
              "p50_latency_s": percentile(50), "p99_latency_s": percentile(99),
              "new_tokens_per_sec": round(tokens / seconds, 1), "requests": len(latencies), "failed": failed,
              "server": args.server_file or "safejax.inference.server", "max_batch": cfg.max_batch,
              "config": args.config, "clients": args.clients, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "devices": jax.device_count(), "platform": jax.devices()[0].platform,
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(result), flush=True)
    return 0
