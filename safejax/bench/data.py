"""Input-pipeline throughput (read, tokenize, pack into batches): raw corpus vs the safety mixture.

    safejax bench data [--batches 800] [--seq_len 512] [--batch_size 16] [--rounds 2] [--cached]
                       [--layout score_folders|join] [--autotune]

Both run on the bundled corpus through the real seqio tasks and the trainer's batch iterator.
`raw` is the plain corpus; `safety` is the full ablation mixture (score-0 text, rephrased,
RefuseWeb, moral education, tagged unsafe text), which adds the score ranges, tag insertion,
dialogue formatting and mixture sampling. The score kinds read the corpus as `safejax data split`
writes it into score folders (the default; the split itself is done once, before timing, and not
timed), or with `--layout join` the whole corpus joined with the score shards by each task.
Two inputs are stand-ins, since the bundled corpus has neither: its score shards give each
document a score from a hash of its id (a third safe, the rest spread over 1-5), and its
synthetic records reuse corpus texts (rephrased, moral education) or cut them into two-turn
dialogues (RefuseWeb). Throughput does not depend on which documents are unsafe, only on how
many, and the tag rate is measured on real corpus text.

Throughput is the steady state: tokens over --batches batches after --warmup batches, a window
(6.5M tokens by default) spanning more than two epochs of the bundled corpus (2.9M tokens in
training), so that both streams pay their epoch restarts (each score kind holds a fraction of
the corpus and restarts more often: on a small corpus a short window would count that against
the mixture alone). The time to the first batch, when every task's shuffle buffer fills, is
reported apart (`*_first_batch_s`); the trainer overlaps it with compiling the step. On a shared
machine wall time favours the pipeline with more threads (it wins more of the cores), so the CPU
time of the whole process per token is reported too; `cpu_raw_over_safety` is the ratio in CPU.
--autotune turns tf.data's autotuner on (DataConfig.autotune, off by default) for both.

With --cached both are also measured from the Beam job's cache (data/beam_cache.py), the path
for a large corpus: the per-document steps run once, offline, and training reads tokens.

`tag_rate` is tags per taggable word over the whole bundled corpus tagged at p = 0.05 (the
`raw_tagged` task with every score in range), measured by `safejax data stats`' code.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import tempfile
import time
import zlib

import gin
import seqio

from safejax import config
from safejax.data import beam_cache, pipeline, scores, sources, split, stats, tasks
from safejax.data.quarantine import QUARANTINE


def stand_in_inputs(root: str) -> dict[str, str]:
    """Score shards and synthetic records for the bundled corpus (see the module docstring)."""
    records = list(sources.iter_records(sources.bundled_corpus_files()))

    def score(doc_id: str) -> int:
        bucket = zlib.crc32(doc_id.encode()) % 15
        return 0 if bucket < 5 else 1 + (bucket - 5) // 2

    paths = {"scores": os.path.join(root, "scores-00000-of-00001.jsonl.gz"), "split": os.path.join(root, "split")}
    scores.write_score_shard(paths["scores"], ({"id": r["id"], "score": score(r["id"])} for r in records))
    split.split_by_score(paths["split"], sources.JsonlDataSource(sources.bundled_corpus_files()), [paths["scores"]])
    kinds = {"rephrased": lambda r: {"text": r["text"]},
             "moral_education": lambda r: {"text": r["text"]},
             "refuseweb": lambda r: {"turns": [
                 {"role": "user", "text": r["text"][: len(r["text"]) // 4] or "?"},
                 {"role": "assistant", "text": r["text"][len(r["text"]) // 4:] or "."}]}}
    for kind, make in kinds.items():
        paths[kind] = os.path.join(root, f"{kind}.jsonl")
        with open(paths[kind], "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({"id": f"{kind}-{r['id']}", "kind": kind, **make(r),
                                    "provenance": {"source_id": r["id"], "stand_in": True}}) + "\n")
    return paths


def _bindings(paths: dict, seq_len: int, batch_size: int, task: str, layout: str,
              autotune: bool = False) -> list[str]:
    folders = [f"SPLIT_DIR = {paths['split']!r}"] if layout == "score_folders" else []
    return [*folders, f"DataConfig.autotune = {autotune}", f"SCORES = {[paths['scores']]!r}",
            f"REPHRASED = {[paths['rephrased']]!r}",
            f"REFUSEWEB = {[paths['refuseweb']]!r}", f"MORAL_EDUCATION = {[paths['moral_education']]!r}",
            f"MIXTURE = {task!r}", f"DataConfig.seq_len = {seq_len}",
            f"DataConfig.global_batch_size = {batch_size}", "DataConfig.eval_batches = 0"]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process: tf.data's too
    return usage.ru_utime + usage.ru_stime


def tokens_per_sec(batches: int, warmup: int) -> tuple[float, float, float]:
    """Non-padding target tokens per second of the trainer's batch stream after warm-up, the
    seconds to its first batch, and the CPU microseconds per token in the timed window."""
    start = time.perf_counter()
    stream = pipeline.train_batches(pipeline.DataConfig())
    next(stream)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(stream)
    start, cpu, tokens = time.perf_counter(), _cpu_seconds(), 0
    for _ in range(batches):
        tokens += int((next(stream)["segment_ids"] != 0).sum())
    return tokens / (time.perf_counter() - start), first, (_cpu_seconds() - cpu) / tokens * 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safejax bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=800)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cached", action="store_true",
                        help="also measure both from the Beam job's cache (runs it first, DirectRunner)")
    parser.add_argument("--layout", choices=("score_folders", "join"), default="score_folders",
                        help="how the score kinds read the corpus (see above)")
    parser.add_argument("--autotune", action="store_true", help="tf.data's autotuner on (see above)")
    args = parser.parse_args(argv)
    bindings = functools.partial(_bindings, seq_len=args.seq_len, batch_size=args.batch_size, layout=args.layout,
                                 autotune=args.autotune)
    with tempfile.TemporaryDirectory() as root:
        paths = stand_in_inputs(root)
        runs = {"raw": ("ablation_raw", []), "safety": ("ablation_full", [])}
        if args.cached:  # the corpus-scale path: per-document steps done once by the Beam job
            cache = os.path.join(root, "cache")
            for task, _ in runs.values():
                config.parse(["data/safety.gin"], bindings(paths, task=task))
                tasks.safety_data()
                beam_cache.run(task, cache, gin.config_str())
            cached = ["DataConfig.use_cached = True", f"DataConfig.cache_dirs = ({cache!r},)"]
            runs.update(raw_cached=("ablation_raw", cached), safety_cached=("ablation_full", cached))
        results, first_batch, cpu = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
        for _ in range(args.rounds):  # alternating, best of each: a shared machine's noise hits all
            for name, (task, extra) in runs.items():
                config.parse(["data/safety.gin"], bindings(paths, task=task) + extra)
                rate, first, cpu_per_token = tokens_per_sec(args.batches, args.warmup)
                results[name], first_batch[name] = max(results[name], rate), min(first_batch[name], first)
                cpu[name] = min(cpu[name], cpu_per_token)
        config.parse(["data/safety.gin"], bindings(paths, task="ablation_raw") + ["safety_data.tag_scores = (0, 5)"])
        tasks.safety_data()
        tagged = stats.task_stats(seqio.get_mixture_or_task("raw_tagged"))
    figures = {f"{name}_tokens_per_sec": round(value, 1) for name, value in results.items()}
    figures.update({f"{name}_first_batch_s": round(value, 2) for name, value in first_batch.items()})
    figures.update({f"{name}_cpu_us_per_token": round(value, 3) for name, value in cpu.items()})
    figures["safety_over_raw"] = round(results["safety"] / results["raw"], 3)
    figures["cpu_raw_over_safety"] = round(cpu["raw"] / cpu["safety"], 3)  # the same ratio in CPU time
    if args.cached:
        figures["cached_safety_over_raw"] = round(results["safety_cached"] / results["raw_cached"], 3)
        figures["cached_cpu_raw_over_safety"] = round(cpu["raw_cached"] / cpu["safety_cached"], 3)
    print(json.dumps({
        **figures,
        "tag_rate": round(tagged["tag_rate"], 5),
        "tagged_documents": tagged["tagged_documents"], "tags": tagged["tags"],
        "tagged_words": tagged["tagged_words"], "quarantined": QUARANTINE.total(),
        "layout": args.layout, "autotune": args.autotune, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "batches": args.batches,
        "rounds": args.rounds,
        "cpus": os.cpu_count()}))
    return 0
