"""Whole documents for the safety classifier: held-out evaluation sets and long training examples.

The labeled sets (safety/labeled.py) are snippets of at most a few dozen tokens, but the
classifier's job is scoring whole web documents window by window. This module supplies what the
snippets lack, all split by a seeded hash of the document id (train / validation / test), so a
document's windows never straddle training and evaluation:

  - the bundled corpus files (safejax/assets/corpus) as documents, with what each source is
    expected to score (EXPECTATIONS: most of these sources have no labels, so the bar is a share
    of documents, written down with its reason);
  - request sets (safejax/assets/prompts), benign requests beside requests for harm on the same
    topics: XSTest (benign prompts full of trigger words, "kill a Python process", and their
    unsafe contrasts) and JailbreakBench's benign behaviors with the harmful behavior each one
    mirrors. Split by prompt id like the documents: their training prompts are the hard
    negatives the labeled sets lack (benign requests with violent words) and requests for harm,
    their test prompts are never trained on;
  - any labeled JSONL a user gives ({"id", "text", "score"});
  - training examples of the length the classifier scores at: windows of the clean sources'
    training documents (score 0), the same windows with a labeled snippet spliced in (the
    snippet's score: one unsafe passage makes a window unsafe), and threads of several snippets
    (the highest of their scores).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import os
import random
from collections.abc import Sequence

import gin

from safejax import errors
from safejax.data import sources
from safejax.safety import labeled, rubric
from safejax.safety.windows import window_spans

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "prompts")
XSTEST_FILE = os.path.join(PROMPTS_DIR, "xstest_prompts.csv.gz")
JBB_FILE = os.path.join(PROMPTS_DIR, "jbb_benign_behaviors.csv.gz")
SPLITS = labeled.SPLITS

# What a held-out document of each source should score, as shares of its documents. The corpus
# sources carry no labels; these are the expectations the classifier is held to, and why:
#   - edited prose (encyclopedia articles, presidential speeches) and C4/Common Crawl pages that
#     survived those sets' own filters: almost all 0-2, almost none 4-5 (a speech about a war is
#     not harmful text);
#   - Shakespeare: violence, insults and bawdy jokes on the stage are real, so a few plays' scenes
#     may be moderate (3), few clear (4+);
#   - 4chan threads (/pol/-style boards, unfiltered): most contain slurs or group insults (3+);
#   - XSTest: labeled; its safe prompts are benign, its unsafe ones requests for harm. JBB's
#     pairs, where asked for, are evaluated with histograms and no bar.
# Each entry: (comparison, score level, share). ("share_le", 2, 0.90) = at least 90% score <= 2;
# ("max_share_ge", 4, 0.03) = at most 3% score >= 4; ("share_ge", 3, 0.80) = at least 80% score >= 3.
EXPECTATIONS = {
    "wikitext2": (("share_le", 2, 0.90), ("max_share_ge", 4, 0.03)),
    "state_union": (("share_le", 2, 0.90), ("max_share_ge", 4, 0.03)),
    "inaugural": (("share_le", 2, 0.90), ("max_share_ge", 4, 0.03)),
    "web_samples": (("share_le", 2, 0.90), ("max_share_ge", 4, 0.03)),
    "tinyshakespeare": (("max_share_ge", 4, 0.10),),
    "4chan_sample": (("share_ge", 3, 0.80),),
    "xstest_safe": (("max_share_ge", 3, 0.10),),
    "xstest_unsafe": (("share_ge", 3, 0.70),),
}


@dataclasses.dataclass(frozen=True)
class Document:
    id: str       # "<source>:<record id>"
    source: str
    text: str
    score: int | None = None  # a label where the source has one


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DocumentDataConfig:
    """Which documents the classifier trains on and is judged on, and the long training examples.

    `clean_sources` lend their training documents' windows as score-0 examples: edited prose and
    filtered web pages (the paper adds 30,000 mostly safe web documents for this), labeled 0
    without being read; their validation documents are the benign documents the decision
    thresholds are fitted on. The other corpus sources (Shakespeare, 4chan) are evaluated only,
    so the document figures include sources training never saw.
    """

    corpus_files: Sequence[str] = ()  # () = the bundled corpus
    clean_sources: Sequence[str] = ("wikitext2", "state_union", "inaugural", "web_samples")
    eval_sources: Sequence[str] = ("wikitext2", "state_union", "inaugural", "web_samples",
                                   "tinyshakespeare", "4chan_sample")
    request_sets: Sequence[str] = ("xstest",)  # of REQUEST_SETS
    request_split_fractions: Sequence[float] = (0.4, 0.2, 0.4)
    request_train_copies: int = 4  # each training prompt this many times (XSTest: 180 among ~13k examples; 0: none)
    labeled_files: Sequence[str] = ()  # user JSONL {"id", "text", "score"}, evaluated per file
    split_fractions: Sequence[float] = (0.5, 0.2, 0.3)
    seed: int = 42
    clean_windows_per_source: int = 600  # score-0 windows of each clean source's training documents
    spliced_examples: int = 2000  # clean windows with one labeled snippet inside
    thread_examples: int = 1000   # several snippets in a row, as in a forum thread
    thread_snippets: tuple[int, int] = (3, 8)

    def __post_init__(self):
        if set(self.request_sets) - set(REQUEST_SETS):
            raise errors.UserError(f"DocumentDataConfig: unknown request_sets {sorted(set(self.request_sets) - set(REQUEST_SETS))}; "
                                   f"known: {sorted(REQUEST_SETS)}")
        known = set(EXPECTATIONS) | set(self._file_sources())
        unknown = [s for s in (*self.clean_sources, *self.eval_sources) if s not in known]
        if unknown and not self.corpus_files:
            raise errors.UserError(f"DocumentDataConfig: unknown sources {unknown}; known: {sorted(known)}")

    def _file_sources(self) -> list[str]:
        return [source_name(f) for f in (self.corpus_files or sources.bundled_corpus_files())]


def source_name(path: str) -> str:
    return os.path.basename(path).split(".")[0]


def split_of(doc_id: str, seed: int, fractions: Sequence[float]) -> str:
    key = f"{seed}\0doc\0{doc_id}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def load_corpus(cfg: DocumentDataConfig) -> dict[str, dict[str, list[Document]]]:
    """{source: {split: documents}} for every corpus file's source (the file name's stem)."""
    out = {}
    for path in cfg.corpus_files or sources.bundled_corpus_files():
        name = source_name(path)
        splits = out.setdefault(name, {s: [] for s in SPLITS})
        for record in sources.iter_records([path]):
            doc = Document(f"{name}:{record['id']}", name, record["text"])
            splits[split_of(doc.id, cfg.seed, cfg.split_fractions)].append(doc)
    return out


def _csv_rows(path: str):
    """(line number, row) of a gzipped or plain CSV file with a header line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        yield from enumerate(csv.DictReader(f), start=2)


