"""What each synthesis job reads, as Items (synth/jobs.py) with every per-record choice made.

rephrase, refuseweb: documents in a score range (default 1-3 and 4-5), from
  - a split directory of `safejax data split` (SPLIT_DIR, its score_N folders), or
  - corpus JSONL files plus `--scores` shards of `safejax score` (joined by id, maximum wins), or
  - JSONL files whose records carry their own integer `score`.
moral: RefuseWeb dialogues (`turns`), from refuseweb output directories (DIR/refuseweb.jsonl and
  the Beam job's DIR/part-*/refuseweb.jsonl) or JSONL files.

A malformed line, or a document with no score, is quarantined with its file and line
(data/quarantine.py); the run goes on. Long documents are cut into pieces (synth/pieces.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import tensorflow as tf

from safejax import errors
from safejax.data import scores as scores_lib
from safejax.data import sources, split
from safejax.data.quarantine import QUARANTINE
from safejax.safety import resumable
from safejax.synth import pieces
from safejax.synth.jobs import Item, Job, cache_key, pick


@dataclasses.dataclass
class Counts:
    read: int = 0  # valid input records
    out_of_range: int = 0
    no_score: int = 0


def _is_split_dir(path: str) -> bool:
    return (tf.io.gfile.isdir(path) and tf.io.gfile.exists(os.path.join(path, sources.MANIFEST))
            and tf.io.gfile.isdir(os.path.join(path, split.FOLDER.format(0))))


def input_files(job: Job, inputs: Sequence[str], score_range: tuple[int, int]) -> list[str]:
    """The files a job reads; an error naming the input when there is nothing to read."""
    if job.name == "moral":
        patterns = []
        for path in inputs:
            if tf.io.gfile.isdir(path):
                found = tf.io.gfile.glob(os.path.join(path, "refuseweb.jsonl")) + \
                    tf.io.gfile.glob(os.path.join(path, "part-*", "refuseweb.jsonl"))
                if not found:
                    raise errors.UserError(f"{path} holds no refuseweb.jsonl: write it with `safejax synth refuseweb`")
                patterns += sorted(found)
            else:
                patterns.append(path)
        files = sources.expand_files(patterns)
    elif len(inputs) == 1 and _is_split_dir(inputs[0]):
        files = split.score_files(inputs[0], *score_range)
    else:
        if any(tf.io.gfile.isdir(p) for p in inputs):
            raise errors.UserError(f"{job.name} --input takes a split directory of `safejax data split` or JSONL "
                                   f"files; {[p for p in inputs if tf.io.gfile.isdir(p)][0]} is another directory")
        files = sources.expand_files(inputs)
    if resumable.count_lines(files) == 0:
        what = "dialogues" if job.name == "moral" else f"documents scored {score_range[0]}-{score_range[1]}"
        raise errors.UserError(f"no {what} in {', '.join(inputs)}")
    return files


def read_score_table(score_files: Sequence[str] | None, score_range: tuple[int, int]) -> dict[str, int] | None:
    if not score_files:
        return None
    table = scores_lib.read_scores(list(score_files))
    low, high = score_range
    if not any(low <= s <= high for s in table.values()):
        raise errors.UserError(f"no document of the score shards is scored {low}-{high}")
    return table


def _records(files: Sequence[str], kind: str) -> Iterator[tuple[str, int, dict]]:
    """(file, line, record) of every valid record; bad lines go to the quarantine."""
    for path in files:
        with sources.open_file(path) as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    record = sources.parse_json_line(raw.rstrip(b"\r\n"), path, line_no, kind)
                    if record is not None:
                        yield path, line_no, record


def _dialogue_text(turns: list[dict], roles: tuple[str, str]) -> str:
    return "\n".join(f"{roles[t['role'] == 'assistant']}: {t['text']}" for t in turns)


@dataclasses.dataclass(frozen=True)
class ItemMaker:
    """Turns input records into Items: pieces, style and role choices, cache keys."""
    job: Job
    prompt_sha: str
    backend: str
    model: str
    styles: tuple[str, ...]
    role_pairs: tuple[tuple[str, str], ...]
    seed: int
    piece_chars: int
    score_range: tuple[int, int]

    def items(self, files: Sequence[str], table: dict[str, int] | None, counts: Counts) -> Iterator[Item]:
        kind = "dialogue" if self.job.name == "moral" else "text"
        for path, line, record in _records(files, kind):
            counts.read += 1
            source_id = str(record["id"])
            if self.job.name == "moral":
                yield self._moral_item(source_id, record)
                continue
            score = table.get(source_id) if table is not None else record.get("score")
            if not sources.is_score(score):
                counts.no_score += 1
                QUARANTINE.add("no_score", (path, line), file=path, line=line, id=source_id,
                               detail="no score in the score shards" if table is not None else "no integer 'score' field")
                continue
            if not self.score_range[0] <= score <= self.score_range[1]:
                counts.out_of_range += 1
                continue
            texts = pieces.cut(record["text"], self.piece_chars)
            style = pick(self.styles, self.seed, "style", source_id) if self.job.name == "rephrase" else None
            for i, text in enumerate(texts):
                roles = tuple(pick(self.role_pairs, self.seed, "roles", source_id, i))
                yield Item(self._key(source_id, i), source_id, i, len(texts), text, score, style=style, roles=roles)

    def _key(self, source_id: str, piece: int) -> str:
        return cache_key(self.prompt_sha, self.backend, self.model, source_id, piece)

    def _moral_item(self, source_id: str, record: dict) -> Item:
        named = record.get("roles") if isinstance(record.get("roles"), dict) else {}
        roles = (str(named.get("user") or "User"), str(named.get("assistant") or "Assistant"))
        provenance = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
        score = record.get("score") if sources.is_score(record.get("score")) else provenance.get("score_after")
        turns = tuple({"role": t["role"], "text": t["text"]} for t in record["turns"])
        category = provenance.get("category") if isinstance(provenance.get("category"), str) else None
        return Item(self._key(source_id, 0), source_id, 0, 1, _dialogue_text(list(turns), roles),
                    score if sources.is_score(score) else None, roles=roles, turns=turns, category=category)
