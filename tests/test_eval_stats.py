"""Bootstrap intervals of the evaluation's rates against exact computations: the bootstrap
distribution of a mean is known exactly for 0/1 data (a binomial) and by enumerating every
resample for a few prompts; a large sample matches the normal approximation. Rule of three,
per-category breakdowns, paired differences, seeding."""

import itertools
import math

import numpy as np
import pytest

from safejax import errors
from safejax.evals import stats

N_BOOT = 200_000  # enough draws that a percentile away from a jump of the exact CDF is hit exactly


def _exact_quantile(support: np.ndarray, probs: np.ndarray, q: float) -> float:
    """The smallest support point whose CDF reaches q, after checking that q is not so close to
    a jump of the CDF that sampling noise could land on the neighbouring point."""
    order = np.argsort(support)
    support, cdf = support[order], np.cumsum(probs[order])
    k = int(np.searchsorted(cdf, q))
    below = cdf[k - 1] if k else 0.0
    assert cdf[k] - q > 0.004 and q - below > 0.004, "test data puts the quantile at a jump"
    return float(support[k])


def _exact_interval(support, probs, level=0.95):
    support, probs = np.asarray(support, float), np.asarray(probs, float)
    return [_exact_quantile(support, probs, (1 - level) / 2), _exact_quantile(support, probs, (1 + level) / 2)]


def _enumerated(values):
    """The exact bootstrap distribution of the mean: every one of n^n resamples, equally likely."""
    values = np.asarray(values, float)
    n = len(values)
    means = np.asarray([values[list(idx)].mean() for idx in itertools.product(range(n), repeat=n)])
    support, counts = np.unique(np.round(means, 12), return_counts=True)
    return support, counts / counts.sum()


def test_binary_rate_interval_is_the_exact_binomial_percentile_interval():
    """Resampling n prompts of which k are positive draws Binomial(n, k/n) positives."""
    n, k = 40, 11
    per_prompt = {f"p{i}": float(i < k) for i in range(n)}
    support = np.arange(n + 1) / n
    probs = np.asarray([math.comb(n, j) * (k / n) ** j * (1 - k / n) ** (n - j) for j in range(n + 1)])
    out = stats.rate_summary(per_prompt, n_boot=N_BOOT, seed=3)
    assert out["rate"] == pytest.approx(k / n) and out["n_prompts"] == n
    assert out["ci"] == pytest.approx(_exact_interval(support, probs), abs=1e-12)
    assert out["rule_of_three_upper"] is None


def test_fractional_rate_interval_equals_enumerating_every_resample():
    """Several samples a prompt: per-prompt shares, the 5^5 resamples enumerated."""
    values = [0.0, 0.25, 0.5, 1.0, 0.75]
    support, probs = _enumerated(values)
    out = stats.rate_summary({f"q{i}": v for i, v in enumerate(values)}, n_boot=N_BOOT, seed=1, level=0.8)
    assert out["rate"] == pytest.approx(0.5)
    assert out["ci"] == pytest.approx(_exact_interval(support, probs, 0.8), abs=1e-9)


def test_large_sample_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    values = rng.random(3000) < 0.3
    per_prompt = {str(i): float(v) for i, v in enumerate(values)}
    out = stats.rate_summary(per_prompt, n_boot=20_000)
    p = values.mean()
    half = 1.959964 * math.sqrt(p * (1 - p) / len(values))
    assert out["ci"] == pytest.approx([p - half, p + half], abs=0.08 * half)


def test_rule_of_three_on_a_zero_count():
    out = stats.rate_summary({f"p{i}": 0.0 for i in range(60)})
    assert out["rate"] == 0.0 and out["ci"] == [0.0, 0.0]
    assert out["rule_of_three_upper"] == pytest.approx(3 / 60)
    assert stats.rate_summary({"a": 0.0, "b": 0.0})["rule_of_three_upper"] == 1.0  # 3/2 capped at a rate of 1
    assert stats.rate_summary({"a": 0.0, "b": 0.5})["rule_of_three_upper"] is None


