"""The demo's classifier evaluation: the snippet test split, the classifier against the two
baselines of `safejax classifier-eval` (alt-profanity-check, TF-IDF + logistic regression).

Why not the whole classifier-eval: its document and judge sections score every held-out
document and all 1,319 GSM8K answers, minutes on 2 cores that the demo's budget does not have.
`safejax classifier-eval --workdir DIR/classifier` gives them for the same classifier.
"""

from __future__ import annotations

import os

import numpy as np

from safejax.safety import classifier_eval, labeled
from safejax.safety.resumable import write_json

FILE = "eval_snippets.json"


def evaluate(workdir: str, batch_size: int = 32) -> dict:
    """Writes WORKDIR/eval_snippets.json ({"model", "baselines", "split"}) and returns it; the
    data and split are those of the bound LabeledDataConfig (the training run's)."""
    from safejax.safety.classifier_export import Scorer

    cfg = labeled.LabeledDataConfig()
    splits, _ = labeled.load(cfg)
    train_texts = [e.text for e in splits["train"]]
    train_labels = np.array([e.score for e in splits["train"]], int)
    test = splits["test"]
    texts, truth = [e.text for e in test], np.array([e.score for e in test], int)
    predictions = {
        "model": Scorer(os.path.join(workdir, "model"), batch_size=batch_size).probs(texts).argmax(-1),
        "profanity": classifier_eval.profanity_predictions(texts, train_labels),
        "tfidf_lr": classifier_eval.tfidf_lr_model(train_texts, train_labels, cfg.seed).predict(texts),
    }
    report = {"model": classifier_eval.metrics(truth, predictions["model"]),
              "baselines": {name: classifier_eval.metrics(truth, predictions[name])
                            for name in ("profanity", "tfidf_lr")},
              "split": {"name": "test", "n": len(test), "seed": cfg.seed, "sources": list(cfg.sources),
                        "train_n": len(train_labels)}}
    write_json(os.path.join(workdir, FILE), report)
    return report
