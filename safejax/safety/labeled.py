"""Harm-labeled text for the safety classifier: one loader per file format, a deterministic split.

Each loader reads one public set in its own format (plain or gzipped) and maps its labels onto
the 0-5 rubric (safety/rubric.py). A record that cannot be used (empty text, unknown or
incomplete label, bad JSON) is set aside with its id and reason, and counted, never dropped
silently. The bundled copies (safejax/assets/labeled, sources and licenses in its SOURCES.md)
are what `safejax classifier-train` uses by default.

Split: by a hash of the normalised text, so exact duplicates (frequent across tweet sets) always
land in the same split, and the split of a text never changes when other files are added.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence

import gin

from safejax import errors
from safejax.data import sources
from safejax.safety import rubric

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "labeled")
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Example:
    id: str       # unique across sources: "<source>:<record id>"
    source: str
    text: str
    score: int    # 0-5 on the rubric


@dataclasses.dataclass
class LoadResult:
    examples: list[Example] = dataclasses.field(default_factory=list)
    set_aside: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (id, reason)

    def extend(self, other: "LoadResult") -> None:
        self.examples += other.examples
        self.set_aside += other.set_aside

    def counts(self) -> dict:
        by_source = collections.Counter(e.source for e in self.examples)
        aside = collections.Counter(i.split(":", 1)[0] for i, _ in self.set_aside)
        return {"examples": dict(by_source), "set_aside": dict(aside),
                "scores": dict(sorted(collections.Counter(e.score for e in self.examples).items()))}


def _open(path: str):
    if not os.path.isfile(path):
        raise errors.UserError(f"labeled data file not found: {path}")
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.endswith(".gz") \
        else open(path, encoding="utf-8", newline="")


def _add(result: LoadResult, source: str, record_id, text, score_fn, *label) -> None:
    ident = f"{source}:{record_id}"
    if not isinstance(text, str) or not text.strip():
        result.set_aside.append((ident, "empty or non-text text"))
        return
    try:
        score = score_fn(*label)
    except rubric.LabelError as e:
        result.set_aside.append((ident, str(e)))
        return
    result.examples.append(Example(ident, source, text, score))


def _csv_rows(path: str, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """(line number where the row ends, row) for a CSV file with a header."""
    with _open(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise errors.UserError(f"{path}: missing columns {missing}")
        for row in reader:
            yield reader.line_num, row


def load_havoc(path: str) -> LoadResult:
    """HAVOC (Prefix, Suffix, PrefixLab): the label is the prefix's, so the prefix is the text.
    Tab-separated with literal quotes (no CSV quoting)."""
    result = LoadResult()
    with _open(path) as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != ["Prefix", "Suffix", "PrefixLab"]:
            raise errors.UserError(f"{path}: expected the HAVOC header Prefix, Suffix, PrefixLab")
        for i, row in enumerate(reader, start=1):
            if len(row) != 3:
                result.set_aside.append((f"havoc:{i}", f"expected 3 fields, got {len(row)}"))
                continue
            labels = [x.strip().strip("'\"") for x in row[2].strip().strip("[]").split(",") if x.strip()]
            _add(result, "havoc", i, row[0], rubric.havoc_score, labels)
    return result


def _json_records(path: str, result: LoadResult, where: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each JSONL line; a line that is not a JSON object is set aside
    as `where:LINE` with its reason."""
    with _open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = sources.loads(line)
            except json.JSONDecodeError:
                result.set_aside.append((f"{where}:{i}", "invalid JSON"))
                continue
            except sources.LoneSurrogate as e:
                result.set_aside.append((f"{where}:{i}", str(e)))
                continue
            if not isinstance(record, dict):
                result.set_aside.append((f"{where}:{i}", "not a JSON object"))
                continue
            yield i, record


def load_openai_moderation(path: str) -> LoadResult:
    result = LoadResult()
    for i, record in _json_records(path, result, "openai_moderation"):
        flags = {k: v for k, v in record.items() if k != "prompt"}
        _add(result, "openai_moderation", i, record.get("prompt"), rubric.openai_moderation_score, flags)
    return result


def load_davidson(path: str) -> LoadResult:
    result = LoadResult()
    for line, row in _csv_rows(path, required=("class", "tweet")):
        _add(result, "davidson", row.get("") or line, row["tweet"], rubric.davidson_score, row["class"])
    return result


