"""The demo corpus, composed at demo time from the bundled files (SOURCES.md beside this module).

Why not the bundled corpus as it is: with it the RAW model is barely toxic (a floor effect: 0.7%
toxic continuations, issue 19) and its clean text is WikiText with `<unk>` placeholders. So:
  - clean prose: the clean bundled sources, WikiText detokenised with every sentence that holds
    `<unk>` left out, each document cut to `max_document_chars` at a paragraph or sentence end;
  - unsafe text: the 4chan threads and the harm-labeled snippets of the bundled labeled sets
    (score >= `min_snippet_score` on the rubric) grouped into threads of `snippets_per_document`.
Both are shared with the classifier's data, so whatever the classifier holds out for its test
split is left out here: labeled snippets by its text-hash split (safety/labeled.py), corpus
documents by its document-id split (safety/documents.py), with the seeds and fractions of the
demo's classifier config. Sampling is seeded: the same files give the same corpus.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import random
import re

from safejax import errors
from safejax.data import sources

SOURCES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "SOURCES.md")
CLEAN_SOURCES = ("state_union", "inaugural", "tinyshakespeare", "web_samples", "wikitext2")
UNSAFE_DOCUMENTS = ("4chan_sample",)
SNIPPETS = "labeled_snippets"
HELD_OUT_CLEAN = ("inaugural", "state_union", "web_samples")
HELD_OUT_FILE = "held_out_clean.jsonl"

_WIKI_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" 's", "'s"), (" n't", "n't"),
               ("( ", "("), (" )", ")"), (" ;", ";"), (" :", ":"), (" ,", ","), (" .", "."), (" !", "!"),
               (" ?", "?"), (" '", "'"), ('" ', '"'))


def clean_wikitext(text: str) -> str:
    """WikiText's tokenised prose as plain prose: headings dropped, sentences with `<unk>` left
    out, the tokenizer's spacing undone."""
    paragraphs = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or re.fullmatch(r"(= )+.*( =)+", line):
            continue
        sentences = [s for s in re.split(r"(?<= \.) ", line) if "<unk>" not in s]
        paragraph = " ".join(sentences)
        for a, b in _WIKI_JOINS:
            paragraph = paragraph.replace(a, b)
        if len(paragraph) > 40:  # not a caption or a list fragment
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


_POST_HEADER = re.compile(r"^[^\n]*?\d\d/\d\d/\d\d\(\w+\)\d\d:\d\d:\d\d \w+\.\d+:[ \t]*", re.M)
_POST_LINK = re.compile(r">>>?(\d+|/\w+/)")


def clean_4chan(text: str) -> str:
    """A thread as its posts' text: the name/date/number header of each post and the `>>123`
    links dropped. Left in, the headers are a sixth of the characters (digits) and a small LM
    learns to continue any prompt with them (the full demo of 2026-12-07: RAW's greedy
    continuations were mostly digits and punctuation)."""
    posts = (_POST_LINK.sub("", post).strip() for post in _POST_HEADER.split(text))
    return "\n\n".join(p for p in posts if p)


def cut(text: str, limit: int) -> str:
    """The text up to `limit` characters, ended at the last paragraph or sentence end before it."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    for mark in ("\n\n", "\n", ". "):
        end = head.rfind(mark)
        if end > limit // 2:
            return head[:end + (1 if mark == ". " else 0)].rstrip()
    return head.rsplit(" ", 1)[0]


def _corpus_documents(doc_cfg, test: bool) -> dict[str, list[dict]]:
    """Bundled corpus documents outside (or, `test`, inside) the classifier's document test split."""
    from safejax.safety import documents

    out = collections.defaultdict(list)
    for path in sources.bundled_corpus_files():
        name = documents.source_name(path)
        for record in sources.iter_records([path]):
            in_test = documents.split_of(f"{name}:{record['id']}", doc_cfg.seed, doc_cfg.split_fractions) == "test"
            if in_test == test:
                out[name].append({"id": str(record["id"]), "text": record["text"]})
    return out


