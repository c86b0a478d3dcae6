"""Utility of a checkpoint: perplexity on held-out clean text and log-likelihood multiple choice.

**Perplexity.** Each document is scored as training sees it: after an end-of-sequence token (what
precedes a document in the packed training stream) and followed by one, so every token of the
text and the closing eos is predicted. Documents longer than `chunk_tokens` are cut into
non-overlapping windows, each seen without the previous one. A tagged model puts some of its
probability on the harm tag, which never occurs in clean text, and would look worse than an
untagged one for it; `perplexity_tag_removed` removes the tag's mass at every position and
renormalises the rest (log p(t) - log(1 - p(tag))). For a model without the tag both are equal.

**Multiple choice** (a local JSONL file, one item a line):

    {"id": "capital-1", "question": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0}

`question` (non-empty string), `choices` (at least two non-empty strings), `answer` (0-based
index into choices); `id` optional (default FILE:LINE, unique); other fields are ignored. Each
choice is scored as the log-likelihood of `separator + choice` after the question (tokenized
together; the continuation is what follows the longest shared prefix of the two tokenizations),
with the tag's mass removed like the perplexity unless `tag_removed` is off. `accuracy` picks the
choice with the highest log-likelihood per UTF-8 byte of the continuation (length-normalised, so
long answers are not penalised for their length; comparable across tokenizers); `accuracy_raw`
the highest summed log-likelihood. A question too long for the model keeps its last tokens
(counted in `truncated`). A bad line is a one-line error naming FILE:LINE.

Both run a jitted forward over fixed-shape batches of rows, the sums per row taken on device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import weakref
from collections.abc import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safejax import errors, parallel
from safejax.data import sources
from safejax.evals import stats

SUMS = ("logprob", "logprob_tag_removed", "tag_mass")


class TokenScorer:
    """Sums of per-token log-probabilities over rows of token ids, by a jitted forward pass.

    logits_fn(params, tokens (b, L), positions (b, L), segment_ids (b, L)) -> logits (b, L, vocab),
    segment 0 marking padding. A row is ids (L + 1,): position i predicts ids[i + 1], counted where
    weights[i] > 0.
    """

    def __init__(self, logits_fn: Callable, params, tag_id: int | None, context: int, batch_size: int = 8,
                 batch_multiple: int = 1):
        self.params, self.tag_id, self.context = params, tag_id, context
        self.batch_size = -(-max(1, batch_size) // batch_multiple) * batch_multiple
        self._sums = jax.jit(functools.partial(_row_sums, logits_fn, tag_id))

    @classmethod
    def of(cls, generator, batch_size: int) -> TokenScorer:
        """The decoder of a Generator (safejax.inference.generate), on its mesh; one per generator
        and batch size, so perplexity and multiple choice share the compiled programs."""
        cache = _SCORERS.setdefault(generator, {})
        if batch_size not in cache:
            loaded = generator.loaded
            graphdef, state = nnx.split(loaded.model)

            def logits_fn(state, tokens, positions, segments):
                with parallel.using(loaded.mesh, loaded.rules):
                    return nnx.merge(graphdef, state)(tokens, positions, segments)

            cache[batch_size] = cls(logits_fn, state, generator.tag_id, loaded.context, batch_size,
                                    parallel.data_parallel_size(loaded.mesh, loaded.rules))
        return cache[batch_size]

    def row_sums(self, ids: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Per row: "logprob" (sum of log p of the counted targets), "logprob_tag_removed" (the
        same with the tag's mass removed and renormalised) and "tag_mass" (sum of p(tag))."""
        rows, width = ids.shape
        if width - 1 > self.context:
            raise ValueError(f"rows of {width - 1} inputs exceed the model's context of {self.context}")
        pad = -rows % self.batch_size
        ids = np.concatenate([ids, np.zeros((pad, width), np.int32)]).astype(np.int32)
        weights = np.concatenate([weights, np.zeros((pad, width - 1), np.float32)]).astype(np.float32)
        parts = jax.device_get([self._sums(self.params, ids[s:s + self.batch_size], weights[s:s + self.batch_size])
                                for s in range(0, len(ids), self.batch_size)])  # all dispatched, then read
        return {k: np.concatenate([p[k] for p in parts]).astype(np.float64)[:rows] for k in SUMS}


_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _row_sums(logits_fn, tag_id, params, ids, weights):
    inputs, targets = ids[:, :-1], ids[:, 1:]
    segments = (inputs != 0).astype(jnp.int32)  # id 0 is padding, never a token (seqio; interop moves a real one)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    logits = logits_fn(params, inputs, positions, segments).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    lp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
    if tag_id is None:
        removed, p_tag = lp, jnp.zeros_like(lp)
    else:
        tag_lp = logits[..., tag_id] - lse
        removed, p_tag = lp - jnp.log(-jnp.expm1(tag_lp)), jnp.exp(tag_lp)
    counted = weights > 0
    total = lambda x: jnp.sum(jnp.where(counted, x * weights, 0.0), axis=1)  # noqa: E731 (NaN-safe on padding)
    return {"logprob": total(lp), "logprob_tag_removed": total(removed), "tag_mass": total(p_tag)}


