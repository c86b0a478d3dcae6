"""Small hand-made safety data for tests: a corpus with malformed lines, score shards and the
synthetic kinds (rephrased, RefuseWeb dialogues, moral education), all neutral generated text."""

from __future__ import annotations

import json
import os
import random

from safejax.data import scores

WORDS = ("river stone garden window quiet morning bread letter yellow market train winter "
         "candle paper orange forest music table bridge cloud honest simple little early").split()
BAD_LINES = {  # line content -> the reason the quarantine must give
    b"{not json": "bad_json",
    b'{"id": "no-text"}': "missing_text",
    b'{"id": "blank", "text": "   "}': "empty_text",
    b'{"id": "bad-bytes", "text": "caf\xe9"}': "invalid_utf8",
    b'["a", "list"]': "not_an_object",
}


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def score_of(i: int) -> int:
    return i % 6


def write_jsonl(path: str, records, bad_every: int = 0) -> None:
    bad = list(BAD_LINES)
    with open(path, "wb") as f:
        for i, record in enumerate(records):
            f.write(json.dumps(record).encode() + b"\n")
            if bad_every and i % bad_every == bad_every - 1 and bad:
                f.write(bad.pop(0) + b"\n")


def make(root: str, documents: int = 240, unscored: int = 0) -> dict[str, str]:
    """Writes everything under `root`; returns the paths, keyed like safety_data's arguments."""
    rng = random.Random(0)
    os.makedirs(root, exist_ok=True)
    paths = {name: os.path.join(root, f"{name}.jsonl") for name in
             ("corpus", "rephrased", "refuseweb", "moral_education")}
    corpus = [{"id": f"doc-{i}", "text": " ".join(sentence(rng, rng.randint(6, 14)) for _ in range(4)),
               "url": f"https://example.org/{i}"} for i in range(documents)]
    write_jsonl(paths["corpus"], corpus, bad_every=documents // (len(BAD_LINES) + 1))
    scored = corpus[: documents - unscored]
    half = len(scored) // 2
    paths["scores"] = [os.path.join(root, f"scores-0000{k}-of-00002.jsonl.gz") for k in range(2)]
    for path, part in zip(paths["scores"], (scored[:half], scored[half:])):
        scores.write_score_shard(path, ({"id": d["id"], "score": score_of(int(d["id"][4:])),
                                         "expected_score": min(score_of(int(d["id"][4:])) + 0.3, 5.0),
                                         "scorer": "test"} for d in part))
    write_jsonl(paths["rephrased"], [{"id": f"reph-{i}", "kind": "rephrased", "text": sentence(rng, 30),
                                      "provenance": {"source_id": f"doc-{i}", "style": "textbook"}}
                                     for i in range(40)])
    dialogues = [{"id": f"refuse-{i}", "kind": "refuseweb", "provenance": {"source_id": f"doc-{i}"},
                  "turns": [{"role": "user", "text": sentence(rng, 8)},
                            {"role": "assistant", "text": sentence(rng, 20)}]} for i in range(30)]
    dialogues[0]["roles"] = {"user": "Pupil", "assistant": "Mentor"}
    write_jsonl(paths["refuseweb"], dialogues)
    write_jsonl(paths["moral_education"], [{"id": f"moral-{i}", "kind": "moral_education",
                                            "text": sentence(rng, 40)} for i in range(30)])
    return paths


def bindings(paths: dict, **extra) -> list[str]:
    """gin bindings (over configs/data/safety.gin) pointing the safety data at the files."""
    out = [f"CORPUS = {[paths['corpus']]!r}", f"SCORES = {paths['scores']!r}",
           f"REPHRASED = {[paths['rephrased']]!r}", f"REFUSEWEB = {[paths['refuseweb']]!r}",
           f"MORAL_EDUCATION = {[paths['moral_education']]!r}",
           "safety_data.shuffle_buffer_size = 64"]
    return out + [f"{k} = {v!r}" for k, v in extra.items()]