def write_held_out_clean(path: str, cfg, doc_cfg) -> int:
    """Clean prose neither LM trains on, for perplexity: the classifier's test-split documents
    of HELD_OUT_CLEAN (left out of the demo corpus), cut like the corpus; returns the count."""
    pools = _corpus_documents(doc_cfg, test=True)
    docs = [{"id": f"{n}:{d['id']}", "text": cut(d["text"], cfg.max_document_chars)}
            for n in HELD_OUT_CLEAN for d in sorted(pools.get(n, []), key=lambda d: d["id"])]
    docs = docs[:cfg.held_out_clean_documents]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return len(docs)


def _snippet_threads(labeled_cfg, min_score: int, per_document: int, rng: random.Random) -> list[dict]:
    """Harm-labeled snippets outside the classifier's test split, grouped into threads."""
    import dataclasses

    from safejax.safety import labeled

    every = dataclasses.replace(labeled_cfg, sources=tuple(labeled.SOURCES), llm_label_files=())
    _, loaded = labeled.load(every)
    splits = labeled.split(loaded.examples, every.seed, every.split_fractions)
    snippets = [e for part in ("train", "validation") for e in splits[part] if e.score >= min_score]
    rng.shuffle(snippets)
    return [{"id": f"thread-{n}", "text": "\n".join(e.text.strip() for e in snippets[i:i + per_document]),
             "from": sorted({e.source for e in snippets[i:i + per_document]})}
            for n, i in enumerate(range(0, len(snippets), per_document))]


def compose(output_dir: str, cfg, labeled_cfg, doc_cfg) -> dict:
    """Writes OUTPUT_DIR/<source>.jsonl.gz (one file per source: one score shard each) and
    SOURCES.md with the counts; returns the counts."""
    rng = random.Random(cfg.corpus_seed)
    pools = _corpus_documents(doc_cfg, test=False)
    pools["wikitext2"] = [{**d, "text": clean_wikitext(d["text"])} for d in pools.get("wikitext2", [])]
    pools["4chan_sample"] = [{**d, "text": clean_4chan(d["text"])} for d in pools.get("4chan_sample", [])]
    pools[SNIPPETS] = _snippet_threads(labeled_cfg, cfg.min_snippet_score, cfg.snippets_per_document, rng)
    os.makedirs(output_dir, exist_ok=True)
    counts = {}
    for name, budget in sorted(cfg.corpus_chars.items()):
        if name not in pools:
            raise errors.UserError(f"DemoConfig.corpus_chars: unknown source {name!r}; known: {sorted(pools)}")
        docs = sorted(pools[name], key=lambda d: d["id"])
        random.Random(f"{cfg.corpus_seed}:{name}").shuffle(docs)
        chosen, chars = [], 0
        for d in docs:
            if chars >= budget:
                break
            text = cut(d["text"], min(cfg.max_document_chars, budget - chars + 200))
            if len(text) < 200:
                continue
            chosen.append({"id": f"{name}:{d['id']}", "source": name, "text": text})
            chars += len(text)
        path = os.path.join(output_dir, f"{name}.jsonl.gz")
        with gzip.open(path + ".tmp", "wt", encoding="utf-8") as f:
            for record in chosen:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        counts[name] = {"documents": len(chosen), "characters": chars,
                        "unk": sum("<unk>" in r["text"] for r in chosen)}
    counts["held_out_clean"] = {"documents": write_held_out_clean(os.path.join(output_dir, HELD_OUT_FILE), cfg,
                                                                  doc_cfg), "characters": 0, "unk": 0}
    with open(SOURCES_FILE, encoding="utf-8") as f:
        notes = f.read()
    table = ["", "## This corpus", "", "| source | documents | characters |", "|---|---|---|"]
    table += [f"| {n} | {c['documents']} | {c['characters']:,} |" for n, c in counts.items()]
    with open(os.path.join(output_dir, "SOURCES.md"), "w", encoding="utf-8") as f:
        f.write(notes + "\n".join(table) + "\n")
    return counts
