"""The three synthesis jobs and what flows through them: an Item to produce (one piece of one
input record) and the Outcome a backend returns for it."""

from __future__ import annotations

import dataclasses
import hashlib
import json


@dataclasses.dataclass(frozen=True)
class Job:
    name: str  # the command: rephrase, refuseweb, moral
    kind: str  # the data kind it writes (a task of data/tasks.py)
    output: str  # its records' file in the output directory
    prompt_file: str
    score_range: tuple[int, int] | None  # the input documents it takes (moral: any dialogue)
    record: str  # "text" or "turns": the field of its records that data/tasks.py reads


JOBS = {
    "rephrase": Job("rephrase", "rephrased", "rephrased.jsonl", "synth/rephrase.md", (1, 3), "text"),
    "refuseweb": Job("refuseweb", "refuseweb", "refuseweb.jsonl", "synth/refuseweb.md", (4, 5), "turns"),
    "moral": Job("moral", "moral_education", "moral_education.jsonl", "synth/moral.md", None, "text"),
}


def cache_key(prompt_sha: str, backend: str, model: str, source_id: str, piece: int) -> str:
    """What a record is made from; a rerun skips every key its directory already holds."""
    return hashlib.sha256(json.dumps([prompt_sha, backend, model, source_id, piece]).encode()).hexdigest()[:32]


def pick(options, seed: int, *parts) -> object:
    """One of `options` chosen by a seeded hash of `parts` (a record's id): stable across runs,
    machines and orders, unlike Python's hash()."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


@dataclasses.dataclass(frozen=True)
class Item:
    """One piece of one input record, with every choice made for it."""
    key: str
    source_id: str
    piece: int  # 0-based
    pieces: int
    text: str  # the piece; moral: the dialogue written out as "NAME: text" lines
    score_before: int | None
    style: str | None = None  # rephrase
    roles: tuple[str, str] = ("User", "Assistant")  # refuseweb: chosen; moral: the input's
    turns: tuple = ()  # moral: the input dialogue's turns
    category: str | None = None  # moral: the input dialogue's, when its provenance names one


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A backend's product for an item: `output` (text, or turns), or why there is none."""
    output: str | list | None = None
    category: str | None = None  # the template backend's topic category
    repaired: bool = False
    error: str = ""
    raw: str = ""
    repair_raw: str = ""
    failed: bool = False  # the request failed (retried by a rerun), as opposed to an invalid reply
    tokens_in: int = 0
    tokens_out: int = 0