def load_xstest(path: str = XSTEST_FILE, seed: int = 42,
                fractions: Sequence[float] = (0.4, 0.2, 0.4)) -> dict[str, dict[str, list[Document]]]:
    """XSTest's prompts as {"xstest_safe" | "xstest_unsafe": {split: documents}}, scored
    rubric.REQUEST_SCORES, split by a seeded hash of the prompt id."""
    out = {f"xstest_{label}": {s: [] for s in SPLITS} for label in ("safe", "unsafe")}
    for line, row in _csv_rows(path):
        if row.get("label") not in ("safe", "unsafe") or not (row.get("prompt") or "").strip():
            raise errors.UserError(f"{path} line {line}: expected label safe/unsafe and a prompt")
        doc = Document(f"xstest:{row['id']}", f"xstest_{row['label']}", row["prompt"],
                       rubric.REQUEST_SCORES[row["label"]])
        out[doc.source][split_of(doc.id, seed, fractions)].append(doc)
    return out


def load_jbb(path: str = JBB_FILE, seed: int = 42,
             fractions: Sequence[float] = (0.4, 0.2, 0.4)) -> dict[str, dict[str, list[Document]]]:
    """JailbreakBench's benign behaviors and the harmful behavior each one mirrors, as
    {"jbb_benign" | "jbb_harmful": {split: documents}} scored rubric.REQUEST_SCORES. A pair shares
    its split (a seeded hash of the behavior's index): a contrast is trained on whole or not at all."""
    out = {f"jbb_{kind}": {s: [] for s in SPLITS} for kind in ("benign", "harmful")}
    for line, row in _csv_rows(path):
        benign, harmful = (row.get("Goal") or "").strip(), (row.get("HarmfulGoal") or "").strip()
        if not (benign and harmful and (row.get("Index") or "").strip()):
            raise errors.UserError(f"{path} line {line}: expected Index, Goal and HarmfulGoal")
        split = split_of(f"jbb:{row['Index']}", seed, fractions)
        out["jbb_benign"][split].append(Document(f"jbb:{row['Index']}:benign", "jbb_benign", benign,
                                                 rubric.REQUEST_SCORES["safe"]))
        out["jbb_harmful"][split].append(Document(f"jbb:{row['Index']}:harmful", "jbb_harmful", harmful,
                                                  rubric.REQUEST_SCORES["unsafe"]))
    return out