# ---- perplexity ----

def _windows(documents: Sequence[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of length + 1 ids: each document cut into windows of `length` predicted tokens."""
    ids, weights = [], []
    for doc in documents:
        for start in range(0, len(doc) - 1, length):
            piece = doc[start:start + length + 1]
            row = np.zeros(length + 1, np.int32)
            row[:len(piece)] = piece
            w = np.zeros(length, np.float32)
            w[:len(piece) - 1] = 1.0
            ids.append(row)
            weights.append(w)
    return np.asarray(ids, np.int32).reshape(-1, length + 1), np.asarray(weights, np.float32).reshape(-1, length)


def token_perplexity(scorer: TokenScorer, documents: Sequence[list[int]], chunk_tokens: int,
                     max_tokens: int) -> dict:
    """Perplexity of token documents (each starting with the token it is predicted after), at
    most `max_tokens` predicted tokens in all, the last document cut to fit."""
    taken, tokens, truncated = [], 0, False
    for doc in documents:
        if tokens >= max_tokens:
            truncated = True
            break
        if len(doc) - 1 > max_tokens - tokens:
            doc, truncated = doc[:max_tokens - tokens + 1], True
        taken.append(doc)
        tokens += len(doc) - 1
    if not tokens:
        raise errors.UserError("perplexity: no tokens to score (no documents, or max_tokens is 0)")
    length = min(chunk_tokens or scorer.context, scorer.context)
    sums = scorer.row_sums(*_windows(taken, length))
    nll, nll_removed = -sums["logprob"].sum() / tokens, -sums["logprob_tag_removed"].sum() / tokens
    return {"perplexity": float(np.exp(nll)), "perplexity_tag_removed": float(np.exp(nll_removed)),
            "tokens": tokens, "documents": len(taken), "mean_tag_probability": float(sums["tag_mass"].sum() / tokens),
            "tag": scorer.tag_id is not None, "chunk_tokens": length, "truncated": truncated}


@gin.configurable
def perplexity(generator, texts: Sequence[str], *, max_tokens: int = 65536, chunk_tokens: int = 0,
               batch_size: int = 8) -> dict:
    """Perplexity of the generator's model on `texts` (plain and with the harm tag's mass removed).

    Returns {"perplexity", "perplexity_tag_removed", "tokens" (predicted), "documents" (scored),
    "empty_documents", "mean_tag_probability", "tag", "chunk_tokens", "truncated" (max_tokens
    reached)}. chunk_tokens 0: the model's context.
    """
    eos = generator.vocabulary.eos_id
    documents, empty = [], 0
    for text in texts:
        ids = generator.encode(text)
        if ids:
            documents.append([eos, *ids, eos])
        else:
            empty += 1
    return {**token_perplexity(TokenScorer.of(generator, batch_size), documents, chunk_tokens, max_tokens),
            "empty_documents": empty}


# ---- clean text ----

@gin.configurable
def clean_texts(source: str, *, validation_permille: int = 20, max_documents: int = 0) -> list[str]:
    """Held-out clean documents: a score-folder directory (`safejax data split`) gives the
    validation split of its score_0 documents, by the same id hash as training (so
    `validation_permille` must be the training's, 20 by default); a .jsonl(.gz) file gives each
    record's `text`; any other file its blank-line-separated paragraphs. max_documents 0: all."""
    if os.path.isdir(source):
        texts = _score_folder_texts(source, validation_permille, max_documents)
    elif os.path.isfile(source):
        texts = _jsonl_texts(source) if source.endswith((".jsonl", ".jsonl.gz")) else _plain_texts(source)
    else:
        raise errors.UserError(f"clean text source not found: {source}")
    texts = texts[:max_documents] if max_documents > 0 else texts
    if not texts:
        raise errors.UserError(f"clean text source {source} holds no documents")
    return texts


def _score_folder_texts(split_dir: str, validation_permille: int, max_documents: int) -> list[str]:
    from safejax.data import split

    source = sources.JsonlDataSource(split.score_files(split_dir, 0, 0), validation_permille, scored=True)
    texts = []
    for ex in source.get_dataset("validation", shuffle=False).as_numpy_iterator():
        texts.append(ex["text"].decode("utf-8"))
        if len(texts) == max_documents:
            break
    return texts


def _lines(path: str):
    """(line number, decoded line) of the non-blank lines; undecodable text names its line."""
    with sources.open_file(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise errors.UserError(f"{path}:{number}: not UTF-8 (byte {e.start})") from None
            if line.strip():
                yield number, line


def _json_object(path: str, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise errors.UserError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise errors.UserError(f"{path}:{number}: a line must be a JSON object")
    return record


def _jsonl_texts(path: str) -> list[str]:
    texts = []
    for number, line in _lines(path):
        text = _json_object(path, number, line).get("text")
        if not isinstance(text, str) or not text.strip():
            raise errors.UserError(f"{path}:{number}: field 'text' must be a non-empty string")
        texts.append(text)
    return texts


def _plain_texts(path: str) -> list[str]:
    with sources.open_file(path, "r") as f:
        text = f.read()
    return [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


# ---- multiple choice ----

@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int


def read_multiple_choice(path: str) -> list[ChoiceItem]:
    """The items of a multiple-choice JSONL file (format in the module docstring)."""
    if not os.path.isfile(path):
        raise errors.UserError(f"multiple-choice file not found: {path}")
    items, seen = [], {}
    for number, line in _lines(path):
        record = _json_object(path, number, line)
        where = f"{path}:{number}"
        question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise errors.UserError(f"{where}: field 'question' must be a non-empty string")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise errors.UserError(f"{where}: field 'choices' must be a list of at least two non-empty strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise errors.UserError(f"{where}: field 'answer' must be an index into choices (0..{len(choices) - 1}), "
                                   f"got {answer!r}")
        item_id = record.get("id", f"{os.path.basename(path)}:{number}")
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
            raise errors.UserError(f"{where}: field 'id' must be a non-empty string or an integer")
        if str(item_id) in seen:
            raise errors.UserError(f"{where}: id {item_id!r} already used on line {seen[str(item_id)]}")
        seen[str(item_id)] = number
        items.append(ChoiceItem(str(item_id), question, tuple(choices), answer))
    if not items:
        raise errors.UserError(f"{path}: no multiple-choice items")
    return items


def _continuation(encode, eos: int, question: str, continuation: str) -> tuple[list[int], int]:
    """[eos] + the tokens of question + continuation, and where the continuation's tokens start."""
    context, whole = encode(question), encode(question + continuation)
    shared = 0
    while shared < min(len(context), len(whole)) and context[shared] == whole[shared]:
        shared += 1
    shared = min(shared, len(whole) - 1)  # at least one continuation token
    return [eos, *whole], 1 + shared


def choice_loglikelihoods(scorer: TokenScorer, encode, eos: int, items: Sequence[ChoiceItem], separator: str = " ",
                          tag_removed: bool = True) -> tuple[list[list[float]], list[list[int]], int]:
    """Per item and choice: the continuation's log-likelihood and its length in UTF-8 bytes;
    and how many rows had their question cut to fit the context."""
    rows, starts, owners = [], [], []
    for item in items:
        for choice in item.choices:
            ids, start = _continuation(encode, eos, item.question, separator + choice)
            rows.append(ids)
            starts.append(start)
            owners.append(item.id)
    truncated = sum(len(r) - 1 > scorer.context for r in rows)
    width = 1 + min(scorer.context, -(-(max(len(r) for r in rows) - 1) // 32) * 32)  # few compiled shapes
    ids = np.zeros((len(rows), width), np.int32)
    weights = np.zeros((len(rows), width - 1), np.float32)
    for j, (row, start, owner) in enumerate(zip(rows, starts, owners)):
        cut = max(0, len(row) - width)  # drop the question's first tokens; the continuation stays whole
        if start - cut < 1:
            raise errors.UserError(f"multiple choice: a choice of item {owner!r} is longer than the model's "
                                   f"context of {scorer.context} tokens")
        row = row[cut:]
        ids[j, :len(row)] = row
        weights[j, start - cut - 1:len(row) - 1] = 1.0
    sums = scorer.row_sums(ids, weights)["logprob_tag_removed" if tag_removed else "logprob"]
    scores, lengths, j = [], [], 0
    for item in items:
        k = len(item.choices)
        scores.append([float(s) for s in sums[j:j + k]])
        lengths.append([len((separator + c).encode("utf-8")) for c in item.choices])
        j += k
    return scores, lengths, truncated


@gin.configurable
def multiple_choice(generator, path: str, *, separator: str = " ", tag_removed: bool = True,
                    batch_size: int = 8) -> dict:
    """Accuracy of the generator's model on a multiple-choice JSONL file, with bootstrap CIs.

    Returns {"accuracy" (length-normalised), "ci", "n", "per_item": {id: 0/1}, "accuracy_raw",
    "ci_raw", "per_item_raw", "truncated", "tag_removed", "file"}.
    """
    items = read_multiple_choice(path)
    scorer = TokenScorer.of(generator, batch_size)
    scores, lengths, truncated = choice_loglikelihoods(scorer, generator.encode, generator.vocabulary.eos_id, items,
                                                       separator, tag_removed)
    per_item, per_item_raw = {}, {}
    for item, s, n in zip(items, scores, lengths):
        per_item[item.id] = float(int(np.argmax(np.asarray(s) / np.asarray(n))) == item.answer)
        per_item_raw[item.id] = float(int(np.argmax(s)) == item.answer)
    norm, raw = stats.rate_summary(per_item), stats.rate_summary(per_item_raw)
    return {"accuracy": norm["rate"], "ci": norm["ci"], "n": len(items), "per_item": per_item,
            "accuracy_raw": raw["rate"], "ci_raw": raw["ci"], "per_item_raw": per_item_raw, "truncated": truncated,
            "tag_removed": tag_removed, "file": path}
