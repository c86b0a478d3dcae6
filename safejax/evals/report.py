"""Reports of `safejax eval`: one run's report.md and figures, and runs compared side by side.

`write_report(RUN)` reads RUN/results.json (written by evals/run.py, schema 1) and writes
RUN/report.md: a headline table (rows: suite / set, scored by the suite's first judge; columns:
decodings), every cell with every judge's figures, per-category tables, utility and timings; and
two PNG figures, the rates per decoding with their confidence intervals and per category.

`compare(RUNS, OUTPUT)` lays runs out as the paper's tables do: per (suite, set, judge) one table
with a row per run (its results.json `label`, else the directory's name) and a column per
decoding, then the paired differences of each run against the first on the prompts both share,
and between decodings of each run (`decoding_pairs`, e.g. safebeam - greedy); plus one figure.

Rates are percentages with their bootstrap interval, `28.8 [24.1, 33.5]` (level as
evaluated, 95% by default); a rate of 0 adds its rule-of-three upper bound. Differences are in
percentage points. A missing or malformed results.json is a one-line error naming the file and
the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import gin

from safejax import errors
from safejax.evals import stats

RESULTS = "results.json"
SCHEMA = 1
REPORT = "report.md"
RATES_FIGURE = "rates_by_decoding.png"
CATEGORIES_FIGURE = "rates_by_category.png"
COMPARE = "compare.md"
COMPARE_FIGURE = "compare.png"

_CELL_FIELDS = {"suite": str, "set": str, "decoding": str, "judge": str, "metric": str, "n_prompts": int,
                "per_prompt": dict}


# ---- reading results.json ----

def load_results(run_dir: str) -> dict:
    """A run's results.json, checked field by field (schema 1; see evals/run.py)."""
    path = run_dir if run_dir.endswith(".json") else os.path.join(run_dir, RESULTS)
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except FileNotFoundError:
        raise errors.UserError(f"{path}: not found (is {run_dir} an eval run directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, dict):
        raise errors.UserError(f"{path}: must hold a JSON object")
    if results.get("schema") != SCHEMA:
        raise errors.UserError(f"{path}: field 'schema' is {results.get('schema')!r}, this version reads {SCHEMA}")
    cells = results.get("cells")
    if not isinstance(cells, list):
        raise errors.UserError(f"{path}: field 'cells' must be a list")
    for i, cell in enumerate(cells):
        _check_cell(cell, f"{path}: cells[{i}]")
    for field in ("utility", "timings", "settings"):
        if not isinstance(results.get(field, {}), dict):
            raise errors.UserError(f"{path}: field '{field}' must be an object")
    if not isinstance(results.get("label", ""), str):
        raise errors.UserError(f"{path}: field 'label' must be a string")
    results["_path"], results["_dir"] = path, os.path.dirname(os.path.abspath(path))
    return results


def _check_cell(cell, where: str) -> None:
    if not isinstance(cell, dict):
        raise errors.UserError(f"{where}: must be an object")
    for field, kind in _CELL_FIELDS.items():
        if field not in cell:
            raise errors.UserError(f"{where}.{field}: missing")
        if not isinstance(cell[field], kind) or isinstance(cell[field], bool):
            raise errors.UserError(f"{where}.{field}: must be {kind.__name__}, got {cell[field]!r}")
    if "rate" not in cell:
        raise errors.UserError(f"{where}.rate: missing")
    rate, ci = cell["rate"], cell.get("ci")
    if rate is not None and not (_number(rate) and 0 <= rate <= 1):
        raise errors.UserError(f"{where}.rate: must be a number in [0, 1] or null, got {rate!r}")
    if rate is not None and not (isinstance(ci, list) and len(ci) == 2 and all(_number(x) for x in ci)):
        raise errors.UserError(f"{where}.ci: must be [low, high], got {ci!r}")
    if not all(_number(v) for v in cell["per_prompt"].values()):
        raise errors.UserError(f"{where}.per_prompt: every value must be a number")
    if not isinstance(cell.get("per_category", {}), dict):
        raise errors.UserError(f"{where}.per_category: must be an object")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- formatting ----

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def rate_text(summary: dict, with_n: bool = False) -> str:
    """'28.8 [24.1, 33.5]' (percent), with ', n=520' and ', <= 3.0 (rule of 3)' as they apply."""
    if summary.get("rate") is None:
        return "n/a (no prompts)"
    lo, hi = summary["ci"]
    text = f"{_pct(summary['rate'])} [{_pct(lo)}, {_pct(hi)}]"
    if with_n:
        text += f", n={summary['n_prompts']}"
    if summary.get("rule_of_three_upper") is not None:
        text += f", ≤ {_pct(summary['rule_of_three_upper'])} (rule of 3)"
    return text


def difference_text(d: dict) -> str:
    """'-15.3 [-20.1, -10.2] pts, n=520'."""
    lo, hi = d["ci"]
    return f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] pts, n={d['n']}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def headline_judges(cells: Sequence[dict]) -> dict[str, str]:
    """Each suite's headline judge: the first judge its cells name (the run's judge order)."""
    out: dict[str, str] = {}
    for c in cells:
        out.setdefault(c["suite"], c["judge"])
    return out