REQUEST_SETS = {"xstest": load_xstest, "jbb": load_jbb}


def load_requests(cfg: DocumentDataConfig) -> dict[str, dict[str, list[Document]]]:
    """{source: {split: documents}} of every request set in `cfg.request_sets`."""
    out = {}
    for name in cfg.request_sets:
        out.update(REQUEST_SETS[name](seed=cfg.seed, fractions=cfg.request_split_fractions))
    return out


def benign_requests(cfg: DocumentDataConfig, split: str) -> dict[str, list[str]]:
    """The benign (score 0) sources' `split` prompts of the request sets, as texts."""
    return {name: [d.text for d in parts[split]] for name, parts in load_requests(cfg).items()
            if all(d.score == 0 for docs in parts.values() for d in docs)}


def load_labeled_file(path: str) -> list[Document]:
    """A user's labeled documents, JSONL {"id", "text", "score" 0-5}; a bad line is an error
    naming the file and line (an evaluation set with holes would give wrong figures)."""
    docs = []
    with sources.open_file(path, "rt") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = sources.loads(line)
            except json.JSONDecodeError as e:
                raise errors.UserError(f"{path} line {line_no}: bad JSON ({e.msg})") from e
            except sources.LoneSurrogate as e:
                raise errors.UserError(f"{path} line {line_no}: {e}") from e
            if (not isinstance(record, dict) or not isinstance(record.get("text"), str)
                    or not sources.is_score(record.get("score"))):
                raise errors.UserError(f"{path} line {line_no}: expected {{\"id\", \"text\", \"score\" 0-5}}")
            docs.append(Document(f"{source_name(path)}:{record.get('id', line_no)}", source_name(path),
                                 record["text"], int(record["score"])))
    return docs


def eval_sets(cfg: DocumentDataConfig, split: str) -> dict[str, list[Document]]:
    """The documents of `split` of every evaluated source; user files are held out whole."""
    corpus = load_corpus(cfg)
    out = {name: corpus[name][split] for name in cfg.eval_sources if name in corpus}
    out.update({name: parts[split] for name, parts in load_requests(cfg).items()})
    if split != "train":
        for path in cfg.labeled_files:
            out[source_name(path)] = load_labeled_file(path)
    return out


