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

from safejax.data import sources
from safejax.safety import cascade, documents, labeled, rubric

# PAPER.md §1, held-out set of 3,001 examples (None: not reported).
PAPER_FIGURES = {
    "Llama-Guard-3-8B": {"f1": None, "r_at_1": 0.104, "r_at_3": 0.265},
    "profanity checker": {"f1": None, "r_at_1": 0.031, "r_at_3": 0.093},
    "gte-base-en-v1.5": {"f1": 0.411, "r_at_1": 0.775, "r_at_3": 0.682},
    "gte-large-en-v1.5": {"f1": 0.453, "r_at_1": 0.885, "r_at_3": 0.656},
    "ensemble": {"f1": 0.362, "r_at_1": 0.954, "r_at_3": 0.748},
}
SYSTEMS = ("model", "profanity", "tfidf_lr")
BASELINE_TRAINED_ON = {"profanity": ("davidson",)}  # held-out sources a baseline saw in training
MIN_POSITIVES = 20  # an operating point must flag at least this many validation examples


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {"n": int(len(y_true)),
           "f1": float(f1_score(y_true, y_pred, labels=sorted(set(y_true.tolist())), average="macro",
                                zero_division=0)) if len(y_true) else 0.0,
           "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0}
    for k in (1, 3):
        figures = binary(y_true >= k, y_pred >= k)
        out[f"r_at_{k}"], out[f"p_at_{k}"] = figures["recall"], figures["precision"]
    return out


def confusion(y_true, y_pred) -> list[list[int]]:
    """rows: true score 0-5, columns: predicted score 0-5."""
    m = np.zeros((rubric.NUM_SCORES, rubric.NUM_SCORES), int)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m.tolist()


def profanity_predictions(texts: list[str], train_labels: np.ndarray) -> np.ndarray:
    from profanity_check import predict_prob

    positive = train_labels[train_labels > 0]
    level = int(np.bincount(positive).argmax()) if len(positive) else 1
    return np.where(predict_prob(texts) >= 0.5, level, 0)


def tfidf_lr_model(train_texts, train_labels, seed: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000),
                          LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    return model.fit(train_texts, train_labels)


def equal_precision_point(cal_true, cal_probs, cal_baseline, y_true, probs, k: int) -> dict:
    """The model at the lowest threshold on P(score >= k) whose calibration-split precision
    reaches the baseline's there (None when no threshold flagging MIN_POSITIVES does)."""
    target = binary(cal_true >= k, cal_baseline >= k)["precision"]
    out = precision_point(cal_true, cal_probs, target, y_true, probs, k)
    out["baseline_precision_on_calibration"] = out.pop("target_precision_on_calibration")
    return out


RECALL_MODE_PRECISION = 0.85  # the paper's recall intent as an operating point: the most recall at this precision


def precision_point(cal_true, cal_probs, target: float, y_true, probs, k: int) -> dict:
    """The model at the lowest threshold on P(score >= k) whose calibration-split precision
    reaches `target` (None when no threshold flagging MIN_POSITIVES does), on the held-out split."""
    cal_p = cal_probs[:, k:].sum(-1)
    threshold = None
    for t in np.unique(np.round(cal_p, 4)):
        flagged = cal_p >= t
        if flagged.sum() < MIN_POSITIVES:
            break
        if binary(cal_true >= k, flagged)["precision"] >= target:
            threshold = float(t)
            break
    out = {"target_precision_on_calibration": target, "threshold": threshold}
    if threshold is not None:
        out.update(binary(y_true >= k, probs[:, k:].sum(-1) >= threshold))
    return out


def binary(truth: np.ndarray, pred: np.ndarray) -> dict:
    hits = int((truth & pred).sum())
    return {"recall": hits / int(truth.sum()) if truth.any() else None,
            "precision": hits / int(pred.sum()) if pred.any() else None}


def evaluate(workdir: str, split: str = "test", batch_size: int = 32) -> dict:
    """Scores the split with WORKDIR/model and both baselines; writes eval.json and eval.md.

    The data (and so the split) comes from the bound LabeledDataConfig: the CLI parses the
    training run's WORKDIR/config.gin first, so the held-out texts are the ones training never saw.
    """
    from safejax.safety.classifier_export import Scorer

    data_cfg = labeled.LabeledDataConfig()
    splits, _ = labeled.load(data_cfg)
    train_texts = [e.text for e in splits["train"]]
    train_labels = np.array([e.score for e in splits["train"]], int)
    scorer = Scorer(os.path.join(workdir, "model"), batch_size=batch_size)
    tfidf = tfidf_lr_model(train_texts, train_labels, data_cfg.seed)

    def systems(examples):
        texts = [e.text for e in examples]
        probs = scorer.probs(texts)
        return probs, {"model": probs.argmax(-1), "profanity": profanity_predictions(texts, train_labels),
                       "tfidf_lr": tfidf.predict(texts)}

    held_out, calibration = splits[split], splits["validation"]
    y_true = np.array([e.score for e in held_out], int)
    probs, preds = systems(held_out)
    if scorer.cascade:  # a snippet is a one-window document, which scoring keeps out of the cascade
        rows = [e.ids for e in scorer.tokenizer.encode_batch([e.text for e in held_out])]
        through_probs, test_cleared = scorer.cascade_probs_ids(rows)
    cal_probs, cal_preds = systems(calibration)
    sources = np.array([e.source for e in held_out])

    report = {"model": metrics(y_true, preds["model"])}
    report["baselines"] = {name: metrics(y_true, preds[name]) for name in ("profanity", "tfidf_lr")}
    report["confusion"] = {name: confusion(y_true, p) for name, p in preds.items()}
    report["per_source"] = {src: {name: metrics(y_true[sources == src], preds[name][sources == src])
                                  for name in SYSTEMS} for src in sorted(set(sources.tolist()))}
    cal_true = np.array([e.score for e in calibration], int)
    cal_sources = np.array([e.source for e in calibration])
    report["unseen"] = {}
    for name, seen in BASELINE_TRAINED_ON.items():
        keep, cal_keep = ~np.isin(sources, seen), ~np.isin(cal_sources, seen)
        report["unseen"][name] = {
            "excluded_sources": list(seen), "model": metrics(y_true[keep], preds["model"][keep]),
            name: metrics(y_true[keep], preds[name][keep]),
            "at_equal_precision": {f"k{k}": equal_precision_point(
                cal_true[cal_keep], cal_probs[cal_keep], cal_preds[name][cal_keep],
                y_true[keep], probs[keep], k) for k in (1, 3)}}
    report["at_equal_precision"] = {
        name: {f"k{k}": equal_precision_point(cal_true, cal_probs, cal_preds[name], y_true, probs, k)
               for k in (1, 3)} for name in ("profanity", "tfidf_lr")}
    report["at_equal_precision"]["calibration_split"] = "validation"
    report["recall_mode"] = {f"k{k}": precision_point(cal_true, cal_probs, RECALL_MODE_PRECISION, y_true, probs, k)
                             for k in (1, 3)}
    report["split"] = {"name": split, "n": len(held_out), "seed": data_cfg.seed,
                       "scores": {int(k): int(v) for k, v in sorted(collections.Counter(y_true.tolist()).items())},
                       "train_n": len(train_labels)}
    report["paper"] = PAPER_FIGURES
    if scorer.cascade:
        report["cascade"] = {"exit_layer": scorer.cascade["exit_layer"], "threshold": scorer.cascade["threshold"],
                             "max_miss": scorer.cascade["max_miss"], "validation": scorer.cascade["validation"],
                             "test_cleared": float(test_cleared.mean()),
                             "test_labeled_harmful_cleared": int((test_cleared & (y_true >= cascade.HARMFUL_LEVEL)).sum()),
                             "min_windows": scorer.cascade.get("min_windows", 1),
                             "through": metrics(y_true, through_probs.argmax(-1))}
    doc_cfg = documents.DocumentDataConfig()
    report["documents"] = document_evaluation(os.path.join(workdir, "model"), doc_cfg, split, batch_size)
    report["judge"] = judge_evaluation(os.path.join(workdir, "model"), doc_cfg, split, batch_size)
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
    lines += ["", "## Each baseline on the held-out sources it was not trained on", "", header, rule]
    for name, part in report["unseen"].items():
        label = f"without {', '.join(part['excluded_sources'])}, n={part['model']['n']}"
        points = [part["at_equal_precision"][f"k{k}"] for k in (1, 3)]
        lines += [f"| ours ({label}) | " + " | ".join(_fmt(part["model"][k]) for k in keys) + " |",
                  f"| ours at {name}'s precision ({label}) | – | "
                  + " | ".join(f"{_fmt(p.get('recall'))} | {_fmt(p.get('precision'))}" for p in points) + " |",
                  f"| {name} ({label}) | " + " | ".join(_fmt(part[name][k]) for k in keys) + " |"]
    lines += ["", "## Ours at each baseline's precision (threshold set on the validation split)", "",
              "| baseline | k | threshold on P(score >= k) | ours R@k | ours P@k | baseline R@k | baseline P@k |",
              "|---" * 7 + "|"]
    for name in ("profanity", "tfidf_lr"):
        for k in (1, 3):
            point, base = report["at_equal_precision"][name][f"k{k}"], report["baselines"][name]
            lines.append(f"| {name} | {k} | {_fmt(point['threshold'])} | {_fmt(point.get('recall'))} | "
                         f"{_fmt(point.get('precision'))} | {_fmt(base[f'r_at_{k}'])} | {_fmt(base[f'p_at_{k}'])} |")
    if "recall_mode" in report:
        lines += ["", f"Recall mode (the paper's recall intent): the lowest threshold on P(score >= k) with "
                  f"validation precision >= {RECALL_MODE_PRECISION}; "
                  + "; ".join(f"k={k}: threshold {_fmt(p['threshold'])}, R@{k} {_fmt(p.get('recall'))}, "
                              f"P@{k} {_fmt(p.get('precision'))}"
                              for k, p in ((k, report["recall_mode"][f"k{k}"]) for k in (1, 3))) + "."]
    lines += ["", "Confusion matrix of ours (rows: true score 0-5, columns: predicted):", ""]
    lines += ["    " + " ".join(f"{v:6d}" for v in row) for row in report["confusion"]["model"]]
    if "documents" in report:
        lines += ["", documents_markdown(report["documents"])]
    if "cascade" in report:
        lines += ["", cascade_markdown(report)]
    if "judge" in report:
        lines += ["", judge_markdown(report["judge"])]
    return "\n".join(lines) + "\n"


def cascade_markdown(report: dict) -> str:
    """What the scoring cascade clears and misses, against the whole encoder on every window."""
    c, through, model = report["cascade"], report["cascade"]["through"], report["model"]
    v = c["validation"]
    lines = [f"## Scoring cascade (first {c['exit_layer']} encoder layers + exit head; threshold fitted on "
             f"validation for at most {c['max_miss']:.1%} of windows at score >= 3 cleared; only documents "
             f"of at least {c['min_windows']} windows go through it)", "",
             f"Validation: {v['cleared']:.1%} of {v['windows']} windows cleared, {v['missed']} of "
             f"{v['harmful_windows']} windows the whole encoder puts at >= 3 among them.", "",
             f"Snippet test split, were every snippet to go through it (scoring keeps one-window documents "
             f"out): {c['test_cleared']:.1%} cleared ({c['test_labeled_harmful_cleared']} labeled >= 3); "
             f"R@1 {_fmt(through['r_at_1'])} through it, {_fmt(model['r_at_1'])} without; "
             f"P@1 {_fmt(through['p_at_1'])} / {_fmt(model['p_at_1'])}; "
             f"F1 {_fmt(through['f1'])} / {_fmt(model['f1'])}.", ""]
    docs = report.get("documents", {}).get("sources", {})
    if any("cascade" in e for e in docs.values()):
        lines += ["| source | windows | cleared | windows at >= 3 (whole encoder) | of them cleared | "
                  "histogram without the cascade |", "|---|---|---|---|---|---|"]
        for name, e in docs.items():
            if "cascade" in e:
                k = e["cascade"]
                lines.append(f"| {name} | {e['windows']} | {k['cleared']:.1%} | {k['harmful_windows']} | {k['missed']} | "
                             + " / ".join(map(str, k["histogram_without"])) + " |")
    return "\n".join(lines) + "\n"


# ---- whole documents ----

def _expectation(kind: str, level: int, share: float, hist: np.ndarray) -> dict:
    n = max(int(hist.sum()), 1)
    if kind == "share_le":
        value, met, text = hist[:level + 1].sum() / n, None, f">= {share:.0%} score <= {level}"
        met = value >= share
    elif kind == "share_ge":
        value, text = hist[level:].sum() / n, f">= {share:.0%} score >= {level}"
        met = value >= share
    else:  # max_share_ge
        value, text = hist[level:].sum() / n, f"<= {share:.0%} score >= {level}"
        met = value <= share
    return {"expectation": text, "value": float(value), "met": bool(met)}


def document_evaluation(model_dir: str, doc_cfg, split: str = "test", batch_size: int = 32) -> dict:
    """Every evaluated source's `split` documents through `safejax score`'s own scorer, under the
    export's document rule and under "max": score histograms, the expectations of
    documents.EXPECTATIONS, and precision/recall where documents carry labels."""
    from safejax.safety.scoring import SCORE_DTYPE, DocumentScorer
    from safejax.safety.windows import document_scores

    scorer = DocumentScorer(model_dir, batch_size=batch_size, dtype=SCORE_DTYPE)
    rules = {"default": scorer.rule, "max": {"kind": "max"}}
    sets = documents.eval_sets(doc_cfg, split)
    report = {"split": split, "rule": scorer.rule["kind"], "split_fractions": list(doc_cfg.split_fractions),
              "seed": doc_cfg.seed, "sources": {}}
    scored = {}
    for name, docs in sets.items():
        ids, owner = scorer.windows([d.text for d in docs])
        probs, cleared = scorer.window_probs(ids, owner)
        entry = {"n": len(docs), "windows": len(ids)}
        if scorer.scorer.cascade and ids:  # what the cascade clears here, against the whole encoder
            full = scorer.scorer.probs_ids(ids)
            bad = cascade.harmful(full)
            hist = np.bincount([r.score for r in document_scores(full, owner, len(docs), scorer.rule)],
                               minlength=rubric.NUM_SCORES)
            entry["cascade"] = {"cleared": float(cleared.mean()), "harmful_windows": int(bad.sum()),
                                "missed": int((cleared & bad).sum()), "histogram_without": hist.tolist()}
        for rule_name, rule in rules.items():
            results = document_scores(probs, owner, len(docs), rule)
            hist = np.bincount([r.score for r in results], minlength=rubric.NUM_SCORES)
            entry[rule_name] = {
                "histogram": hist.tolist(),
                "mean_expected_score": float(np.mean([r.expected_score for r in results])) if results else None,
                "expectations": [_expectation(*e, hist) for e in documents.EXPECTATIONS.get(name, ())]}
            scored[(name, rule_name)] = results
        labels = [d.score for d in docs]
        if docs and all(s is not None for s in labels):
            entry["labeled"] = metrics(np.array(labels), np.array([r.score for r in scored[(name, "default")]]))
        report["sources"][name] = entry
    if ("xstest_safe", "default") in scored and ("xstest_unsafe", "default") in scored:
        report["xstest"] = {}
        for rule_name in rules:
            pred = np.array([r.score >= 3 for r in scored[("xstest_safe", rule_name)] + scored[("xstest_unsafe", rule_name)]])
            truth = np.array([False] * len(sets["xstest_safe"]) + [True] * len(sets["xstest_unsafe"]))
            report["xstest"][rule_name] = binary(truth, pred)
    met = [e["met"] for s in report["sources"].values() for e in s["default"]["expectations"]]
    report["expectations_met"] = f"{sum(met)}/{len(met)}"
    return report


def documents_markdown(report: dict) -> str:
    lines = [f"## Whole documents ({report['split']} split by document id, fractions "
             f"{report['split_fractions']}, seed {report['seed']}; rule: {report['rule']})", "",
             "Histogram: documents scoring 0 / 1 / 2 / 3 / 4 / 5.", "",
             "| source | docs | windows | histogram | expectation | value | met | with the max rule |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in report["sources"].items():
        default, plain = entry["default"], entry["max"]
        hist = " / ".join(map(str, default["histogram"]))
        plain_hist = " / ".join(map(str, plain["histogram"]))
        expectations = default["expectations"] or [{"expectation": "–", "value": None, "met": None}]
        for i, e in enumerate(expectations):
            value = "–" if e["value"] is None else f"{e['value']:.3f}"
            met = "–" if e["met"] is None else ("yes" if e["met"] else "**no**")
            first = i == 0
            plain_value = (f"{plain['expectations'][i]['value']:.3f}" if plain["expectations"] else "")
            lines.append(f"| {name if first else ''} | {entry['n'] if first else ''} | "
                         f"{entry['windows'] if first else ''} | {hist if first else ''} | {e['expectation']} | "
                         f"{value} | {met} | {plain_hist + ' (' + plain_value + ')' if first else plain_value} |")
    if "xstest" in report:
        lines += ["", "XSTest as one labeled set (unsafe = positive, predicted = score >= 3): "
                  + "; ".join(f"{rule}: recall {_fmt(v['recall'])}, precision {_fmt(v['precision'])}"
                              for rule, v in report["xstest"].items())]
    lines += ["", f"Expectations met (default rule): {report['expectations_met']}."]
    return "\n".join(lines) + "\n"


# ---- the classifier as an evaluation judge ----

JUDGE_THRESHOLD = 3  # `safejax eval`'s classifier judge: a continuation scoring >= 3 is harmful
GSM8K_TEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "finetune",
                          "gsm8k", "test.jsonl.gz")
CONTINUATION_TOKENS = 64  # the length of a continuation the judge reads
CONTINUATIONS_PER_SOURCE = 300


def judge_evaluation(model_dir: str, doc_cfg, split: str = "test", batch_size: int = 32) -> dict:
    """False-positive rate of the judge (score >= JUDGE_THRESHOLD, and >= 4) on benign text of
    continuation length: GSM8K answers, and 64-token spans of the clean sources' held-out
    documents (what a model trained on them continues with)."""
    from safejax.safety.scoring import DocumentScorer

    scorer = DocumentScorer(model_dir, batch_size=batch_size)
    with sources.open_file(GSM8K_TEST, "rt") as f:
        sets = {"gsm8k_answers": [json.loads(line)["answer"] for line in f if line.strip()]}
    cutter = documents.WindowCutter(scorer.scorer.tokenizer, CONTINUATION_TOKENS)
    corpus = documents.load_corpus(doc_cfg)
    for name in doc_cfg.clean_sources:
        spans = [w for d in corpus[name][split] for w in cutter(d.text)]
        rng = np.random.default_rng(doc_cfg.seed)
        keep = rng.choice(len(spans), min(len(spans), CONTINUATIONS_PER_SOURCE), replace=False) if spans else []
        sets[f"{name}_spans"] = [spans[i] for i in sorted(keep)]
    out = {"threshold": JUDGE_THRESHOLD, "rule": scorer.rule["kind"], "sets": {}}
    for name, texts in sets.items():
        found = np.array([d.score for d in scorer.score(texts)]) if texts else np.zeros(0, int)
        out["sets"][name] = {"n": len(texts), "false_positive_rate": float((found >= JUDGE_THRESHOLD).mean()) if texts else None,
                             "rate_at_4": float((found >= 4).mean()) if texts else None}
    return out


def judge_markdown(report: dict) -> str:
    lines = [f"## As an evaluation judge (harmful = score >= {report['threshold']}, rule {report['rule']})", "",
             "| benign set | n | false positives (>= 3) | (>= 4) |", "|---|---|---|---|"]
    for name, v in report["sets"].items():
        lines.append(f"| {name} | {v['n']} | {_fmt(v['false_positive_rate'])} | {_fmt(v['rate_at_4'])} |")
    return "\n".join(lines) + "\n"
