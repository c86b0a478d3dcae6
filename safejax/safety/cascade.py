"""The scoring cascade: the encoder's first layers and a linear exit head clear windows that are
clearly safe, and only the others run the whole classifier.

Most of a web corpus is clean prose, and the whole 6-layer encoder on every 254-token window is
what makes scoring slow on a CPU. The first `exit_layer` layers cost `exit_layer / num_layers`
of a window, and a window the exit keeps resumes from their hidden states
(Scorer.cascade_probs_ids), so every window cleared is time saved. A logistic regression on
their mean-pooled output, fitted after training on the training split (label >= 1 against 0),
gives each window an exit score. A window is cleared when
its exit score is below a threshold chosen on the validation split so that at most `max_miss` of
the validation windows the whole classifier puts at score >= 3 would be cleared: the miss is set
by the user, measured, and written into the export beside the threshold. A cleared window gets
`cleared_probs`, the mean calibrated probabilities of the validation windows the exit clears, so
the document rule reads it as the low-scoring window it is.

Only documents of at least `min_windows` windows go through the first stage (safejax score's
DocumentScorer). A short document's score rests on its one or two windows, so a cleared window
there is a missed document, while a long one keeps its other windows and the document rule; and
short documents hold few of a corpus's windows (2.9% of the bundled corpus's are in documents of
under 3), so scoring them whole costs little (benchmarks/PEERS.md). The threshold is still chosen
per window, on snippets and document windows alike: the miss it bounds is the exit's.

A lexical first stage (bag of word pieces) was measured first and cleared too little at a 1%
miss (benchmarks/PEERS.md); the encoder's own early layers see the same context the classifier
does.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np

from safejax import errors

HARMFUL_LEVEL = 3  # what a cleared window must not be: the full classifier's P(score >= 3) >= 0.5


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CascadeConfig:
    """`exit_layer`: encoder layers of the first stage (0: no cascade is fitted); `max_miss`: the
    share of validation windows at score >= 3 the first stage may clear; `min_windows`: the
    fewest windows a document needs for its windows to go through the first stage."""

    exit_layer: int = 2
    max_miss: float = 0.01
    min_windows: int = 3
    regularization: float = 1.0  # inverse L2 strength (sklearn's C) of the exit head
    train_examples: int = 6000  # a seeded sample of the training split fits the head (384 weights)

    def __post_init__(self):
        if self.exit_layer < 0 or not 0.0 <= self.max_miss < 1.0 or self.min_windows < 1:
            raise errors.UserError(f"CascadeConfig: exit_layer must be >= 0, max_miss in [0, 1) and min_windows "
                                   f">= 1, got {self.exit_layer}, {self.max_miss}, {self.min_windows}")


def fit_exit_head(features: np.ndarray, labels: np.ndarray, regularization: float, seed: int) -> dict:
    """Logistic regression of "score >= 1" on pooled early-layer features (balanced classes)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=regularization, class_weight="balanced", max_iter=2000, random_state=seed)
    model.fit(features, np.asarray(labels) >= 1)
    return {"weights": model.coef_[0].astype(float).tolist(), "bias": float(model.intercept_[0])}


def exit_scores(features: np.ndarray, head: dict) -> np.ndarray:
    """The exit head's logit of "score >= 1" for each row of pooled features."""
    return features @ np.asarray(head["weights"], np.float32) + np.float32(head["bias"])


def in_long_documents(owner: np.ndarray, min_windows: int) -> np.ndarray:
    """Which windows (each one's document index in `owner`) belong to documents of at least
    `min_windows` windows: those the first stage may clear."""
    owner = np.asarray(owner, np.int64)
    if not len(owner):
        return np.zeros(0, bool)
    return np.bincount(owner)[owner] >= min_windows


def harmful(probs: np.ndarray) -> np.ndarray:
    """Windows the whole classifier puts at score >= HARMFUL_LEVEL (calibrated P >= 0.5)."""
    return probs[:, HARMFUL_LEVEL:].sum(-1) >= 0.5


def choose_threshold(scores: np.ndarray, probs: np.ndarray, max_miss: float) -> float:
    """The highest exit-score threshold (clear below it) that clears at most `max_miss` of the
    windows the full classifier calls harmful; -inf (clear nothing) when there are none."""
    positive = np.sort(scores[harmful(probs)])
    if not len(positive):
        return float("-inf")
    allowed = int(np.floor(max_miss * len(positive)))  # this many may fall below the threshold
    return float(positive[allowed])


