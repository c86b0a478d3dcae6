"""Generations of an eval: every case of a set under one decoding, batched, written as they finish.

Decodings are the sampler's strategies by name: greedy, sample (`num_samples` per case, each
seeded by its key), beam, safebeam (Safe Beam Search), and randomdrop (Safe Beam's search
dropping a random fraction of candidates, the control without the tag signal). Their settings
(beams, expansions, drop fraction, temperature...) are the SamplingParams gin bindings.

RUN/generations/<set>.<decoding>.jsonl gets one flushed line per finished sample, so a killed
eval resumes where it stopped: on restart a torn last line is cut off (safety/resumable.py) and
only the samples not in the file are generated. A case whose prompt and `max_new_tokens` do not
fit the model's context is recorded as skipped (counted in the results), not generated.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence

import tqdm

from safejax import errors
from safejax.evals.templates import Case
from safejax.inference.generate import Generator, Request
from safejax.inference.params import SamplingParams
from safejax.safety.resumable import read_jsonl

DECODINGS = {  # name -> the SamplingParams fields that make it what it is
    "greedy": {"strategy": "greedy"},
    "sample": {"strategy": "sample"},
    "beam": {"strategy": "beam"},
    "safebeam": {"strategy": "safebeam", "drop_mode": "tag"},
    "randomdrop": {"strategy": "safebeam", "drop_mode": "random"},
}
NEEDS_TAG = ("safebeam", "randomdrop")


def check_decodings(names: Sequence[str], has_tag: bool) -> None:
    for name in names:
        if name not in DECODINGS:
            raise errors.UserError(f"unknown decoding {name!r}: choose from {', '.join(DECODINGS)}")
        if name in NEEDS_TAG and not has_tag:
            raise errors.UserError(f"decoding {name} needs the harm tag, but the checkpoint's vocabulary has "
                                   "no <potentially unsafe content> token")


def decoding_params(gen: Generator, decoding: str, max_new_tokens: int) -> SamplingParams:
    return gen.params(**DECODINGS[decoding], max_new_tokens=max_new_tokens)


def samples_per_case(decoding: str, num_samples: int) -> int:
    return num_samples if DECODINGS[decoding]["strategy"] == "sample" else 1


def path_for(run_dir: str, set_name: str, decoding: str) -> str:
    return os.path.join(run_dir, "generations", f"{set_name}.{decoding}.jsonl")


def _seed(base: int, key: str) -> int:
    """Each sample's seed from its key, so a resumed or re-batched run draws the same samples."""
    return (base + int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")) % (1 << 31)


class Stats:
    """What a generate() call did (for the results' timings and the benchmark)."""

    def __init__(self):
        self.seconds, self.samples, self.new_tokens = 0.0, 0, 0
        self.skipped = 0  # newly recorded as too long for the context
        self.cached = 0  # found in the file (generated or skipped by an earlier run)


def generate(gen: Generator, cases: Sequence[Case], decoding: str, path: str, *, max_new_tokens: int,
             num_samples: int = 1, batch_size: int = 16, chat: bool = False, progress: bool = True,
             stats: Stats | None = None) -> dict[str, dict]:
    """Every sample of every case (key "CASE#S" -> record), generating only those not in `path`."""
    params = decoding_params(gen, decoding, max_new_tokens)
    n = samples_per_case(decoding, num_samples)
    done = {r["key"]: r for r in read_jsonl(path)}
    stats = stats or Stats()
    pending = []
    for case in cases:
        tokens = None
        for s in range(n):
            key = f"{case.key}#{s}"
            if key in done:
                stats.cached += 1
                continue
            if tokens is None:
                tokens = gen.encode_chat([{"role": "user", "content": case.text}]) if chat else gen.encode(case.text)
            pending.append((key, case, s, tokens))
    pending.sort(key=lambda item: len(item[3]))  # similar lengths share a batch: less padding
    os.makedirs(os.path.dirname(path), exist_ok=True)
    total = len(cases) * n
    with open(path, "a", encoding="utf-8") as out, \
            tqdm.tqdm(total=total, initial=total - len(pending), desc=os.path.basename(path)[:-len(".jsonl")],
                      unit=" samples", file=sys.stderr, disable=not progress) as bar:
        def write(record):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            done[record["key"]] = record
            bar.update(1)

        fits = []
        for key, case, s, tokens in pending:
            if len(tokens) + max_new_tokens > gen.loaded.context:
                stats.skipped += 1
                write(_record(key, case, s, skipped="too_long"))
            else:
                fits.append((key, case, s, tokens))
        for start in range(0, len(fits), batch_size):
            batch = fits[start:start + batch_size]
            requests = [Request(tokens, params.replace(seed=_seed(params.seed, key)), chat)
                        for key, _, _, tokens in batch]
            began = time.perf_counter()
            completions = gen.run(requests)
            stats.seconds += time.perf_counter() - began
            for (key, case, s, _), c in zip(batch, completions):
                stats.samples += 1
                stats.new_tokens += len(c.tokens)
                write(_record(key, case, s, completion=c.text, finish_reason=c.finish_reason, new_tokens=len(c.tokens)))
    return {k: done[k] for k in (f"{c.key}#{s}" for c in cases for s in range(n))}


def _record(key: str, case: Case, sample: int, **fields) -> dict:
    return {"key": key, "prompt_id": case.prompt.id, "template": case.template, "sample": sample, **fields}