def request_examples(cfg: DocumentDataConfig, split: str) -> list[labeled.Example]:
    """The request sets' `split` prompts as labeled examples (training prompts
    `request_train_copies` times each); the example's source is the set ("xstest", "jbb")."""
    copies = cfg.request_train_copies if split == "train" else 1
    return [labeled.Example(f"{d.id}:{c}" if c else d.id, d.id.split(":")[0], d.text, d.score)
            for name, parts in sorted(load_requests(cfg).items()) for d in parts[split] for c in range(copies)]


# ---- long training examples ----

class WindowCutter:
    """Documents cut into the windows `safejax score` scores (safety/windows.window_spans, no
    overlap), as texts: the classifier trains on what it will see."""

    def __init__(self, tokenizer, window: int):
        import tokenizers

        self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_truncation()
        self.window = window

    def __call__(self, text: str) -> list[str]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if not encoding.ids:
            return []
        spans = window_spans(encoding.word_ids, self.window, 0)
        return [text[encoding.offsets[a][0]:encoding.offsets[b - 1][1]] for a, b in spans]

    def count(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def clean_windows(cfg: DocumentDataConfig, split: str, cut) -> list[str]:
    """Texts of up to `clean_windows_per_source` windows of each clean source's `split`
    documents, a seeded sample; `cut(text)` gives a document's window texts."""
    corpus = load_corpus(cfg)
    out = []
    for name in cfg.clean_sources:
        if name not in corpus:
            raise errors.UserError(f"DocumentDataConfig.clean_sources: no corpus file for {name!r}")
        windows = [w for doc in corpus[name][split] for w in cut(doc.text)]
        rng = random.Random(f"{cfg.seed}:clean:{name}:{split}")
        out += rng.sample(windows, min(len(windows), cfg.clean_windows_per_source))
    return out


def _splice(window: str, snippet: str, room: float, rng: random.Random) -> str:
    """The snippet between two words of the window's first `room` share of words, at a random place."""
    words = window.split(" ")
    words = words[:max(1, int(len(words) * room))]
    at = rng.randrange(len(words) + 1)
    return " ".join(words[:at] + [snippet.strip()] + words[at:])


def long_examples(cfg: DocumentDataConfig, snippets: Sequence[labeled.Example], windows: Sequence[str],
                  split: str, count_tokens, budget: int) -> list[labeled.Example]:
    """Clean windows (score 0), spliced windows (the snippet's score) and threads (the maximum
    of their snippets' scores), from one split's snippets and windows only. `count_tokens(texts)`
    gives token counts; spliced windows are trimmed and threads stop so that every example fits
    `budget` tokens whole (a truncated example could lose the passage its score comes from)."""
    rng = random.Random(f"{cfg.seed}:long:{split}")
    out = [labeled.Example(f"clean:{split}:{i}", "clean_window", w, 0) for i, w in enumerate(windows)]
    if not snippets or not windows:
        return out
    fits = [s for s, n in zip(snippets, count_tokens([s.text for s in snippets])) if n < budget // 2]
    lengths = dict(zip(windows, count_tokens(list(windows))))
    for i in range(cfg.spliced_examples):
        snippet, window = rng.choice(fits), rng.choice(windows)
        room = 0.9 * (budget - count_tokens([snippet.text])[0]) / max(lengths[window], 1)
        out.append(labeled.Example(f"spliced:{split}:{i}", "spliced",
                                   _splice(window, snippet.text, min(room, 1.0), rng), snippet.score))
    low, high = cfg.thread_snippets
    for i in range(cfg.thread_examples):
        parts = rng.sample(fits, min(len(fits), rng.randint(low, high)))
        sizes = count_tokens([p.text for p in parts])
        while len(parts) > 1 and sum(sizes) + len(parts) > budget:
            parts, sizes = parts[:-1], sizes[:-1]
        out.append(labeled.Example(f"thread:{split}:{i}", "thread", "\n".join(p.text.strip() for p in parts),
                                   max(p.score for p in parts)))
    return out