def test_per_category_breakdown():
    per_prompt = {"a1": 1.0, "a2": 0.0, "a3": 1.0, "b1": 0.0, "b2": 0.0, "x": 1.0}
    categories = {"a1": "arms", "a2": "arms", "a3": "arms", "b1": "bio", "b2": "bio"}
    out = stats.rate_summary(per_prompt, categories, n_boot=500)
    cats = out["per_category"]
    assert list(cats) == ["(none)", "arms", "bio"]
    assert cats["arms"]["rate"] == pytest.approx(2 / 3) and cats["arms"]["n_prompts"] == 3
    assert cats["bio"]["rate"] == 0.0 and cats["bio"]["rule_of_three_upper"] == 1.0
    assert cats["(none)"]["n_prompts"] == 1
    # A category's interval is its prompts' own bootstrap, whatever the other categories hold.
    alone = stats.rate_summary({k: per_prompt[k] for k in ("a1", "a2", "a3")}, {k: "arms" for k in ("a1", "a2", "a3")},
                               n_boot=500)
    assert alone["per_category"]["arms"] == cats["arms"]
    assert stats.rate_summary(per_prompt)["per_category"] == {}


def test_seeded_and_independent_of_dict_order():
    per_prompt = {f"p{i}": float(v) for i, v in enumerate(np.random.default_rng(0).random(30))}
    reordered = dict(reversed(list(per_prompt.items())))
    first = stats.rate_summary(per_prompt, seed=7)
    assert stats.rate_summary(reordered, seed=7) == first
    assert stats.rate_summary(per_prompt, seed=8)["ci"] != first["ci"]


def test_paired_difference_equals_enumerating_every_paired_resample():
    """Only shared ids count; the difference of a resample is the mean of per-prompt differences."""
    a = {"p1": 1.0, "p2": 0.0, "p3": 1.0, "p4": 0.5, "p5": 0.0, "only_a": 1.0}
    b = {"p1": 0.0, "p2": 0.0, "p3": 1.0, "p4": 0.0, "p5": 0.25, "only_b": 0.0}
    shared = sorted(set(a) & set(b))
    d = [b[i] - a[i] for i in shared]
    support, probs = _enumerated(d)
    out = stats.paired_difference(a, b, n_boot=N_BOOT, seed=2, level=0.9)
    assert out["n"] == 5 and out["diff"] == pytest.approx(np.mean(d))
    assert out["rate_a"] == pytest.approx(np.mean([a[i] for i in shared]))
    assert out["ci"] == pytest.approx(_exact_interval(support, probs, 0.9), abs=1e-9)


def test_paired_interval_is_narrower_than_unpaired_when_prompts_share_difficulty():
    """Model B = model A minus a few successes: the pairing sees a small, certain drop."""
    rng = np.random.default_rng(1)
    a = {str(i): float(v) for i, v in enumerate(rng.random(400) < 0.5)}
    b = dict(a)
    for i in [k for k, v in a.items() if v][:20]:
        b[i] = 0.0
    paired = stats.paired_difference(a, b)
    assert paired["diff"] == pytest.approx(-20 / 400)
    assert paired["ci"][1] < 0  # the drop is significant paired ...
    ra, rb = stats.rate_summary(a), stats.rate_summary(b)
    assert rb["ci"][1] > ra["ci"][0]  # ... though the two unpaired intervals overlap
    assert paired["ci"][1] - paired["ci"][0] < 0.5 * (ra["ci"][1] - ra["ci"][0])


def test_bad_inputs_are_user_errors():
    with pytest.raises(errors.UserError, match="share no prompt id"):
        stats.paired_difference({"a": 1.0}, {"b": 1.0})
    with pytest.raises(errors.UserError, match="prompt 'x' has the value 1.5"):
        stats.rate_summary({"ok": 0.0, "x": 1.5})
    with pytest.raises(errors.UserError, match="n_boot"):
        stats.rate_summary({"a": 1.0}, n_boot=0)
    with pytest.raises(errors.UserError, match="level"):
        stats.paired_difference({"a": 1.0}, {"a": 0.0}, level=1.0)
    empty = stats.rate_summary({})
    assert empty["n_prompts"] == 0 and empty["rate"] is None and empty["ci"] is None


def test_gin_binds_the_defaults():
    import gin

    from safejax import config
    from safejax.evals import report, utility  # noqa: F401 (stats.gin binds their configurables too)

    config.parse(["eval/stats.gin"], ["rate_summary.n_boot = 50", "rate_summary.level = 0.5"])
    try:
        out = stats.rate_summary({str(i): float(i % 2) for i in range(20)})
        assert out["level"] == 0.5
        explicit = stats.rate_summary({str(i): float(i % 2) for i in range(20)}, n_boot=50, level=0.5)
        assert out == explicit
    finally:
        gin.clear_config()
