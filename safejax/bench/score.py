"""Scoring throughput: documents, windows and tokens per second of the safety classifier over the
bundled corpus, through `safejax score`'s own code (safety/scoring.DocumentScorer).

    safejax bench score [--checkpoint DIR] [--docs N] [--batch 32] [--overlap 32] [--warmup 16]
                        [--dtype float32|bfloat16] [--cascade on|off]

The timed part is what scoring does after loading the model: tokenize each document, cut it into
overlapping windows of the classifier's length, run the length-bucketed jit batches (sharded over
the devices), and take the maximum over each document's windows, DOCS_PER_CALL documents at a
time. Loading and compilation are not timed: every bucket is compiled and --warmup documents are
scored first. `tokens_per_sec` counts encoder tokens: those of every window including its [CLS]
and [SEP], not padding. `cpu_seconds` is the process CPU time of the timed part (all threads), a
check on a machine shared with other jobs. `full_corpus_estimate_s` is the whole bundled corpus's
window tokens at the measured tokens/s (the cost of a window is nearly linear in its tokens at
these lengths), so a `--docs` subset estimates what `safejax score` takes on all of it.

Without --checkpoint the classifier is the pretrained all-MiniLM-L6-v2 encoder of
configs/classifier/minilm.gin (256 tokens) with a seeded random 6-way head, exported the way
`safejax classifier-train` exports a trained one; throughput does not depend on the head's values.
--docs N takes documents i * total // N (i < N) of the corpus in file order, a spread over every
source. --dtype sets the encoder's compute dtype (parameters stay float32); the peer's
--dtype bfloat16 is its counterpart. `windows_sha1` digests the windows' token ids, so a run of
benchmarks/peers/hf_score.py (the Hugging Face transformers peer, see benchmarks/PEERS.md) can show it
scored the same windows. --cascade off scores every window with the whole encoder even when the
export has a cascade (safety/cascade.py); `windows_cleared` is the share its first stage cleared.
--dtype defaults to `safejax score`'s (bfloat16). --agreement then scores the same documents again
with float32 and no cascade (untimed) and reports how many documents' integer scores moved, and
the share at >= 3 under each: what the fast defaults cost against full scoring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from safejax import config
from safejax.data import sources
from safejax.models.classifier import ClassifierConfig, SafetyClassifier
from safejax.safety.classifier_export import export
from safejax.safety import scoring


def corpus_texts(docs: int | None) -> list[str]:
    """The bundled corpus in file order, or `docs` documents spread evenly over it."""
    texts = [r["text"] for r in sources.iter_records(sources.bundled_corpus_files())]
    if docs is None or docs >= len(texts):
        return texts
    return [texts[i * len(texts) // docs] for i in range(docs)]


def export_minilm(directory: str) -> str:
    """Pretrained MiniLM + a random head (seed 0), exported like a trained classifier."""
    from safejax.train import classify  # noqa: F401 (registers the configurables the gin file binds)

    config.parse(["classifier/minilm.gin"], [])
    cfg = ClassifierConfig()
    state = nnx.state(SafetyClassifier(cfg, rngs=nnx.Rngs(0))).to_pure_dict()
    return export(jax.device_get(state), cfg, os.path.join(directory, "model"))


def windows_digest(windows: list[list[int]]) -> str:
    digest = hashlib.sha1()
    for ids in windows:
        digest.update(np.asarray(ids, np.int32).tobytes() + b"|")
    return digest.hexdigest()


def score_all(scorer: scoring.DocumentScorer, texts: list[str]) -> list:
    step = scoring.DOCS_PER_CALL
    return [r for i in range(0, len(texts), step) for r in scorer.score(texts[i:i + step])]


def score_agreement(fast: list, full: list) -> dict:
    """Documents whose integer score differs between two scorings, and each one's share at >= 3."""
    a, b = np.array([d.score for d in fast]), np.array([d.score for d in full])
    return {"documents": len(a), "score_changed": int((a != b).sum()), "share_ge3": round(float((a >= 3).mean()), 4),
            "share_ge3_full": round(float((b >= 3).mean()), 4),
            "max_expected_score_diff": round(max((abs(x.expected_score - y.expected_score) for x, y in zip(fast, full)),
                                                 default=0.0), 4)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safejax bench score", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a classifier export (a training run's model/ folder)")
    parser.add_argument("--docs", type=int, help="score this many documents (default: all)")
    parser.add_argument("--batch", type=int, default=scoring.SCORE_BATCH_SIZE,
                        help="windows per classifier call (default: safejax score's)")
    parser.add_argument("--overlap", type=int, help="tokens shared by consecutive windows (default: score's)")
    parser.add_argument("--warmup", type=int, default=16, help="documents scored before timing")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=scoring.SCORE_DTYPE,
                        help=f"matmul precision (default {scoring.SCORE_DTYPE}, as safejax score)")
    parser.add_argument("--cascade", choices=("on", "off"), default="on",
                        help="the export's scoring cascade, where it has one (default on)")
    parser.add_argument("--agreement", action="store_true",
                        help="also score the documents with float32 and no cascade and compare (untimed)")
    args = parser.parse_args(argv)
    texts = corpus_texts(args.docs)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.checkpoint or export_minilm(tmp)
        scorer = scoring.DocumentScorer(model_dir, batch_size=args.batch, overlap=args.overlap,
                                         dtype=args.dtype, cascade=args.cascade == "on")
        scorer.scorer.compile()
        score_all(scorer, texts[:args.warmup])
        scorer.scorer.windows_cleared = 0
        start, cpu = time.perf_counter(), time.process_time()
        scored = score_all(scorer, texts)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if args.agreement:
            full = scoring.DocumentScorer(model_dir, batch_size=args.batch, overlap=args.overlap, dtype="float32",
                                          cascade=False)
            agreement = score_agreement(scored, score_all(full, texts))
    windows, _ = scorer.windows(texts)
    lengths = np.array([len(w) for w in windows])
    corpus_windows, _ = scorer.windows(corpus_texts(None))
    corpus_tokens = sum(map(len, corpus_windows))
    result = {"docs_per_sec": round(len(texts) / seconds, 2), "tokens_per_sec": round(lengths.sum() / seconds, 1),
              "windows_per_sec": round(len(windows) / seconds, 1), "seconds": round(seconds, 3),
              "cpu_seconds": round(cpu, 3),
              "docs": len(texts), "windows": len(windows), "tokens": int(lengths.sum()),
              "corpus_windows": len(corpus_windows), "corpus_tokens": int(corpus_tokens),
              "full_corpus_estimate_s": round(corpus_tokens / (lengths.sum() / seconds), 1),
              "batch": args.batch, "seq_len": scorer.scorer.cfg.seq_len, "overlap": scorer.overlap,
              "dtype": scorer.scorer.cfg.encoder.dtype,
              "cascade": None if scorer.scorer.cascade is None else scorer.scorer.cascade["exit_layer"],
              "windows_cleared": round(scorer.scorer.windows_cleared / max(len(windows), 1), 4),
              "model": args.checkpoint or "all-MiniLM-L6-v2 + random head", "windows_sha1": windows_digest(windows),
              "devices": jax.device_count(), "platform": jax.devices()[0].platform,
              "load_avg_1m_before": round(load_before, 2), "load_avg_1m": round(os.getloadavg()[0], 2),
              **({"agreement": agreement} if args.agreement else {})}
    print(json.dumps(result), flush=True)
    return 0
