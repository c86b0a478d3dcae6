"""`safejax classifier-eval`: the classifier against two baselines on the held-out split.

Figures, as in PAPER.md §1: multiclass F1 (macro over the scores present in the held-out labels),
and binary recall / precision of "score >= 1" and "score >= 3" (R@1, R@3, P@1, P@3). Baselines:
  - profanity: the `alt-profanity-check` model (TF-IDF + linear SVM, probability >= 0.5 = profane).
    It says only profane or not, so for F1 a profane text gets the most frequent positive score of
    the training split (its best single level); R@k and P@k need no level.
  - tfidf_lr: TF-IDF (word 1-2 grams) + multinomial logistic regression with balanced class
    weights, fitted on the classifier's own training split.
Writes WORKDIR/eval.json and WORKDIR/eval.md; texts never appear in either, only ids and counts.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from safejax.safety import labeled, rubric

# PAPER.md §1, held-out set of 3,001 examples (None: not reported).
PAPER_FIGURES = {
    "Llama-Guard-3-8B": {"f1": None, "r_at_1": 0.104, "r_at_3": 0.265},
    "profanity checker": {"f1": None, "r_at_1": 0.031, "r_at_3": 0.093},
    "gte-base-en-v1.5": {"f1": 0.411, "r_at_1": 0.775, "r_at_3": 0.682},
    "gte-large-en-v1.5": {"f1": 0.453, "r_at_1": 0.885, "r_at_3": 0.656},
    "ensemble": {"f1": 0.362, "r_at_1": 0.954, "r_at_3": 0.748},
}
SYSTEMS = ("model", "profanity", "tfidf_lr")


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {"n": int(len(y_true)),
           "f1": float(f1_score(y_true, y_pred, labels=sorted(set(y_true.tolist())), average="macro",
                                zero_division=0)) if len(y_true) else 0.0,
           "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0}
    for k in (1, 3):
        truth, pred = y_true >= k, y_pred >= k
        hits = int((truth & pred).sum())
        out[f"r_at_{k}"] = hits / int(truth.sum()) if truth.any() else None
        out[f"p_at_{k}"] = hits / int(pred.sum()) if pred.any() else None
    return out


def confusion(y_true, y_pred) -> list[list[int]]:
    """rows: true score 0-5, columns: predicted score 0-5."""
    m = np.zeros((rubric.NUM_CLASSES, rubric.NUM_CLASSES), int)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m.tolist()


def profanity_predictions(texts: list[str], train_labels: np.ndarray) -> np.ndarray:
    from profanity_check import predict_prob

    positive = train_labels[train_labels > 0]
    level = int(np.bincount(positive).argmax()) if len(positive) else 1
    return np.where(predict_prob(texts) >= 0.5, level, 0)


def tfidf_lr_predictions(train_texts, train_labels, texts, seed: int) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000),
                          LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    model.fit(train_texts, train_labels)
    return model.predict(texts)


def evaluate(workdir: str, split: str = "test", batch_size: int = 32) -> dict:
    """Scores the split with WORKDIR/model and both baselines; writes eval.json and eval.md.

    The data (and so the split) comes from the bound LabeledDataConfig: the CLI parses the
    training run's WORKDIR/config.gin first, so the held-out texts are the ones training never saw.
    """
    from safejax.models.classifier import Scorer

    data_cfg = labeled.LabeledDataConfig()
    splits, _ = labeled.load(data_cfg)
    held_out = splits[split]
    texts = [e.text for e in held_out]
    y_true = np.array([e.score for e in held_out], int)
    train_texts = [e.text for e in splits["train"]]
    train_labels = np.array([e.score for e in splits["train"]], int)

    scorer = Scorer(os.path.join(workdir, "model"), batch_size=batch_size)
    probs = scorer.probs(texts)
    preds = {"model": probs.argmax(-1),
             "profanity": profanity_predictions(texts, train_labels),
             "tfidf_lr": tfidf_lr_predictions(train_texts, train_labels, texts, data_cfg.seed)}

    report = {"model": metrics(y_true, preds["model"])}
    report["baselines"] = {name: metrics(y_true, preds[name]) for name in ("profanity", "tfidf_lr")}
    report["confusion"] = {name: confusion(y_true, p) for name, p in preds.items()}
    by_source = collections.defaultdict(list)
    for i, e in enumerate(held_out):
        by_source[e.source].append(i)
    report["per_source"] = {src: {name: metrics(y_true[idx], preds[name][idx]) for name in SYSTEMS}
                            for src, idx in sorted(by_source.items())}
    report["split"] = {"name": split, "n": len(held_out), "seed": data_cfg.seed,
                       "scores": {int(k): int(v) for k, v in sorted(collections.Counter(y_true.tolist()).items())},
                       "train_n": len(train_labels)}
    report["paper"] = PAPER_FIGURES
    report["notes"] = {"f1": "macro F1 over the scores present in the held-out labels",
                       "r_at_k": "recall of true score >= k by predicted score >= k; p_at_k its precision",
                       "seq_len": scorer.cfg.seq_len}
    with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(workdir, "eval.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))
    return report


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def markdown(report: dict) -> str:
    keys = ("f1", "r_at_1", "p_at_1", "r_at_3", "p_at_3")
    header = "| system | " + " | ".join(k.replace("_at_", "@").upper() if k != "f1" else "F1" for k in keys) + " |"
    rule = "|---" * (len(keys) + 1) + "|"
    rows = [f"| ours ({report['split']['name']}, n={report['split']['n']}) | "
            + " | ".join(_fmt(report["model"][k]) for k in keys) + " |"]
    rows += [f"| {name} | " + " | ".join(_fmt(report["baselines"][name][k]) for k in keys) + " |"
             for name in ("profanity", "tfidf_lr")]
    rows += [f"| paper: {name} | " + " | ".join(_fmt(fig.get(k)) for k in keys) + " |"
             for name, fig in report["paper"].items()]
    lines = ["# Safety classifier evaluation", "", header, rule, *rows, "",
             "## Per source (R@1 / R@3 / F1)", "",
             "| source | n | " + " | ".join(SYSTEMS) + " |", "|---" * (len(SYSTEMS) + 2) + "|"]
    for src, by_system in report["per_source"].items():
        cells = [f"{_fmt(m['r_at_1'])} / {_fmt(m['r_at_3'])} / {_fmt(m['f1'])}" for m in by_system.values()]
        lines.append(f"| {src} | {by_system['model']['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Confusion matrix of ours (rows: true score 0-5, columns: predicted):", ""]
    lines += ["    " + " ".join(f"{v:6d}" for v in row) for row in report["confusion"]["model"]]
    return "\n".join(lines) + "\n"
