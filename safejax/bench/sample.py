"""Decoding speed: new tokens/s for greedy (batch 1 and 8), beam search (k=4) and Safe Beam Search
(k=4, N=8) on the dimensions of an LM config (random weights: speed does not depend on them).

    safejax bench sample [--config small] [--prompt_len 32] [--new_tokens 64] [--repeats 3]

Prints one JSON line. The same dimensions run under Hugging Face transformers' `generate` with
benchmarks/peers/hf_generate.py (see benchmarks/PEERS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from flax import nnx

from safejax import config, parallel
from safejax.inference import lm as lm_lib
from safejax.inference.params import SamplingParams
from safejax.inference.safebeam import BeamSearcher
from safejax.inference.sampler import TokenSampler
from safejax.models.decoder import Decoder, DecoderConfig

HARM_TAG_ID = 4


def _timed(run, repeats: int) -> tuple[float, int]:
    """Median seconds of `repeats` runs after one warm-up (compile) run, and new tokens per run."""
    new_tokens = sum(len(o.tokens) for o in run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), new_tokens


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safejax bench sample", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk_steps", type=int, default=16, help="tokens per device loop between host checks")
    args = parser.parse_args(argv)
    config.parse([os.path.join(config.CONFIG_DIR, "lm", f"{args.config}.gin")], [])
    cfg = DecoderConfig()
    mesh, rules = parallel.build_mesh(), parallel.logical_rules()
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    lm = lm_lib.decoder_lm(model, args.prompt_len + args.new_tokens, mesh, rules)
    # The harm tag as the only stop id: it is never emitted, so every run decodes exactly
    # new_tokens (as min_new_tokens does for the peer); with random weights EOS would end beams at once.
    stop = (HARM_TAG_ID,)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(8, cfg.vocab_size - 1, size=args.prompt_len).tolist() for _ in range(8)]
    sampler = TokenSampler(lm, HARM_TAG_ID, args.chunk_steps)
    searcher = BeamSearcher(lm, HARM_TAG_ID)
    greedy = SamplingParams(strategy="greedy", max_new_tokens=args.new_tokens)
    beam = SamplingParams(strategy="beam", num_beams=4, max_new_tokens=args.new_tokens, length_penalty=0.0)
    safe = beam.replace(strategy="safebeam", expansions=8, drop_fraction=0.5)
    runs = {
        "greedy_b1": lambda: sampler.run(prompts[:1], [greedy], stop),
        "greedy_b8": lambda: sampler.run(prompts, [greedy] * 8, stop),
        "beam_k4": lambda: searcher.run(prompts[:1], [beam], stop),
        "safebeam_k4_n8": lambda: searcher.run(prompts[:1], [safe], stop),
    }
    result = {}
    for name, run in runs.items():
        seconds, tokens = _timed(run, args.repeats)
        result[name] = round(tokens / seconds, 1)
        result[f"{name}_s"] = round(seconds, 4)
        result[f"{name}_new_tokens"] = tokens
    result["safebeam_over_beam"] = round(result["safebeam_k4_n8"] / result["beam_k4"], 3)
    result.update(config=args.config, layers=cfg.num_layers, d_model=cfg.d_model, heads=cfg.num_heads,
                  kv_heads=cfg.kv_heads, mlp=cfg.mlp_dim, vocab=cfg.vocab_size, dtype=cfg.dtype,
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                  devices=jax.device_count(), platform=jax.devices()[0].platform,
                  load_avg_1m=round(os.getloadavg()[0], 2))
    print(json.dumps(result), flush=True)
    return 0