def _row_label(cell: dict) -> str:
    return f"{cell['suite']} / {cell['set']}"


# ---- one run ----

def write_report(run_dir: str) -> str:
    """Writes RUN/report.md and its PNG figures from RUN/results.json; returns the report's path."""
    results = load_results(run_dir)
    out_dir = results["_dir"]
    cells = results["cells"]
    figures = []
    if cells:
        _rates_figure(cells, os.path.join(out_dir, RATES_FIGURE))
        figures.append((RATES_FIGURE, "rates per decoding (headline judges), bars = confidence interval; "
                        "a zero rate's bar reaches its rule-of-three bound"))
        if _category_figure(cells, os.path.join(out_dir, CATEGORIES_FIGURE)):
            figures.append((CATEGORIES_FIGURE, "rates per category (headline judges)"))
    lines = [f"# Evaluation: {results.get('label') or os.path.basename(out_dir)}", ""]
    lines += _run_facts(results)
    lines += _headline_section(cells)
    lines += _judge_sections(cells)
    lines += _category_sections(cells)
    lines += _utility_section(results.get("utility", {}))
    lines += _timings_section(results.get("timings", {}))
    if figures:
        lines += ["## Figures", ""] + [f"![{caption}]({name})" for name, caption in figures] + [""]
    path = os.path.join(out_dir, REPORT)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def _run_facts(results: dict) -> list[str]:
    facts = [f"- checkpoint: `{results.get('checkpoint', '?')}`, step {results.get('step', '?')}",
             "- cells: rate in % [bootstrap confidence interval over prompts], n = prompts"]
    settings = results.get("settings") or {}
    if settings:
        facts.append("- settings: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items()))
    return facts + [""]


def _grid(cells: Sequence[dict], row_key, fmt) -> tuple[list[str], list[list[str]]]:
    """Rows by row_key(cell), one column per decoding (order of appearance)."""
    decodings = _ordered(c["decoding"] for c in cells)
    rows: dict[str, dict[str, str]] = {}
    for c in cells:
        rows.setdefault(row_key(c), {})[c["decoding"]] = fmt(c)
    return decodings, [[label, *(cols.get(d, "–") for d in decodings)] for label, cols in rows.items()]


def _headline_section(cells: Sequence[dict]) -> list[str]:
    if not cells:
        return ["## Headline", "", "No safety, toxicity or refusal cells in this run.", ""]
    judges = headline_judges(cells)
    chosen = [c for c in cells if c["judge"] == judges[c["suite"]]]
    decodings, rows = _grid(chosen, lambda c: f"{_row_label(c)} ({c['metric']}, {c['judge']})",
                            lambda c: rate_text(c, with_n=True))
    return ["## Headline", ""] + _table(["suite / set (metric, judge)", *decodings], rows) + [""]


def _judge_sections(cells: Sequence[dict]) -> list[str]:
    lines = []
    for judge in _ordered(c["judge"] for c in cells):
        rows = []
        for c in (c for c in cells if c["judge"] == judge):
            ci = "–" if c.get("rate") is None else f"[{_pct(c['ci'][0])}, {_pct(c['ci'][1])}]"
            r3 = c.get("rule_of_three_upper")
            rows.append([c["suite"], c["set"], c["decoding"], c["metric"],
                         "n/a" if c.get("rate") is None else _pct(c["rate"]), ci, c["n_prompts"],
                         c.get("n_samples", "–"), c.get("invalid", 0), "–" if r3 is None else _pct(r3)])
        lines += [f"## Judge: {judge}", ""]
        lines += _table(["suite", "set", "decoding", "metric", "rate %", "CI %", "prompts", "samples", "invalid",
                         "rule of 3 %"], rows) + [""]
    return lines


def _category_sections(cells: Sequence[dict]) -> list[str]:
    lines = []
    for key in _ordered((c["suite"], c["set"], c["judge"]) for c in cells):
        group = [c for c in cells if (c["suite"], c["set"], c["judge"]) == key and c.get("per_category")]
        if not group:
            continue
        by = {c["decoding"]: c["per_category"] for c in group}
        categories = sorted({cat for c in group for cat in c["per_category"]})
        rows = [[cat, *(rate_text(by[d][cat], with_n=True) if cat in by[d] else "–" for d in by)]
                for cat in categories]
        if not lines:
            lines += ["## Per category", ""]
        lines += [f"### {key[0]} / {key[1]}, judge {key[2]}", ""]
        lines += _table(["category", *by], rows) + [""]
    return lines


def _utility_section(utility: dict) -> list[str]:
    if not utility:
        return []
    lines = ["## Utility", ""]
    ppl = utility.get("perplexity")
    if ppl:
        rows = [["perplexity", f"{ppl['perplexity']:.3f}"],
                ["perplexity, harm tag's mass removed", f"{ppl['perplexity_tag_removed']:.3f}"],
                ["tokens", ppl.get("tokens", "–")], ["documents", ppl.get("documents", "–")]]
        if "mean_tag_probability" in ppl:
            rows.append(["mean probability of the harm tag", f"{ppl['mean_tag_probability']:.2e}"])
        lines += _table(["held-out clean text", "value"], rows) + [""]
    mc = utility.get("multiple_choice") or {}
    if mc:
        rows = [[name, rate_text({"rate": r["accuracy"], "ci": r["ci"]}),
                 rate_text({"rate": r.get("accuracy_raw"), "ci": r.get("ci_raw")}) if r.get("ci_raw") else "–",
                 r["n"]] for name, r in mc.items()]
        lines += _table(["multiple choice", "accuracy % (per-byte log-likelihood)", "accuracy % (summed)", "items"],
                        rows) + [""]
    return lines


def _timings_section(timings: dict) -> list[str]:
    if not timings:
        return []
    rows = [[k, _timing_text(k, v)] for k, v in timings.items()]
    return ["## Timings", ""] + _table(["phase", "value"], rows) + [""]


def _timing_text(key: str, value) -> str:
    """Durations (keys ending in _s, not _per_s) in seconds; counts and rates as they are."""
    if not _number(value):
        return str(value)
    if key.endswith("_s") and not key.endswith("_per_s"):
        return f"{value:.1f} s"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


# ---- figures ----

def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _bars(ax, groups: Sequence[str], series: Sequence[str], cell_of, ylabel: str, colours: dict) -> None:
    """Grouped bars: one group per `groups` entry, one bar per series (its colour the same in
    every figure), CI error bars."""
    width = 0.8 / max(1, len(series))
    for k, name in enumerate(series):
        xs, heights, low, high = [], [], [], []
        for g, group in enumerate(groups):
            c = cell_of(group, name)
            if c is None or c.get("rate") is None:
                continue
            top = c["ci"][1] if c.get("rule_of_three_upper") is None else c["rule_of_three_upper"]
            xs.append(g - 0.4 + width * (k + 0.5))
            heights.append(100 * c["rate"])
            low.append(max(0.0, 100 * (c["rate"] - c["ci"][0])))
            high.append(max(0.0, 100 * (top - c["rate"])))
        ax.bar(xs, heights, width, yerr=[low, high], capsize=3, label=name, color=colours[name])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)


