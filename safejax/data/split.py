"""`safejax data split`: the corpus written once into score folders, as the paper's pipeline keeps it.

Each score-range task (score_0, score_1_3, score_4_5 and the tagged ones) then reads only its own
documents, each carrying its score, instead of reading and parsing the whole corpus and joining
the score shards to keep a third of it. Layout:

    DIR/score_0/part-00003-of-00006.jsonl.gz     documents scored 0 from corpus shard 3
    ...
    DIR/score_5/part-00003-of-00006.jsonl.gz
    DIR/manifest.json                            the corpus shards, score shards and policy used

Records are the corpus records as read, every field kept, with their `id` (FILE:LINE when the
record had none, so ids match the join path's) and `score`. Every corpus shard gets one file in
every score folder (empty if no document of it has that score), written whole in DIR/tmp/ and
renamed into place: a rerun skips finished shards. Malformed records go to the quarantine, and a
document without a score is an error or set aside there, as `on_missing_score` says (the same
policy as the join). Train on the folders with `safety_data.split_dir` (SPLIT_DIR in
configs/data/safety.gin).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import gin
import seqio
import tensorflow as tf

from safejax import errors
from safejax.data import preprocessors, sources
from safejax.data import scores as scores_lib
from safejax.data.quarantine import QUARANTINE

FOLDER = "score_{}"
PART = "part-{:05d}-of-{:05d}.jsonl.gz"


def score_files(split_dir: str, low: int, high: int) -> list[str]:
    """The score folders' files for scores low..high; an error naming the folder if it was not
    written by `safejax data split`."""
    if not tf.io.gfile.exists(os.path.join(split_dir, sources.MANIFEST)):
        raise errors.UserError(f"split_dir {split_dir} has no {sources.MANIFEST}: write it with `safejax data split`")
    return sources.expand_files([os.path.join(split_dir, FOLDER.format(s), "*.jsonl.gz")
                                 for s in range(low, high + 1)])


def _records(source: seqio.DataSource, shard: int, shards: int):
    """Every valid record of one corpus shard (train, then validation), with its id."""
    info = seqio.ShardInfo(shard, shards)
    for split in ("train", "validation"):
        for ex in source.get_dataset(split, shuffle=False, shard_info=info).as_numpy_iterator():
            yield {**json.loads(ex["json"]), "id": ex["id"].decode()}


def _split_shard(source, table: dict[str, int], output_dir: str, shard: int, shards: int,
                 on_missing: str) -> dict[int, int]:
    finals = [os.path.join(output_dir, FOLDER.format(s), PART.format(shard, shards))
              for s in range(scores_lib.NUM_SCORES)]
    if all(tf.io.gfile.exists(path) for path in finals):
        return {}
    counts = dict.fromkeys(range(scores_lib.NUM_SCORES), 0)
    with sources.atomic_shards(finals, os.path.join(output_dir, "tmp")) as outs:
        for record in _records(source, shard, shards):
            score = table.get(record["id"], scores_lib.MISSING)
            if score == scores_lib.MISSING:
                if on_missing == "error":
                    raise errors.UserError(f"document {record['id']!r} has no score in the score shards "
                                           f"(set on_missing_score='skip' to set such documents aside)")
                QUARANTINE.add("no_score", ("split", record["id"]), task="split", id=record["id"])
                continue
            record["score"] = score
            outs[score].write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[score] += 1
    return counts


@gin.configurable
def split_by_score(output_dir: str, corpus: seqio.DataSource = gin.REQUIRED,
                   scores: Sequence[str] | None = None, on_missing_score: str = "error",
                   score_field: str = "score", cuts: Sequence[float] = scores_lib.DEFAULT_CUTS) -> dict:
    """Writes the corpus into score folders under `output_dir`; returns documents per score
    written by this run (finished shards are skipped) and the quarantine counts.

    `score_field` "score" uses the integer score; a continuous field ("expected_score", or
    "p_at_least:K") is binned by the 5 increasing `cuts` (scores.read_scores)."""
    if not scores:
        raise errors.UserError("data split needs score shards: set SCORES (split_by_score.scores)")
    preprocessors.check_missing_policy(on_missing_score)
    files = sources.expand_files(scores)
    shards = corpus.list_shards("train")
    cuts = scores_lib.check_cuts(cuts)
    policy = {"on_missing_score": on_missing_score, "score_field": score_field}
    if score_field != "score":
        policy["cuts"] = list(cuts)
    sources.claim_output_dir(output_dir, {"corpus": list(shards), "scores": files, **policy},
                             "a split")
    table = scores_lib.read_scores(files, score_field, cuts)
    for folder in (FOLDER.format(s) for s in range(scores_lib.NUM_SCORES)):
        tf.io.gfile.makedirs(os.path.join(output_dir, folder))
    totals = dict.fromkeys(range(scores_lib.NUM_SCORES), 0)
    for shard in range(len(shards)):
        for score, count in _split_shard(corpus, table, output_dir, shard, len(shards), on_missing_score).items():
            totals[score] += count
    temp = os.path.join(output_dir, "tmp")  # every shard renamed out of it: nothing to leave behind
    if tf.io.gfile.isdir(temp) and not tf.io.gfile.listdir(temp):
        tf.io.gfile.rmtree(temp)
    return {"split_dir": output_dir, "documents": {FOLDER.format(s): n for s, n in totals.items()},
            "quarantined": QUARANTINE.counts()}
