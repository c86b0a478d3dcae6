"""Prompt sets for `safejax eval`: the bundled public sets by name, or a user's CSV/JSONL file.

Every set is a list of `Prompt(id, text, category)`. Ids are unique within a set (results and
paired comparisons are keyed by them), and a category (None where a set has none) gives the
per-category breakdowns. The bundled copies live in safejax/assets/prompts (sources and licenses
in its SOURCES.md); they hold harmful requests, so nothing here prints their text.

A user file is CSV or JSONL (optionally .gz) with a text column named by `text_column`, and
optional id and category columns; a row without its text, or an id seen twice, is a one-line
error naming the file and row.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Callable

from safejax import errors
from safejax.data import sources
from safejax.safety.documents import PROMPTS_DIR, XSTEST_FILE


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str | None = None


def _open_text(path: str) -> io.TextIOBase:
    try:
        return gzip.open(path, "rt", encoding="utf-8", newline="") if path.endswith(".gz") else \
            open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise errors.UserError(f"cannot read prompt file {path}: {e.strerror or e}") from None


def _csv_rows(path: str) -> list[dict]:
    with _open_text(path) as f:
        try:
            return list(csv.DictReader(f))
        except (csv.Error, UnicodeDecodeError) as e:
            raise errors.UserError(f"{path}: not a readable CSV file ({e})") from None


def _jsonl_rows(path: str) -> list[dict]:
    rows = []
    with _open_text(path) as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise errors.UserError(f"{path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = sources.loads(line)
        except json.JSONDecodeError as e:
            raise errors.UserError(f"{path} line {n}: not JSON ({e.msg})") from None
        except sources.LoneSurrogate as e:
            raise errors.UserError(f"{path} line {n}: {e}") from None
        if not isinstance(row, dict):
            raise errors.UserError(f"{path} line {n}: expected a JSON object")
        rows.append(row)
    return rows


def read_rows(path: str) -> tuple[list[dict], str]:
    """The file's rows and what a row number means in it (CSV rows count after the header)."""
    stem = path[:-3] if path.endswith(".gz") else path
    if stem.endswith(".csv"):
        return _csv_rows(path), "row"
    if stem.endswith((".jsonl", ".json")):
        return _jsonl_rows(path), "record"
    raise errors.UserError(f"{path}: a prompt file must be .csv or .jsonl (optionally .gz)")


def _checked(prompts: list[Prompt], path: str) -> list[Prompt]:
    seen = {}
    for n, p in enumerate(prompts, 1):
        if p.id in seen:
            raise errors.UserError(f"{path} row {n}: id {p.id!r} was already used by row {seen[p.id]}")
        seen[p.id] = n
    if not prompts:
        raise errors.UserError(f"{path}: no prompts")
    return prompts


def read_file(path: str, text_column: str, id_column: str = "id", category_column: str = "category") -> list[Prompt]:
    """A user's prompt file. Missing id column: ids are row numbers; missing category column: none."""
    rows, unit = read_rows(path)
    prompts = []
    for n, row in enumerate(rows, 1):
        if text_column not in row:
            raise errors.UserError(f"{path} {unit} {n}: no {text_column!r} field (columns: "
                                   f"{', '.join(map(str, row)) or 'none'}); name the text column with --text_column")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise errors.UserError(f"{path} {unit} {n}: {text_column!r} must be a non-empty string")
        pid = row.get(id_column)
        if pid is not None and (isinstance(pid, (dict, list, bool)) or not str(pid).strip()):
            raise errors.UserError(f"{path} {unit} {n}: {id_column!r} must be a string or a number")
        category = row.get(category_column)
        if category is not None and not isinstance(category, (str, int)):
            raise errors.UserError(f"{path} {unit} {n}: {category_column!r} must be a string")
        prompts.append(Prompt(str(pid).strip() if pid is not None else str(n), text.strip(),
                              str(category) if category not in (None, "") else None))
    return _checked(prompts, path)


# ---- the bundled sets ----

def _asset(name: str) -> str:
    return os.path.join(PROMPTS_DIR, name)


