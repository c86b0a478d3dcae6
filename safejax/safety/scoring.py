"""`safejax score`: a corpus through the safety classifier into score shards (data/scores.py).

Long documents are cut into windows of the classifier's length that overlap by `overlap`
tokens, all windows are scored (length-bucketed, jit-compiled batches sharded over the devices,
models/classifier.Scorer), and a document's score is the maximum over its windows (PAPER.md §1:
one unsafe passage makes the document unsafe); `probs` are those of its highest-scoring window.

Malformed input records are set aside in OUTPUT/quarantine-P.jsonl with file and line. One
output shard per input file, written whole and then renamed into place, so a killed job
restarts without rescoring finished shards. With several processes each takes every n-th input.
The same per-shard work runs as an Apache Beam pipeline (safety/scoring_beam.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tqdm

from safejax import errors
from safejax.data import scores as scores_lib
from safejax.data import sources
from safejax.data.quarantine import QUARANTINE

MANIFEST = "manifest.json"


def window_texts(tokenizer, text: str, window: int, overlap: int) -> list[str]:
    """The text cut at word boundaries into spans of at most `window` tokens, each starting at
    least `overlap` tokens before the previous one ends (a word longer than a window is cut)."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    offsets, words = encoding.offsets, encoding.word_ids
    n = len(offsets)
    if n <= window:
        return [text]

    def word_start(i: int) -> int:  # the first token of the word holding token i
        while 0 < i and words[i] is not None and words[i - 1] == words[i]:
            i -= 1
        return i

    spans, start = [], 0
    while True:
        end = n if start + window >= n else max(word_start(start + window), start + 1)
        spans.append(text[offsets[start][0]:offsets[end - 1][1]])
        if end == n:
            return spans
        start = max(word_start(max(end - overlap, 0)), start + 1)


class DocumentScorer:
    """Scores whole documents with a classifier export (the `model/` folder of a training run)."""

    def __init__(self, checkpoint: str, *, batch_size: int = 64, overlap: int = 32):
        import tokenizers

        from safejax.models.classifier import Scorer

        self.scorer = Scorer(_model_dir(checkpoint), batch_size=batch_size)
        self.window = self.scorer.cfg.seq_len - 2  # room for [CLS] and [SEP]
        if not 0 <= overlap < self.window:
            raise errors.UserError(f"--overlap must be in [0, {self.window}), got {overlap}")
        self.overlap = overlap
        self._tokenizer = tokenizers.Tokenizer.from_str(self.scorer.tokenizer.to_str())
        self._tokenizer.no_truncation()

    def score(self, texts: Sequence[str]) -> list[tuple[int, np.ndarray, int]]:
        """(score, probs of the deciding window, number of windows) per text."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            pieces = window_texts(self._tokenizer, text, self.window, self.overlap)
            windows += pieces
            owner += [i] * len(pieces)
        probs = self.scorer.probs(windows)
        owner = np.asarray(owner)
        results = []
        for i in range(len(texts)):
            mine = probs[owner == i]
            labels = mine.argmax(axis=1)
            best = int(np.lexsort((mine[np.arange(len(mine)), labels], labels))[-1])
            results.append((int(labels[best]), mine[best], len(mine)))
        return results


def _model_dir(checkpoint: str) -> str:
    """A training workdir or its exported model folder."""
    inner = os.path.join(checkpoint, "model")
    return inner if tf.io.gfile.isdir(inner) else checkpoint


def shard_name(index: int, path: str) -> str:
    stem = os.path.basename(path).split(".")[0]
    return f"scores-{index:05d}-{stem}.jsonl.gz"


def _batches(records: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_shard(scorer: DocumentScorer, index: int, path: str, output_dir: str,
                progress: tqdm.tqdm | None = None, docs_per_batch: int = 256) -> int:
    """Scores one input file into its shard (unless it exists); returns documents scored."""
    target = os.path.join(output_dir, shard_name(index, path))
    if tf.io.gfile.exists(target):
        return 0
    partial, count = os.path.join(output_dir, "partial", shard_name(index, path)), 0  # out of globs' way
    tf.io.gfile.makedirs(os.path.dirname(partial))
    with sources.open_file(partial, "wt") as out:
        for batch in _batches(sources.iter_records([path]), docs_per_batch):
            for record, (score, probs, windows) in zip(batch, scorer.score([r["text"] for r in batch])):
                line = {"id": str(record["id"]), "score": score,
                        "probs": [round(float(p), 6) for p in probs], "windows": windows,
                        "scorer": "classifier"}
                scores_lib.check_score_record(line, target, count + 1)
                out.write(json.dumps(line) + "\n")
                count += 1
            if progress is not None:
                progress.update(len(batch))
    tf.io.gfile.rename(partial, target, overwrite=True)
    return count


def check_manifest(output_dir: str, checkpoint: str, files: list[str]) -> None:
    """One output folder, one model and input list: a rerun resumes, a different job is refused."""
    manifest = {"checkpoint": os.path.abspath(checkpoint), "inputs": [os.path.abspath(f) for f in files]}
    path = os.path.join(output_dir, MANIFEST)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            previous = json.load(f)
        if previous != manifest:
            raise errors.UserError(f"{output_dir} holds scores of another model or input list "
                                   f"(see {path}); use a new --output")
        return
    tf.io.gfile.makedirs(output_dir)
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(manifest, f, indent=1)


def score_corpus(checkpoint: str, inputs: Sequence[str], output_dir: str, *, batch_size: int = 64,
                 overlap: int = 32, progress_bar: bool = True) -> dict:
    """Scores every input file this process owns; returns a summary."""
    import jax

    files = sources.expand_files(inputs)
    if jax.process_index() == 0:
        check_manifest(output_dir, checkpoint, files)
    QUARANTINE.reset()  # the summary counts this job's records only
    QUARANTINE.write_to(os.path.join(output_dir, f"quarantine-{jax.process_index()}.jsonl"))
    scorer = DocumentScorer(checkpoint, batch_size=batch_size, overlap=overlap)
    mine = [(i, f) for i, f in enumerate(files) if i % jax.process_count() == jax.process_index()]
    skipped = sum(tf.io.gfile.exists(os.path.join(output_dir, shard_name(i, f))) for i, f in mine)
    with tqdm.tqdm(unit=" docs", disable=not progress_bar, desc="scoring") as bar:
        scored = sum(score_shard(scorer, i, f, output_dir, bar) for i, f in mine)
        rate = bar.format_dict["rate"]
    return {"output": os.path.abspath(output_dir), "shards": len(mine), "shards_already_done": skipped,
            "documents": scored, "docs_per_sec": round(rate or 0.0, 1), "quarantined": QUARANTINE.counts()}