def summary(scores: np.ndarray, probs: np.ndarray, threshold: float, labels: np.ndarray | None = None) -> dict:
    """What the cascade does on a set of windows: the share cleared, and the harmful windows
    (by the full classifier, and by label where given) it clears."""
    cleared = scores < threshold
    bad = harmful(probs)
    out = {"windows": int(len(scores)), "cleared": float(cleared.mean()) if len(scores) else 0.0,
           "harmful_windows": int(bad.sum()), "missed": int((cleared & bad).sum()),
           "miss_rate": float((cleared & bad).sum() / bad.sum()) if bad.any() else None}
    if labels is not None:
        labeled_bad = np.asarray(labels) >= HARMFUL_LEVEL
        out["labeled_harmful"] = int(labeled_bad.sum())
        out["labeled_missed"] = int((cleared & labeled_bad).sum())
    return out


def fit(cfg: CascadeConfig, train_features: np.ndarray, train_labels: np.ndarray,
        validation_features: np.ndarray, validation_probs: np.ndarray, seed: int,
        validation_labels: np.ndarray | None = None) -> dict:
    """The cascade record an export carries: exit layer, head, threshold, cleared probabilities,
    and its measured effect on the validation windows."""
    head = fit_exit_head(train_features, train_labels, cfg.regularization, seed)
    scores = exit_scores(validation_features, head)
    threshold = choose_threshold(scores, validation_probs, cfg.max_miss)
    cleared = scores < threshold
    cleared_probs = (validation_probs[cleared].mean(0) if cleared.any()
                     else np.eye(validation_probs.shape[1])[0])
    return {"exit_layer": cfg.exit_layer, "head": head, "threshold": threshold, "max_miss": cfg.max_miss,
            "min_windows": cfg.min_windows,
            "cleared_probs": [float(p) for p in cleared_probs],
            "validation": summary(scores, validation_probs, threshold, validation_labels)}


def fit_export(model_dir: str, cfg: CascadeConfig, train_texts: list[str], train_labels: np.ndarray,
               validation_texts: list[str], validation_labels: np.ndarray, clean_documents: list[str],
               seed: int, batch_size: int = 32, validation_probs: np.ndarray | None = None) -> dict | None:
    """Fits the cascade of a calibrated export and writes it into its classifier.json: the head
    on a sample of the training split, the threshold on the validation examples and the windows
    of the clean validation documents (what a corpus mostly is). `validation_probs`: the whole
    encoder's calibrated probabilities of those examples and windows, in that order, where
    calibration already computed them (calibration.calibrate_export). None when exit_layer is 0."""
    from safejax.safety.classifier_export import update_export_record
    from safejax.safety.scoring import SCORE_DTYPE, DocumentScorer

    if cfg.exit_layer == 0:
        update_export_record(model_dir, cascade=None)
        return None
    scorer = DocumentScorer(model_dir, batch_size=batch_size, cascade=False, dtype=SCORE_DTYPE)
    if cfg.exit_layer >= scorer.scorer.cfg.encoder.num_layers:
        raise errors.UserError(f"CascadeConfig.exit_layer={cfg.exit_layer} must be below the encoder's "
                               f"{scorer.scorer.cfg.encoder.num_layers} layers")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(train_texts), min(len(train_texts), cfg.train_examples), replace=False))
    encode = lambda texts: [e.ids for e in scorer.scorer.tokenizer.encode_batch(list(texts))]
    train_rows = encode([train_texts[i] for i in keep])
    doc_rows, _ = scorer.windows(clean_documents)
    rows = encode(validation_texts) + doc_rows
    labels = np.concatenate([np.asarray(validation_labels), np.zeros(len(doc_rows), np.int64)])
    if validation_probs is None:
        validation_probs = scorer.scorer.probs_ids(rows)
    elif len(validation_probs) != len(rows):
        raise ValueError(f"{len(validation_probs)} validation probabilities for {len(rows)} rows")
    record = fit(cfg, scorer.scorer.pooled_ids(train_rows, cfg.exit_layer), np.asarray(train_labels)[keep],
                 scorer.scorer.pooled_ids(rows, cfg.exit_layer), validation_probs, seed, labels)
    update_export_record(model_dir, cascade=record)
    return record