def load_toxigen(path: str) -> LoadResult:
    result = LoadResult()
    for line, row in _csv_rows(path, required=("text", "label")):
        _add(result, "toxigen", line, row["text"], rubric.toxigen_score, row["label"])
    return result


def load_do_not_answer(path: str) -> LoadResult:
    """Do-Not-Answer requests, JSONL {"prompt", "intents", "risk_area"}."""
    result = LoadResult()
    for i, record in _json_records(path, result, "do_not_answer"):
        _add(result, "do_not_answer", i, record.get("prompt"), rubric.do_not_answer_score, record.get("risk_area"))
    return result


def load_llm_labels(path: str) -> LoadResult:
    """The JSONL that `safejax label` writes: {"id", "text", "score", "reason", ...}. Records
    without a valid score (invalid replies it kept with their raw text) are set aside."""
    result = LoadResult()
    for i, record in _json_records(path, result, f"llm:{path}"):
        _add(result, "llm", record.get("id", i), record.get("text"), rubric.llm_score, record.get("score"))
    return result


# source name -> (loader, file name in a data directory; the bundled copies are gzipped)
SOURCES = {
    "havoc": (load_havoc, "havoc.tsv"),
    "openai_moderation": (load_openai_moderation, "openai_moderation_samples.jsonl"),
    "davidson": (load_davidson, "davidson_hate_offensive.csv"),
    "toxigen": (load_toxigen, "toxigen_seed_sentences.csv"),
    "do_not_answer": (load_do_not_answer, "do_not_answer.jsonl"),
}


def source_file(directory: str, source: str) -> str:
    name = SOURCES[source][1]
    for candidate in (name, name + ".gz"):
        if os.path.isfile(os.path.join(directory, candidate)):
            return os.path.join(directory, candidate)
    raise errors.UserError(f"no {name}(.gz) for source {source!r} in {directory}")


def _split_of(text: str, seed: int, fractions: Sequence[float]) -> str:
    key = f"{seed}\0{' '.join(text.lower().split())}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def split(examples: Sequence[Example], seed: int, fractions: Sequence[float]) -> dict[str, list[Example]]:
    """train / validation / test by a seeded hash of each normalised text (see module doc)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise errors.UserError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    out = {name: [] for name in SPLITS}
    for e in examples:
        out[_split_of(e.text, seed, fractions)].append(e)
    return out


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LabeledDataConfig:
    """Which labeled data the classifier trains and is evaluated on."""

    directory: str = ""  # "" = the bundled copies (safejax/assets/labeled)
    sources: Sequence[str] = tuple(SOURCES)
    llm_label_files: Sequence[str] = ()  # JSONL written by `safejax label`
    # Most examples kept per (source, score) in the training split (0 = all), so that one large
    # set (Davidson) does not swamp the others; validation and test are never capped.
    max_train_per_source_score: int = 0
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1)
    seed: int = 42

    def __post_init__(self):
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown:
            raise errors.UserError(f"LabeledDataConfig.sources: unknown {unknown}; known: {list(SOURCES)}")


def load(cfg: LabeledDataConfig) -> tuple[dict[str, list[Example]], LoadResult]:
    """The three splits and the load result (for its counts and set-aside records)."""
    directory = cfg.directory or BUNDLED_DIR
    result = LoadResult()
    for source in cfg.sources:
        loader, _ = SOURCES[source]
        result.extend(loader(source_file(directory, source)))
    for path in cfg.llm_label_files:
        result.extend(load_llm_labels(path))
    splits = split(result.examples, cfg.seed, cfg.split_fractions)
    if cfg.max_train_per_source_score:
        splits["train"] = cap_per_group(splits["train"], cfg.max_train_per_source_score, cfg.seed)
    return splits, result


def cap_per_group(examples: Sequence[Example], cap: int, seed: int) -> list[Example]:
    """At most `cap` examples per (source, score), a seeded sample; order kept."""
    groups = collections.defaultdict(list)
    for i, e in enumerate(examples):
        groups[(e.source, e.score)].append(i)
    keep = set()
    for key in sorted(groups):
        idx = groups[key]
        keep.update(random.Random(f"{seed}:{key}").sample(idx, cap) if len(idx) > cap else idx)
    return [e for i, e in enumerate(examples) if i in keep]