def _index(cells: Sequence[dict], key) -> dict:
    return {key(c): c for c in cells}


def _colours(cells: Sequence[dict]) -> dict[str, str]:
    return {d: f"C{i % 10}" for i, d in enumerate(_ordered(c["decoding"] for c in cells))}


def _rates_figure(cells: Sequence[dict], path: str) -> None:
    judges = headline_judges(cells)
    chosen = [c for c in cells if c["judge"] == judges[c["suite"]]]
    groups = _ordered(f"{_row_label(c)}\n{c['metric']} ({c['judge']})" for c in chosen)
    by = _index(chosen, lambda c: (f"{_row_label(c)}\n{c['metric']} ({c['judge']})", c["decoding"]))
    fig = _new_figure(max(5.0, 1.4 * len(groups) + 2), 4.0)
    _bars(fig.add_subplot(), groups, _ordered(c["decoding"] for c in chosen), lambda g, d: by.get((g, d)),
          "rate (%)", _colours(cells))
    fig.tight_layout()
    fig.savefig(path)


def _category_figure(cells: Sequence[dict], path: str) -> bool:
    judges = headline_judges(cells)
    chosen = [c for c in cells if c["judge"] == judges[c["suite"]] and c.get("per_category")]
    keys = _ordered((c["suite"], c["set"]) for c in chosen)
    if not keys:
        return False
    fig = _new_figure(9.0, 3.2 * len(keys))
    for i, key in enumerate(keys):
        group = [c for c in chosen if (c["suite"], c["set"]) == key]
        categories = sorted({cat for c in group for cat in c["per_category"]})
        by = {(cat, c["decoding"]): c["per_category"][cat] for c in group for cat in c["per_category"]}
        ax = fig.add_subplot(len(keys), 1, i + 1)
        _bars(ax, categories, _ordered(c["decoding"] for c in group), lambda g, d: by.get((g, d)), "rate (%)",
              _colours(cells))
        ax.set_title(f"{key[0]} / {key[1]} ({group[0]['metric']}, {group[0]['judge']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return True


# ---- several runs ----

def _labels(runs: Sequence[dict], run_dirs: Sequence[str]) -> list[str]:
    """Each run's label (results.json, else the directory's name), made unique."""
    labels = []
    for results, run_dir in zip(runs, run_dirs):
        label = results.get("label") or os.path.basename(os.path.normpath(run_dir))
        if label in labels:
            label = f"{label} ({run_dir})"
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


@gin.configurable
def compare(run_dirs: Sequence[str], output: str | None = None, *,
            decoding_pairs: Sequence[tuple[str, str]] = (("greedy", "safebeam"), ("beam", "safebeam"),
                                                         ("randomdrop", "safebeam"), ("greedy", "beam"))) -> str:
    """The runs side by side (format in the module docstring); with `output`, writes
    OUTPUT/compare.md and OUTPUT/compare.png. Returns the markdown."""
    if not run_dirs:
        raise errors.UserError("compare: no run directories given")
    runs = [load_results(d) for d in run_dirs]
    labels = _labels(runs, run_dirs)
    cells = [(label, c) for label, r in zip(labels, runs) for c in r["cells"]]
    keys = _ordered((c["suite"], c["set"], c["judge"]) for _, c in cells)
    lines = ["# Comparison", "", "Runs: " + ", ".join(f"{label} (`{r['_dir']}`)" for label, r in zip(labels, runs)),
             "", "Cells: rate in % [bootstrap confidence interval over prompts]; differences in percentage points "
             "[paired bootstrap interval over the prompts both share], n = shared prompts.", ""]
    for key in keys:
        group = [(label, c) for label, c in cells if (c["suite"], c["set"], c["judge"]) == key]
        by = {(label, c["decoding"]): c for label, c in group}
        decodings = _ordered(c["decoding"] for _, c in group)
        present = [label for label in labels if any(lb == label for lb, _ in group)]
        lines += [f"## {key[0]} / {key[1]}: {group[0][1]['metric']}, judge {key[2]}", ""]
        rows = [[label, *(rate_text(by[label, d]) if (label, d) in by else "–" for d in decodings)]
                for label in present]
        lines += _table(["run", *decodings], rows) + [""]
        lines += _run_differences(labels[0], present, decodings, by)
        lines += _decoding_differences(present, decoding_pairs, by)
    markdown = "\n".join(lines).rstrip() + "\n"
    if output is not None:
        os.makedirs(output, exist_ok=True)
        if keys:
            _compare_figure(labels, keys, cells, os.path.join(output, COMPARE_FIGURE))
            markdown += f"\n![rates per run and decoding]({COMPARE_FIGURE})\n"
        with open(os.path.join(output, COMPARE), "w", encoding="utf-8") as f:
            f.write(markdown)
    return markdown


def _difference(a: dict, b: dict) -> str:
    try:
        return difference_text(stats.paired_difference(a["per_prompt"], b["per_prompt"]))
    except errors.UserError:
        return "no shared prompts"


def _run_differences(first: str, present: Sequence[str], decodings, by) -> list[str]:
    rows = [[f"{label} − {first}", *(_difference(by[first, d], by[label, d])
                                     if (first, d) in by and (label, d) in by else "–" for d in decodings)]
            for label in present if label != first]
    if not rows:
        return []
    return [f"Paired differences against {first}:", ""] + _table(["runs", *decodings], rows) + [""]


def _decoding_differences(present: Sequence[str], pairs, by) -> list[str]:
    pairs = [tuple(p) for p in pairs if any((label, p[0]) in by and (label, p[1]) in by for label in present)]
    if not pairs:
        return []
    rows = [[label, *(_difference(by[label, a], by[label, b]) if (label, a) in by and (label, b) in by else "–"
                      for a, b in pairs)] for label in present]
    return ["Paired differences between decodings:", ""] + _table(["run", *(f"{b} − {a}" for a, b in pairs)],
                                                                   rows) + [""]


def _compare_figure(labels, keys, cells, path: str) -> None:
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    fig = _new_figure(4.5 * columns, 3.6 * rows)
    for i, key in enumerate(keys):
        group = [(label, c) for label, c in cells if (c["suite"], c["set"], c["judge"]) == key]
        by = {(label, c["decoding"]): c for label, c in group}
        ax = fig.add_subplot(rows, columns, i + 1)
        present = [label for label in labels if any(lb == label for lb, _ in group)]
        _bars(ax, present, _ordered(c["decoding"] for _, c in group), lambda g, d: by.get((g, d)),
              f"{group[0][1]['metric']} (%)", _colours([c for _, c in cells]))
        ax.set_title(f"{key[0]} / {key[1]} ({key[2]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
