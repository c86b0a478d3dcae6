"""`safejax score`: a corpus through the safety classifier into score shards (data/scores.py).

Long documents are cut into windows of the classifier's length that overlap by `overlap`
tokens, all windows are scored (length-bucketed, jit-compiled batches sharded over the devices,
safety/classifier_export.Scorer), and the document rule of the export (safety/windows.py: "calibrated"
by default, "max" as in PAPER.md §1 with `rule="max"`) turns them into the document's `score`
(integer 0-5), `expected_score` (continuous 0-5) and `p_at_least` (P(score >= k), k = 1..5), the
fields a filter thresholds on; `probs` are those of its highest-scoring window.

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
from safejax.safety.windows import DocumentScore, document_scores, window_spans

DEFAULT_OVERLAP = 32  # tokens shared by consecutive windows (at most a quarter of a window)
# The matmul precision of `safejax score`: bf16 inputs, f32 accumulation (what accelerators score
# in; on a CPU with AVX512-BF16 1.8x the float32 rate), agreement with float32 in
# benchmarks/PEERS.md. What depends on its scores uses it too: the calibration and the cascade fit
# (fitted on the probabilities and features scoring will see), classifier-eval's documents and
# synthesis's quality gate. The snippet metrics and the evaluation judge measure the export's float32.
SCORE_DTYPE = "bfloat16"
# Windows per classifier call. At 254-token windows 32 is the fastest on the 2-core EPYC of
# benchmarks/PEERS.md (64 took 1.8x as long: the attention scores of 64 windows, 200 MB a layer,
# no longer fit its caches; 8 and 16 were 1.1-1.2x slower).
SCORE_BATCH_SIZE = 32
DOCS_PER_CALL = 256  # documents windowed and scored together (their windows sorted by length)


class DocumentScorer:
    """Scores whole documents with a classifier export (the `model/` folder of a training run).

    Each document is tokenized once (in parallel, by the Rust tokenizer); its windows are slices
    of those ids between the encoder's special tokens, so no window is tokenized again.
    """

    def __init__(self, checkpoint: str, *, batch_size: int = SCORE_BATCH_SIZE, overlap: int | None = None, dtype: str | None = None,
                 rule: str | None = None, calibrated: bool = True, cascade: bool = True):
        """`rule`: "calibrated" or "max" (None: the export's, "max" for an export without one);
        `cascade`: the export's scoring cascade (safety/cascade.py) where it has one."""
        import tokenizers

        from safejax.safety.classifier_export import Scorer

        self.scorer = Scorer(model_dir(checkpoint), batch_size=batch_size, dtype=dtype, calibrated=calibrated,
                             cascade=cascade)
        fitted = self.scorer.record.get("document_rule") if calibrated else None
        if rule not in (None, "max", "calibrated"):
            raise errors.UserError(f"--rule must be max or calibrated, got {rule!r}")
        if rule == "calibrated" and fitted is None:
            raise errors.UserError(f"{checkpoint} has no fitted document rule; retrain it or use --rule max")
        self.rule = {"kind": "max"} if rule == "max" or fitted is None else fitted
        self.window = self.scorer.cfg.seq_len - 2  # room for [CLS] and [SEP]
        if overlap is None:
            overlap = min(DEFAULT_OVERLAP, self.window // 4)
        if not 0 <= overlap < self.window:
            raise errors.UserError(f"--overlap must be in [0, {self.window}), got {overlap}")
        self.overlap = overlap
        self._tokenizer = tokenizers.Tokenizer.from_str(self.scorer.tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._prefix, self._suffix = _special_tokens(self._tokenizer)
        if len(self._prefix) + len(self._suffix) != 2:
            raise errors.UserError(f"the classifier's tokenizer adds {self._prefix + self._suffix} around "
                                   f"a text; scoring expects a BERT-style [CLS] ... [SEP]")

    def windows(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids of every window, special tokens included, and the index of its text."""
        windows, owner = [], []
        for i, encoding in enumerate(self._tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = encoding.ids
            for start, end in window_spans(encoding.word_ids, self.window, self.overlap):
                windows.append(self._prefix + ids[start:end] + self._suffix)
                owner.append(i)
        return windows, np.asarray(owner, np.int64)

    def window_probs(self, windows: list[list[int]], owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each window's probabilities, and which ones the cascade cleared: only windows of
        documents of at least the cascade's `min_windows` windows go through its first stage."""
        cascade = self.scorer.cascade
        if not cascade or not windows:
            return self.scorer.probs_ids(windows), np.zeros(len(windows), bool)
        from safejax.safety.cascade import in_long_documents

        return self.scorer.cascade_probs_ids(windows, in_long_documents(owner, cascade.get("min_windows", 1)))

    def score(self, texts: Sequence[str]) -> list[DocumentScore]:
        windows, owner = self.windows(texts)
        return document_scores(self.window_probs(windows, owner)[0], owner, len(texts), self.rule)


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's template puts before and after a text."""
    encoding = tokenizer.encode("a", add_special_tokens=True)
    body = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
    return encoding.ids[:body[0]], encoding.ids[body[-1] + 1:]


def model_dir(checkpoint: str) -> str:
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
                progress: tqdm.tqdm | None = None, docs_per_batch: int = DOCS_PER_CALL) -> int:
    """Scores one input file into its shard (unless it exists); returns documents scored."""
    target = os.path.join(output_dir, shard_name(index, path))
    if tf.io.gfile.exists(target):
        return 0
    count = 0
    with sources.atomic_shards([target], os.path.join(output_dir, "partial")) as (out,):  # out of globs' way
        for batch in _batches(sources.iter_records([path]), docs_per_batch):
            for record, doc in zip(batch, scorer.score([r["text"] for r in batch])):
                line = {"id": str(record["id"]), "score": doc.score,
                        "expected_score": round(doc.expected_score, 4),
                        "p_at_least": [round(float(p), 6) for p in doc.p_at_least],
                        "probs": [round(float(p), 6) for p in doc.probs], "windows": doc.windows,
                        "scorer": "classifier", "rule": scorer.rule["kind"]}
                scores_lib.check_score_record(line, target, count + 1)
                out.write(json.dumps(line) + "\n")
                count += 1
            if progress is not None:
                progress.update(len(batch))
    return count


def check_manifest(output_dir: str, checkpoint: str, files: list[str], rule: str | None = None,
                   cascade: bool = True, dtype: str | None = SCORE_DTYPE) -> None:
    """One output folder, one model, rule, cascade setting, precision and input list: a rerun
    resumes, another job is refused."""
    manifest = {"checkpoint": os.path.abspath(checkpoint), "inputs": [os.path.abspath(f) for f in files],
                "rule": rule or "export", **({} if cascade else {"cascade": "off"}), "dtype": dtype or "export"}
    sources.claim_output_dir(output_dir, manifest, "scores")


def score_corpus(checkpoint: str, inputs: Sequence[str], output_dir: str, *, batch_size: int = SCORE_BATCH_SIZE,
                 overlap: int | None = None, progress_bar: bool = True, dtype: str | None = SCORE_DTYPE,
                 rule: str | None = None, cascade: bool = True) -> dict:
    """Scores every input file this process owns; returns a summary. `dtype` None or "float32"
    scores in the export's float32 (the slower reference)."""
    import jax

    files = sources.expand_files(inputs)
    # The model first: a mistyped --checkpoint must not claim the output folder for itself.
    scorer = DocumentScorer(checkpoint, batch_size=batch_size, overlap=overlap, dtype=dtype, rule=rule,
                            cascade=cascade)
    if jax.process_index() == 0:
        check_manifest(output_dir, checkpoint, files, rule, cascade, dtype)
    QUARANTINE.reset()  # the summary counts this job's records only
    QUARANTINE.write_to(os.path.join(output_dir, f"quarantine-{jax.process_index()}.jsonl"))
    mine = [(i, f) for i, f in enumerate(files) if i % jax.process_count() == jax.process_index()]
    skipped = sum(tf.io.gfile.exists(os.path.join(output_dir, shard_name(i, f))) for i, f in mine)
    with tqdm.tqdm(unit=" docs", disable=not progress_bar, desc="scoring") as bar:
        scored = sum(score_shard(scorer, i, f, output_dir, bar) for i, f in mine)
        rate = bar.format_dict["rate"]
    return {"output": os.path.abspath(output_dir), "dtype": scorer.scorer.cfg.encoder.dtype,
            "shards": len(mine), "shards_already_done": skipped,
            "documents": scored, "docs_per_sec": round(rate or 0.0, 1), "quarantined": QUARANTINE.counts()}
