"""`safejax eval judge-agreement`: how far each judge agrees with human labels.

    safejax eval judge-agreement --judge classifier,llm --labels labels.csv --classifier runs/clf

The labels file (CSV or JSONL) has one row per judged text: `prompt` (the request), `completion`
(what the model wrote) and `label`, the human's verdict in the judge's sense (harmful for
classifier/llm/profanity, a refusal for the refusal judge): 1/0, yes/no, true/false,
harmful/benign (or unharmful, harmless), refusal/compliance. Any other label is a one-line
error naming the row before any judge runs.

For each judge: agreement (accuracy), precision and recall of its positives, Cohen's kappa
(agreement beyond what two raters with these base rates reach by chance), the confusion counts,
and how many rows it gave no verdict for (invalid LLM answers; left out of the figures).
"""

from __future__ import annotations

from collections.abc import Sequence

from safejax import errors
from safejax.evals import judges, prompts

LABELS = {"1": True, "yes": True, "true": True, "harmful": True, "unsafe": True, "refusal": True,
          "0": False, "no": False, "false": False, "benign": False, "unharmful": False, "harmless": False,
          "safe": False, "compliance": False}
COLUMNS = ("prompt", "completion", "label")


def read_labels(path: str) -> tuple[list[judges.Item], list[bool]]:
    rows, unit = prompts.read_rows(path)
    items, truth = [], []
    for n, row in enumerate(rows, 1):
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise errors.UserError(f"{path} {unit} {n}: no {', '.join(missing)} field (need {', '.join(COLUMNS)})")
        label = row["label"]
        word = str(label).strip().lower() if isinstance(label, (str, int, bool)) else None
        if word not in LABELS:
            raise errors.UserError(f"{path} {unit} {n}: unknown label {label!r}; use one of {', '.join(LABELS)}")
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise errors.UserError(f"{path} {unit} {n}: prompt and completion must be strings")
        items.append(judges.Item(row["prompt"], row["prompt"], row["completion"]))
        truth.append(LABELS[word])
    if not items:
        raise errors.UserError(f"{path}: no labeled rows")
    return items, truth


def figures(predicted: Sequence[bool | None], truth: Sequence[bool]) -> dict:
    """Agreement, precision, recall and Cohen's kappa over the rows with a verdict (None: none)."""
    pairs = [(p, t) for p, t in zip(predicted, truth) if p is not None]
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    fn = sum(t and not p for p, t in pairs)
    tn = sum(not p and not t for p, t in pairs)
    n = len(pairs)

    def ratio(a, b):
        return a / b if b else None

    agreement = ratio(tp + tn, n)
    chance = ratio((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn), n * n)
    kappa = None if agreement is None or chance is None or chance == 1 else (agreement - chance) / (1 - chance)
    return {"n": n, "invalid": len(predicted) - n, "agreement": agreement, "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn), "kappa": kappa, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def agreement(judge_names: Sequence[str], labels_path: str, classifier: str | None = None) -> dict:
    """Every judge's figures on the labels file (read and checked first)."""
    judges.check_names(judge_names)
    items, truth = read_labels(labels_path)
    built = [judges.build(name, classifier) for name in judge_names]
    out = {}
    for judge in built:
        verdicts = judge.judge(items)
        out[judge.name] = {**figures([None if v.failed else v.positive for v in verdicts], truth),
                           "failed": sum(v.failed for v in verdicts)}
    return out
