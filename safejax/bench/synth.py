"""Synthesis throughput, through `safejax synth`'s own code (synth/run.synthesize).

    safejax bench synth [--delay_ms 200] [--records 320] [--docs 200] [--checkpoint DIR]

Endpoint: a local OpenAI-compatible server on 127.0.0.1 that answers every chat request with a
well-formed rephrasing after a fixed delay, so the figures measure the client, not a model:
`records_per_sec_c1` (one request in flight, records/20 records at most) and
`records_per_sec_c32` (32 in flight, --records records); the target is c32 >= 20x c1.
Template: `template_records_per_sec` over --docs documents of the bundled corpus (each given
score 2, cut into pieces as a run would), and `template_gated_records_per_sec` with the
classifier gate on (the classifier also judges the template's sentences): --checkpoint, or the
pretrained all-MiniLM-L6-v2 encoder with a seeded random head (speed does not depend on the
head's values). Model loading and compilation are not timed. Only counts and rates are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from safejax import config
from safejax.bench.local_chat import LocalChatServer, completion
from safejax.data import sources
from safejax.safety.openai_client import ChatEndpoint
from safejax.synth import run as synth


def fixed_delay_server(delay_s: float) -> LocalChatServer:
    """Chat completions on 127.0.0.1 that each take `delay_s`, answered by many threads at once."""
    reply = completion("A careful, safe retelling of the document.",
                       usage={"prompt_tokens": 100, "completion_tokens": 10})
    return LocalChatServer(lambda body, auth: (200, reply, {}, delay_s))


def _write_inputs(path: str, texts: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"bench-{i}", "text": text, "score": 2}) + "\n")
    return path


def _settings(backend: str, concurrency: int = 1, endpoint: ChatEndpoint | None = None,
              classifier: str | None = None) -> synth.Settings:
    base = synth.settings_from_gin("rephrase", None)
    cfg = synth.SynthConfig(backend=backend, concurrency=concurrency, progress_bar=False, role_pairs=base.cfg.role_pairs)
    return synth.Settings("rephrase", cfg, endpoint, classifier)


def endpoint_rate(url: str, concurrency: int, records: int, tmp: str) -> float:
    inputs = _write_inputs(os.path.join(tmp, f"c{concurrency}.jsonl"), [f"Document {i}." for i in range(records)])
    endpoint = ChatEndpoint(base_url=url, model="bench", max_retries=0, timeout_s=30.0)
    summary = synth.synthesize(_settings("endpoint", concurrency, endpoint), [inputs], os.path.join(tmp, f"out-c{concurrency}"))
    assert summary["kept"] == records, summary
    return summary["records_per_sec"]


WARMUP_DOCS = 8


def template_rate(texts: list[str], tmp: str, name: str, classifier: str | None = None) -> float:
    inputs = _write_inputs(os.path.join(tmp, f"{name}.jsonl"), texts)
    settings = _settings("template", classifier=classifier)
    producer = synth.Producer(settings)
    if classifier:  # compile every bucket before timing
        producer.gate.scorer.scorer.compile()
        warmup = _write_inputs(os.path.join(tmp, f"{name}-warmup.jsonl"), texts[:WARMUP_DOCS])
        synth.synthesize(settings, [warmup], os.path.join(tmp, name + "-warmup"), producer)
    summary = synth.synthesize(settings, [inputs], os.path.join(tmp, name), producer)
    return summary["records_per_sec"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safejax bench synth", description=__doc__.splitlines()[0])
    parser.add_argument("--delay_ms", type=float, default=200.0, help="the local server's reply delay")
    parser.add_argument("--records", type=int, default=320, help="records at concurrency 32 (c1: a sixteenth)")
    parser.add_argument("--docs", type=int, default=200, help="bundled-corpus documents for the template backend")
    parser.add_argument("--checkpoint", help="classifier export for the gated template run")
    args = parser.parse_args(argv)
    config.parse(["synth/default.gin"], [])
    server = fixed_delay_server(args.delay_ms / 1000)
    texts = [r["text"] for r in sources.iter_records(sources.bundled_corpus_files())][:args.docs]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            c1 = endpoint_rate(server.url, 1, max(4, args.records // 16), tmp)
            c32 = endpoint_rate(server.url, 32, args.records, tmp)
        finally:
            server.close()
        template = template_rate(texts, tmp, "template")
        if args.checkpoint:
            model = args.checkpoint
        else:
            from safejax.bench.score import export_minilm

            model = export_minilm(os.path.join(tmp, "classifier"))
        gated = template_rate(texts, tmp, "gated", classifier=model)
    print(json.dumps({"records_per_sec_c1": c1, "records_per_sec_c32": c32, "c32_over_c1": round(c32 / c1, 1),
                      "delay_ms": args.delay_ms, "template_records_per_sec": template,
                      "template_gated_records_per_sec": gated, "template_docs": len(texts)}))
    return 0
