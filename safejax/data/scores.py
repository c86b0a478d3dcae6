"""Score shards: the on-disk map from document id to harmfulness score 0-5, and its join.

Format (written by `safejax score`, read here): JSONL or JSONL.gz files, one object a line:

    {"id": "doc-42", "score": 3, "probs": [0.01, 0.02, 0.1, 0.6, 0.2, 0.07],
     "categories": {"violence": 3}, "reason": "...", "scorer": "classifier"}

`id` (string) and `score` (integer 0..5) are required; `probs` (6 floats summing to 1),
`categories` (name -> 0..5), `reason` and `scorer` are optional and kept for inspection. The
classifier also writes continuous scores, `expected_score` (0..5) and `p_at_least` (P(score >= k)
for k = 1..5): `read_scores(..., field="expected_score", cuts=...)` bins one of those into
0..5 instead, with thresholds a user chose on validation data (as with FineWeb-Edu's `score`
beside its `int_score`). Files
are conventionally named `scores-00000-of-00008.jsonl.gz`, but any file list or glob works.

An id may be scored more than once (the classifier and an LLM labeler, say): the join uses the
maximum, as the paper does to favour recall. A malformed score line is an error naming its file
and line: score shards are our own output, so a bad one means a broken step, not noisy data.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf

from safejax import errors
from safejax.data import sources
from safejax.safety.rubric import NUM_SCORES

MISSING = -1  # the joined score of a document that no shard scores


def check_score_record(record, path: str, line: int) -> tuple[str, int]:
    where = f"score shard {path} line {line}"
    if not isinstance(record, dict):
        raise errors.UserError(f"{where}: expected a JSON object")
    doc_id, score = record.get("id"), record.get("score")
    if not isinstance(doc_id, str) or not doc_id:
        raise errors.UserError(f"{where}: field 'id' must be a non-empty string")
    if not sources.is_score(score):
        raise errors.UserError(f"{where}: field 'score' must be an integer 0..5, got {score!r}")
    probs = record.get("probs")
    if probs is not None and (not isinstance(probs, list) or len(probs) != NUM_SCORES
                              or abs(sum(probs) - 1.0) > 1e-3):
        raise errors.UserError(f"{where}: field 'probs' must be {NUM_SCORES} probabilities summing to 1")
    return doc_id, score


def write_score_shard(path: str, records: Iterable[dict]) -> int:
    """Writes score records (validated) to one shard; returns how many. `.gz` compresses."""
    count = 0
    with sources.open_file(path, "wt") as f:
        for count, record in enumerate(records, start=1):
            check_score_record(record, path, count)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return count


DEFAULT_CUTS = (0.5, 1.5, 2.5, 3.5, 4.5)  # expected_score rounded to the nearest integer


def check_cuts(cuts: Sequence[float]) -> tuple[float, ...]:
    cuts = tuple(float(c) for c in cuts)
    if len(cuts) != NUM_SCORES - 1 or list(cuts) != sorted(cuts):
        raise errors.UserError(f"score cuts must be {NUM_SCORES - 1} increasing thresholds, got {list(cuts)}")
    return cuts


def continuous_value(record: dict, field: str, path: str, line: int) -> float:
    """A continuous score field: a number, or `p_at_least[k]` (k = 1..5) for one level's P(score >= k)."""
    name, _, level = field.partition(":")
    value = record.get(name)
    if level:
        value = value[int(level) - 1] if isinstance(value, list) and 1 <= int(level) <= len(value) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise errors.UserError(f"score shard {path} line {line}: no number in field {field!r}")
    return float(value)


def read_scores(patterns: Sequence[str] | str, field: str = "score",
                cuts: Sequence[float] = DEFAULT_CUTS) -> dict[str, int]:
    """All shards as {id: score}, the maximum where an id is scored more than once. With another
    `field` than "score" (e.g. "expected_score", or "p_at_least:3" for P(score >= 3)), the score
    is the number of `cuts` at or below that field's value."""
    cuts = check_cuts(cuts)
    scores: dict[str, int] = {}
    for path in sources.expand_files(patterns):
        with sources.open_file(path, "rt") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = sources.loads(line)
                except json.JSONDecodeError as e:
                    raise errors.UserError(f"score shard {path} line {line_no}: bad JSON ({e.msg})") from e
                except sources.LoneSurrogate as e:
                    raise errors.UserError(f"score shard {path} line {line_no}: {e}") from e
                doc_id, score = check_score_record(record, path, line_no)
                if field != "score":
                    score = int(np.searchsorted(cuts, continuous_value(record, field, path, line_no), side="right"))
                scores[doc_id] = max(score, scores.get(doc_id, MISSING))
    return scores


@functools.lru_cache(maxsize=8)
def score_table(patterns: tuple[str, ...]) -> tf.lookup.StaticHashTable:
    """A TF hash table id -> score over the shards, built once per process and file list.

    The whole map sits in host memory (about 100 bytes an id): fine up to some hundred million
    documents a host. Beyond that, join in the Beam job (data/beam_cache.py) instead.
    """
    scores = read_scores(list(patterns))
    if not scores:
        raise errors.UserError(f"score shards {list(patterns)} hold no scores")
    keys = tf.constant(list(scores), dtype=tf.string)
    values = tf.constant(np.fromiter(scores.values(), dtype=np.int32, count=len(scores)))
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), MISSING)


# A record whose first key is a plain "id" string: anchored at the line start, so it can only be
# the top-level id. Escaped characters in the id make it not match (the line is then kept).
_LEADING_ID = r'^\{\s*"id"\s*:\s*"([^"\\]*)".*'
_ID_PREFIX_BYTES = 1024


def line_prefilter(score_files: tuple[str, ...], low: int, high: int):
    """A cheap test on raw JSONL lines: False only for a line whose leading id is scored outside
    [low, high], which the score filter would drop after parsing anyway.

    Each score-range task reads the whole corpus; this skips parsing the lines it would throw
    away (two thirds of the corpus, for most tasks). Lines whose id is not their first key, or
    not scored, are kept for the authoritative join after parsing.
    """

    table = score_table(tuple(score_files))  # built here, eagerly: `keep` runs inside tf.data

    def keep(raw: tf.Tensor) -> tf.Tensor:
        head = tf.strings.substr(raw, 0, _ID_PREFIX_BYTES)
        leading = tf.strings.regex_full_match(head, _LEADING_ID)
        doc_id = tf.strings.regex_replace(head, _LEADING_ID, r"\1")
        score = table.lookup(doc_id)
        in_range = (score >= low) & (score <= high)
        return tf.logical_not(leading) | (score == MISSING) | in_range

    return keep
