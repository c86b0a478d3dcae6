"""Calibrated window probabilities: a temperature and a per-score bias on the classifier's logits.

Training weights the scores (balanced class weights, λ on unsafe examples), which shifts the
head's probabilities toward the rare scores: good for recall, wrong as probabilities. After
training, `fit` chooses T and b minimising the unweighted negative log-likelihood of
softmax(logits / T + b) on the validation split (7 numbers; the encoder is untouched), so that
P(score >= k) means what it says and thresholds chosen on it carry over to new data. T > 0
keeps each window's ranking of scores; b restores the validation split's priors.
"""

from __future__ import annotations

import numpy as np


def apply(logits: np.ndarray, temperature: float, bias) -> np.ndarray:
    """Calibrated probabilities (..., classes) from logits."""
    z = logits / temperature + np.asarray(bias, logits.dtype)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _nll_and_grad(params: np.ndarray, logits: np.ndarray, labels: np.ndarray):
    log_t, bias = params[0], params[1:]
    t = np.exp(log_t)
    probs = apply(logits, t, bias)
    n = len(labels)
    nll = -np.log(np.maximum(probs[np.arange(n), labels], 1e-12)).mean()
    d = probs.copy()
    d[np.arange(n), labels] -= 1.0
    d /= n  # d NLL / d z, z = logits / t + bias
    grad_bias = d.sum(0)
    grad_log_t = float((d * (-logits / t)).sum())
    return nll, np.concatenate([[grad_log_t], grad_bias])


def fit(logits: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """(temperature, bias) minimising the validation NLL (L-BFGS; bias of score 0 fixed at 0,
    since a common shift changes nothing). Scores absent from `labels` get no push upward
    beyond what the others' fit gives."""
    from scipy.optimize import minimize

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    k = logits.shape[1]

    def objective(free):
        params = np.concatenate([free[:1], [0.0], free[1:]])
        nll, grad = _nll_and_grad(params, logits, labels)
        return nll, np.concatenate([grad[:1], grad[2:]])

    result = minimize(objective, np.zeros(k), jac=True, method="L-BFGS-B",
                      bounds=[(-3.0, 3.0)] + [(-20.0, 20.0)] * (k - 1))
    free = result.x
    return float(np.exp(free[0])), [0.0] + [float(b) for b in free[1:]]


# ---- fitting an export after training ----

SUBDOCS_PER_DOCUMENT = 8  # contiguous runs of windows taken from each clean validation document


def synthetic_documents(doc_windows: list[np.ndarray], inserts: np.ndarray, insert_labels: np.ndarray,
                        seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Documents for fitting the document rule, as stacks of window probabilities: runs of 1 to
    all windows of each clean document (score 0), and the same runs with one window replaced by a
    scored validation example (its score: one unsafe passage makes a document unsafe), plus every
    example alone."""
    rng = np.random.default_rng(seed)
    docs, labels = [inserts[i:i + 1] for i in range(len(inserts))], list(insert_labels)
    for windows in doc_windows:
        n = len(windows)
        for _ in range(SUBDOCS_PER_DOCUMENT):
            size = int(np.clip(np.round(np.exp(rng.uniform(0, np.log(n + 1)))), 1, n))
            start = int(rng.integers(0, n - size + 1))
            run = windows[start:start + size]
            docs.append(run)
            labels.append(0)
            pick = int(rng.integers(len(inserts)))
            spliced = run.copy()
            spliced[int(rng.integers(size))] = inserts[pick]
            docs.append(spliced)
            labels.append(int(insert_labels[pick]))
    return docs, np.asarray(labels)


def calibrate_export(model_dir: str, validation_texts: list[str], validation_labels: np.ndarray,
                     clean_documents: dict[str, list[str]], seed: int, batch_size: int = 32,
                     false_positive_rate: float | None = None,
                     benign_texts: dict[str, list[str]] | None = None) -> tuple[dict, np.ndarray]:
    """Fits the export's temperature and bias on the validation examples, then its document rule
    on synthetic documents made of clean validation documents' windows and those examples, and
    the rule's per-level thresholds. The benign sets are each clean source's validation
    documents whole and `benign_texts` (e.g. the request sets' benign validation prompts); labeled score-0
    snippets are not among them (their labels are noisy: tweets labeled "neither" are often
    crude, and a corpus filter's bar is about documents).

    Thresholds: 0.5 at every level (None: the rule's own decision, P_doc(score >= k) more likely
    than not), or, with `false_positive_rate`, the lowest that hold each benign set's documents
    to that rate at every level (a budget per source, so a small set such as the web pages is not
    hidden behind a large one; a strict filter that costs recall). Either way the record keeps
    the share of each benign set reaching each level. Writes all of it into the export's
    classifier.json and returns it, with the calibrated probabilities of the validation examples
    followed by the clean documents' windows (what the scoring cascade is fitted against)."""
    from safejax.safety.classifier_export import update_export_record
    from safejax.safety import windows as windows_lib
    from safejax.safety.scoring import SCORE_DTYPE, DocumentScorer

    scorer = DocumentScorer(model_dir, batch_size=batch_size, calibrated=False, dtype=SCORE_DTYPE)
    raw = scorer.scorer.probs(validation_texts)
    temperature, bias = fit(np.log(np.maximum(raw, 1e-12)), validation_labels)

    def calibrated_windows(texts):  # each text's stack of calibrated window probabilities
        ids, owner = scorer.windows(texts)
        probs = apply(np.log(np.maximum(scorer.scorer.probs_ids(ids), 1e-12)), temperature, bias)
        bounds = np.searchsorted(owner, np.arange(len(texts) + 1))
        return [probs[bounds[i]:bounds[i + 1]] for i in range(len(texts)) if bounds[i + 1] > bounds[i]]

    def features(stacks):  # (peak window tails, window counts) of documents given as window stacks
        owners = np.concatenate([np.full(len(d), i) for i, d in enumerate(stacks)])
        return windows_lib.document_features(np.concatenate(stacks), owners, len(stacks))[:2]

    example_probs = apply(np.log(np.maximum(raw, 1e-12)), temperature, bias)
    clean_stacks = {name: calibrated_windows(texts) for name, texts in clean_documents.items()}
    docs, labels = synthetic_documents([d for stacks in clean_stacks.values() for d in stacks], example_probs,
                                       np.asarray(validation_labels), seed)
    rule = windows_lib.fit_document_rule(*features(docs), labels)
    benign = {**clean_stacks, **{name: calibrated_windows(texts) for name, texts in (benign_texts or {}).items()}}
    benign_tails = {name: windows_lib.rule_tails(rule, *features(stacks)) for name, stacks in benign.items() if stacks}
    thresholds = [0.5] * windows_lib.LEVELS
    if false_positive_rate is not None and benign_tails:
        per_set = {name: windows_lib.decision_thresholds(t, false_positive_rate) for name, t in benign_tails.items()}
        thresholds = [float(t) for t in np.max(list(per_set.values()), axis=0)]
        rule["thresholds_per_benign_set"] = per_set
    rule["thresholds"] = thresholds
    rule["false_positive_rate"] = false_positive_rate
    rule["benign_validation_share_at_level"] = {  # documents scoring >= k, k = 1..5
        name: [float(x) for x in windows_lib.level_shares(t, thresholds)] for name, t in benign_tails.items()}
    calibration = {"temperature": temperature, "bias": bias, "examples": int(len(validation_labels))}
    update_export_record(model_dir, calibration=calibration, document_rule=rule)
    scored = np.concatenate([example_probs, *[w for stacks in clean_stacks.values() for w in stacks]])
    return {"calibration": calibration, "document_rule": rule}, scored