def _advbench() -> list[Prompt]:
    path = _asset("advbench_harmful_behaviors.csv.gz")
    return _checked([Prompt(f"advbench-{n}", r["goal"].strip()) for n, r in enumerate(_csv_rows(path))], path)


def _simple_safety_tests() -> list[Prompt]:
    path = _asset("simple_safety_tests.csv.gz")
    return _checked([Prompt(r["id"], r["prompts_final"].strip(), r["harm_area"]) for r in _csv_rows(path)], path)


def _do_not_answer() -> list[Prompt]:
    prompts = []
    for path in sorted(glob.glob(_asset("do_not_answer_*.jsonl.gz"))):
        area = os.path.basename(path)[len("do_not_answer_"):-len(".jsonl.gz")]
        prompts += [Prompt(f"dna-{area}-{n}", r["prompt"].strip(), area) for n, r in enumerate(_jsonl_rows(path))]
    return _checked(prompts, _asset("do_not_answer_*.jsonl.gz"))


def _xstest(label: str) -> Callable[[], list[Prompt]]:
    def load() -> list[Prompt]:
        rows = _csv_rows(XSTEST_FILE)
        return _checked([Prompt(f"xstest-{r['id']}", r["prompt"].strip(), r["type"]) for r in rows
                         if r["label"] == label], XSTEST_FILE)
    return load


def _jbb_benign() -> list[Prompt]:
    path = _asset("jbb_benign_behaviors.csv.gz")
    return _checked([Prompt(f"jbb-{r['Index']}", r["Goal"].strip(), r["Category"]) for r in _csv_rows(path)], path)


def _real_toxicity_prompts() -> list[Prompt]:
    prompts = []
    for path in sorted(glob.glob(_asset("rtp_*.txt.gz"))):
        category = os.path.basename(path)[len("rtp_"):-len(".txt.gz")]
        with _open_text(path) as f:
            lines = f.read().splitlines()
        prompts += [Prompt(f"rtp-{category}-{n}", line.strip(), category) for n, line in enumerate(lines) if line.strip()]
    return _checked(prompts, _asset("rtp_*.txt.gz"))


# name -> (loader, what it is). `kind` says how a set is prompted: requests get the completion
# templates (templates.py), continuations are continued as they are.
BUNDLED: dict[str, tuple[Callable[[], list[Prompt]], str, str]] = {
    "advbench": (_advbench, "request", "AdvBench harmful behaviors (520)"),
    "simplesafetytests": (_simple_safety_tests, "request", "SimpleSafetyTests (100, by harm area)"),
    "donotanswer": (_do_not_answer, "request", "Do-Not-Answer (939, by risk area)"),
    "xstest_unsafe": (_xstest("unsafe"), "request", "XSTest unsafe contrast prompts (200, by type)"),
    "xstest_safe": (_xstest("safe"), "request", "XSTest safe prompts with trigger words (250, by type)"),
    "jbb_benign": (_jbb_benign, "request", "JailbreakBench benign behaviors (100, by category)"),
    "rtp": (_real_toxicity_prompts, "continuation", "RealToxicityPrompts subset (700, by attribute)"),
}


def kind(name: str) -> str:
    """'request' or 'continuation'; a user file holds requests."""
    return BUNDLED[name][1] if name in BUNDLED else "request"


def load(name: str, text_column: str | None = None) -> list[Prompt]:
    """A bundled set by name, or a user file (then `text_column` is needed)."""
    if name in BUNDLED:
        return BUNDLED[name][0]()
    if os.path.isfile(name):
        if not text_column:
            raise errors.UserError(f"prompt file {name}: name its text column with --text_column")
        return read_file(name, text_column)
    raise errors.UserError(f"unknown prompt set {name!r}: choose from {', '.join(BUNDLED)} or give a CSV/JSONL file")


def set_name(name: str) -> str:
    """The name a set has in results and file names (a user file: its base name without suffixes)."""
    return name if name in BUNDLED else os.path.basename(name).split(".")[0]
