"""How a document becomes classifier windows, and how its windows' scores become its score.

Two document rules, both over each window's calibrated P(score >= k), k = 1..5 (its "tails"):
  - "max" (PAPER.md §1): the highest window decides, whatever the document's length. With ~100
    windows a document, a 1% false-positive rate a window is a ~60% rate a document.
  - "calibrated" (the default of a trained export): for each k, P_doc(score >= k) =
    sigmoid(a_k * logit(max window tail) + c_k * log(windows) + d_k), fitted on validation
    documents (fit_document_rule), so a long clean document needs a higher peak to be flagged
    than a snippet, while one clearly unsafe passage still flags a long one. The tails are made
    non-increasing in k, the integer score is the number of levels reached in a row, each at its
    threshold (0.5, the median score, unless the export fitted others), and the continuous score
    is the expected score, sum_k P_doc(score >= k).

Pure Python and numpy, so that the PyTorch peer benchmark (benchmarks/peers/hf_score.py) runs the very
same rule without importing JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from safejax.safety.rubric import NUM_SCORES


def window_spans(word_ids: Sequence[int | None], window: int, overlap: int) -> list[tuple[int, int]]:
    """Token spans [start, end) of at most `window` tokens that cut between words, each starting
    at least `overlap` tokens before the previous one ends (a word longer than a window is cut).

    `word_ids` are the tokenizer's word of each token (tokenizers.Encoding.word_ids).
    """
    n = len(word_ids)
    if n <= window:
        return [(0, n)]

    def word_start(i: int) -> int:  # the first token of the word holding token i
        while 0 < i and word_ids[i] is not None and word_ids[i - 1] == word_ids[i]:
            i -= 1
        return i

    spans, start = [], 0
    while True:
        end = n if start + window >= n else max(word_start(start + window), start + 1)
        spans.append((start, end))
        if end == n:
            return spans
        start = max(word_start(max(end - overlap, 0)), start + 1)


LEVELS = NUM_SCORES - 1  # tails P(score >= k) for k = 1..5
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DocumentScore:
    score: int                 # integer 0-5
    expected_score: float      # continuous, 0-5: sum of p_at_least
    p_at_least: np.ndarray     # (5,) P(score >= k), k = 1..5, non-increasing
    probs: np.ndarray          # (6,) the deciding (highest-tail) window's probabilities
    windows: int


def tails(probs: np.ndarray) -> np.ndarray:
    """(..., 6) probabilities -> (..., 5) P(score >= k) for k = 1..5."""
    return np.cumsum(probs[..., ::-1], axis=-1)[..., ::-1][..., 1:]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def document_features(probs: np.ndarray, owner: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Per document: the highest window tail of each level (count, 5), the number of windows
    (count,), and the index of the deciding window (the highest expected score)."""
    bounds = np.searchsorted(owner, np.arange(count + 1))
    window_tails = tails(probs)
    peaks, sizes, deciding = np.zeros((count, LEVELS)), np.zeros(count), []
    for i in range(count):
        mine = window_tails[bounds[i]:bounds[i + 1]]
        peaks[i], sizes[i] = mine.max(axis=0), len(mine)
        deciding.append(bounds[i] + int(mine.sum(axis=1).argmax()))
    return peaks, sizes, deciding


def rule_tails(rule: dict, peaks: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(docs, 5) document P(score >= k) under `rule` ({"kind": "max"} or a fitted one)."""
    if rule.get("kind", "max") == "max":
        out = peaks
    elif rule["kind"] == "calibrated":
        coef = np.asarray(rule["coef"], np.float64)  # (5, 3): a_k, c_k, d_k
        z = coef[:, 0] * _logit(peaks) + coef[:, 1] * np.log(np.maximum(sizes, 1))[:, None] + coef[:, 2]
        out = 1.0 / (1.0 + np.exp(-z))
    else:
        raise ValueError(f"unknown document rule {rule.get('kind')!r}")
    return np.minimum.accumulate(out, axis=1)  # P(>= k+1) <= P(>= k)


def document_scores(probs: np.ndarray, owner: np.ndarray, count: int, rule: dict | None = None) -> list[DocumentScore]:
    """Each of `count` documents' score from the probabilities of all windows and each window's
    document (ascending). "max" keeps the paper's rule exactly: the highest argmax over the
    windows (and its P(score >= k) the windows' peaks)."""
    rule = rule or {"kind": "max"}
    thresholds = np.asarray(rule.get("thresholds", [0.5] * LEVELS))
    peaks, sizes, deciding = document_features(probs, owner, count)
    doc_tails = rule_tails(rule, peaks, sizes)
    results = []
    bounds = np.searchsorted(owner, np.arange(count + 1))
    for i in range(count):
        if rule.get("kind", "max") == "max":
            score = int(probs[bounds[i]:bounds[i + 1]].argmax(axis=1).max())
        else:  # the levels reached in a row, each at its own threshold
            score = int(np.cumprod(doc_tails[i] >= thresholds).sum())
        results.append(DocumentScore(score, float(doc_tails[i].sum()), doc_tails[i], probs[deciding[i]],
                                     int(sizes[i])))
    return results


def fit_document_rule(peaks: np.ndarray, sizes: np.ndarray, labels: np.ndarray) -> dict:
    """The "calibrated" rule fitted on labeled documents: one logistic regression per level on
    (logit of the peak window tail, log windows). A level no document reaches keeps the peak."""
    from sklearn.linear_model import LogisticRegression

    features = np.stack([_logit(peaks), np.repeat(np.log(np.maximum(sizes, 1))[:, None], LEVELS, 1)], -1)
    coef = []
    for k in range(LEVELS):
        y = labels >= k + 1
        if y.all() or not y.any():
            coef.append([1.0, 0.0, 0.0])
            continue
        model = LogisticRegression(C=10.0, max_iter=1000).fit(features[:, k], y)
        coef.append([float(model.coef_[0, 0]), float(model.coef_[0, 1]), float(model.intercept_[0])])
    return {"kind": "calibrated", "coef": coef, "documents": int(len(labels))}


def level_shares(doc_tails: np.ndarray, thresholds) -> np.ndarray:
    """(5,) the share of documents whose integer score is >= k, k = 1..5, at `thresholds`."""
    scores = np.cumprod(doc_tails >= np.asarray(thresholds), axis=1).sum(axis=1)
    return np.array([(scores >= k).mean() for k in range(1, LEVELS + 1)])


def decision_thresholds(benign_tails: np.ndarray, false_positive_rate: float) -> list[float]:
    """Per level k, the lowest threshold on the document's P(score >= k), at least 0.5, that at
    most `false_positive_rate` of the benign (score 0) documents reach: a corpus filter's budget
    for clean text wrongly flagged, chosen on validation documents."""
    n = len(benign_tails)
    allowed = int(np.floor(false_positive_rate * n))
    out = []
    for k in range(LEVELS):
        ranked = np.sort(benign_tails[:, k])[::-1]
        edge = np.nextafter(ranked[allowed], 1.0) if allowed < n else 0.5
        out.append(float(max(0.5, edge)))
    return out
