"""Uncertainty of the evaluation's rates: bootstrap confidence intervals over prompts.

A rate (attack success, toxicity, refusal, multiple-choice accuracy) is the mean over prompts of
each prompt's share of positive samples (0/1 with one sample a prompt). Prompts are the unit
that was sampled from the world, so the bootstrap resamples prompts, not samples: with several
samples a prompt, their correlation is kept inside the resampled unit. The interval is the
percentile interval of the resampled means.

A rate of 0 out of n has a bootstrap interval of [0, 0], which says nothing; the rule of three
(3/n, the one-sided 95% upper bound of a binomial rate when nothing was seen) is reported beside it.

Two runs on the same prompts (model A vs B, decoding X vs Y) are compared by a *paired* bootstrap:
one resample of the shared prompts gives both rates, so the prompts' shared difficulty cancels and
the interval of the difference is much narrower than two independent intervals suggest.

Every draw is seeded and prompts are taken in sorted id order, so a summary depends only on its
inputs, never on dict order or the run. The defaults are bound in configs/eval/stats.gin.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import gin
import numpy as np

from safejax import errors

RULE_OF_THREE = 3.0  # -ln(0.05) ~= 3: the 95% upper bound of a rate whose count is 0
_DRAWS_PER_CHUNK = 1 << 22  # resampled indices held at once: n_boot * n may be large


def _values(per_prompt: Mapping[str, float], what: str) -> tuple[list[str], np.ndarray]:
    """Sorted ids and their values; a value outside [0, 1] is an error naming the prompt."""
    ids = sorted(per_prompt, key=str)
    values = np.asarray([per_prompt[i] for i in ids], np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        i = ids[int(np.argmax(bad))]
        raise errors.UserError(f"{what}: prompt {i!r} has the value {per_prompt[i]!r}; a per-prompt rate is in [0, 1]")
    return ids, values


def _check(n_boot: int, level: float) -> None:
    if not isinstance(n_boot, int) or n_boot < 1:
        raise errors.UserError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise errors.UserError(f"level must be in (0, 1), got {level!r}")


def bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of n_boot resamples (with replacement, of the same size) of `values`, vectorised
    in chunks that bound the index matrix."""
    n = len(values)
    means = np.empty(n_boot, np.float64)
    rows = max(1, _DRAWS_PER_CHUNK // n)
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        means[start:start + k] = values[rng.integers(0, n, size=(k, n))].mean(axis=1)
    return means


def percentile_interval(values: np.ndarray, n_boot: int, seed, level: float) -> list[float]:
    """The percentile bootstrap interval of the mean of `values` at `level`."""
    means = bootstrap_means(values, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _summary(values: np.ndarray, n_boot: int, seed, level: float) -> dict:
    n = len(values)
    if n == 0:
        return {"rate": None, "ci": None, "n_prompts": 0, "rule_of_three_upper": None}
    none_positive = not values.any()
    return {"rate": float(values.mean()), "ci": percentile_interval(values, n_boot, seed, level), "n_prompts": n,
            "rule_of_three_upper": min(1.0, RULE_OF_THREE / n) if none_positive else None}


def _category_seed(seed: int, category: str) -> list[int]:
    """Each category its own stream, fixed by the seed and the category's name alone."""
    return [seed, zlib.crc32(category.encode())]


@gin.configurable
def rate_summary(per_prompt: Mapping[str, float], categories: Mapping[str, str] | None = None,
                 *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The rate over prompts with its bootstrap interval, and the same per category.

    per_prompt: prompt id -> share of that prompt's samples judged positive. categories: prompt
    id -> category; a prompt it does not name is counted under "(none)". Returns {"rate", "ci":
    [lo, hi], "n_prompts", "rule_of_three_upper" (3/n when no prompt is positive, else None),
    "level", "per_category": {category: {the same four fields}}} (rate and ci None for no prompts).
    """
    _check(n_boot, level)
    ids, values = _values(per_prompt, "rate_summary")
    out = {**_summary(values, n_boot, seed, level), "level": level, "per_category": {}}
    if categories:
        groups: dict[str, list[int]] = {}
        for j, i in enumerate(ids):
            groups.setdefault(str(categories.get(i, "(none)")), []).append(j)
        out["per_category"] = {c: _summary(values[groups[c]], n_boot, _category_seed(seed, c), level)
                               for c in sorted(groups)}
    return out


@gin.configurable
def paired_difference(a: Mapping[str, float], b: Mapping[str, float], *, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """rate(b) - rate(a) over the prompts both have, with a paired bootstrap interval (one
    resample of the shared prompts gives both rates). Returns {"diff", "ci", "n", "rate_a",
    "rate_b", "level"}; no shared prompt is an error."""
    _check(n_boot, level)
    shared = set(a) & set(b)
    if not shared:
        raise errors.UserError("paired_difference: the two results share no prompt id")
    _, va = _values({i: a[i] for i in shared}, "paired_difference (first)")
    _, vb = _values({i: b[i] for i in shared}, "paired_difference (second)")
    d = vb - va
    return {"diff": float(d.mean()), "ci": percentile_interval(d, n_boot, seed, level), "n": len(d),
            "rate_a": float(va.mean()), "rate_b": float(vb.mean()), "level": level}
