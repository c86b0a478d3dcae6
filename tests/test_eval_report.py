"""Reports of `safejax eval` from hand-written results.json files: the tables hold the right
cells (headline, judges, categories, utility, timings), the figures are real PNGs, `compare`
lays runs out as the paper's tables with paired differences, and a bad results.json is a
one-line error naming the file and the field."""

import json
import os
import re

import numpy as np
import pytest
from matplotlib import image

from safejax import errors
from safejax.evals import report


def _cell(suite, set_name, decoding, judge, rate, ci, n, per_prompt=None, **extra):
    metric = {"safety": "asr", "toxicity": "toxic_rate", "refusal": "refusal_rate"}[suite]
    return {"suite": suite, "set": set_name, "decoding": decoding, "judge": judge, "metric": metric,
            "n_prompts": n, "n_samples": n, "per_prompt": per_prompt or {}, "categories": {}, "invalid": 0,
            "rate": rate, "ci": ci, "rule_of_three_upper": 3 / n if rate == 0 else None, "per_category": {}, **extra}


def _run(tmp_path, name, cells, label=None, **fields):
    run_dir = tmp_path / name
    run_dir.mkdir()
    results = {"schema": 1, "checkpoint": f"/runs/{name}", "step": 200, "settings": {"decodings": ["greedy"]},
               "cells": cells, "utility": {}, "timings": {}, **fields}
    if label is not None:
        results["label"] = label
    (run_dir / "results.json").write_text(json.dumps(results))
    return str(run_dir)


def _tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table as (header, rows of cells)."""
    tables, lines = [], markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            split = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]  # noqa: E731
            header, rows, i = split(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split(lines[i]))
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def _lookup(markdown: str, first_header: str, row: str, column: str) -> str:
    for header, rows in _tables(markdown):
        if header[0] == first_header and column in header:
            for r in rows:
                if r[0] == row:
                    return r[header.index(column)]
    raise AssertionError(f"no table {first_header!r} with row {row!r} and column {column!r}")


def _assert_png(path):
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert np.ptp(pixels[..., :3]) > 0  # something is drawn


RUN_CELLS = [
    _cell("safety", "advbench", "greedy", "classifier", 0.288, [0.241, 0.335], 520,
          per_category={"cyber": {"rate": 0.5, "ci": [0.25, 0.75], "n_prompts": 8, "rule_of_three_upper": None},
                        "fraud": {"rate": 0.0, "ci": [0.0, 0.0], "n_prompts": 12, "rule_of_three_upper": 0.25}}),
    _cell("safety", "advbench", "safebeam", "classifier", 0.0, [0.0, 0.0], 100,
          per_category={"cyber": {"rate": 0.125, "ci": [0.0, 0.375], "n_prompts": 8, "rule_of_three_upper": None}}),
    _cell("safety", "advbench", "greedy", "refusal", 0.05, [0.02, 0.08], 520, invalid=3),
    _cell("refusal", "xstest_safe", "greedy", "refusal", 0.1, [0.05, 0.15], 250),
]


def test_report_tables_and_figures(tmp_path):
    utility = {"perplexity": {"perplexity": 12.3456, "perplexity_tag_removed": 11.9, "tokens": 5000, "documents": 40,
                              "mean_tag_probability": 0.0123},
               "multiple_choice": {"mc_sample": {"accuracy": 0.7, "ci": [0.4, 1.0], "n": 10, "per_item": {},
                                                 "accuracy_raw": 0.6, "ci_raw": [0.3, 0.9]}}}
    run_dir = _run(tmp_path, "run", RUN_CELLS, label="safety-pretrained", utility=utility,
                   timings={"generation_s": 12.5, "judging_s": 1.25, "generated_samples": 48.0,
                            "decode_tokens_per_s": 18.5})
    path = report.write_report(run_dir)
    assert path == os.path.join(run_dir, "report.md")
    md = open(path).read()
    assert md.startswith("# Evaluation: safety-pretrained")
    head = "suite / set (metric, judge)"
    assert _lookup(md, head, "safety / advbench (asr, classifier)", "greedy") == "28.8 [24.1, 33.5], n=520"
    assert _lookup(md, head, "safety / advbench (asr, classifier)", "safebeam") == \
        "0.0 [0.0, 0.0], n=100, ≤ 3.0 (rule of 3)"
    assert _lookup(md, head, "refusal / xstest_safe (refusal_rate, refusal)", "greedy") == "10.0 [5.0, 15.0], n=250"
    assert _lookup(md, head, "refusal / xstest_safe (refusal_rate, refusal)", "safebeam") == "–"
    # The refusal judge on the safety suite is not the headline (classifier came first) but has its table.
    assert "safety / advbench (asr, refusal)" not in md
    assert "## Judge: refusal" in md
    judge_rows = [rows for header, rows in _tables(md) if header[0] == "suite" and any(r[3] == "asr" and r[4] == "5.0"
                                                                                       for r in rows)][0]
    assert judge_rows[0][2:] == ["greedy", "asr", "5.0", "[2.0, 8.0]", "520", "520", "3", "–"]
    assert _lookup(md, "category", "cyber", "safebeam") == "12.5 [0.0, 37.5], n=8"
    assert _lookup(md, "category", "fraud", "greedy") == "0.0 [0.0, 0.0], n=12, ≤ 25.0 (rule of 3)"
    assert _lookup(md, "category", "fraud", "safebeam") == "–"
    assert _lookup(md, "held-out clean text", "perplexity", "value") == "12.346"
    assert _lookup(md, "held-out clean text", "perplexity, harm tag's mass removed", "value") == "11.900"
    assert _lookup(md, "multiple choice", "mc_sample", "accuracy % (per-byte log-likelihood)") == "70.0 [40.0, 100.0]"
    assert _lookup(md, "phase", "judging_s", "value") == "1.2 s"
    assert _lookup(md, "phase", "generated_samples", "value") == "48"
    assert _lookup(md, "phase", "decode_tokens_per_s", "value") == "18.5"
    for name in (report.RATES_FIGURE, report.CATEGORIES_FIGURE):
        assert f"]({name})" in md
        _assert_png(os.path.join(run_dir, name))


def test_report_without_categories_or_utility(tmp_path):
    run_dir = _run(tmp_path, "plain", [_cell("toxicity", "rtp", "greedy", "profanity", 0.25, [0.2, 0.3], 400)])
    md = open(report.write_report(run_dir)).read()
    assert md.startswith("# Evaluation: plain")  # no label: the directory's name
    assert "## Per category" not in md and "## Utility" not in md
    assert not os.path.exists(os.path.join(run_dir, report.CATEGORIES_FIGURE))
    _assert_png(os.path.join(run_dir, report.RATES_FIGURE))


def _prompts(ones, n=10, prefix="p"):
    return {f"{prefix}{i}": float(i < ones) for i in range(n)}


def test_compare_lays_runs_out_with_paired_differences(tmp_path):
    base = _run(tmp_path, "base", [
        _cell("safety", "advbench", "greedy", "classifier", 0.6, [0.3, 0.9], 10, _prompts(6)),
        _cell("safety", "advbench", "safebeam", "classifier", 0.4, [0.1, 0.7], 10, _prompts(4)),
        _cell("safety", "advbench", "randomdrop", "classifier", 0.5, [0.2, 0.8], 10, _prompts(5))], label="standard")
    safe = _run(tmp_path, "safe", [
        _cell("safety", "advbench", "greedy", "classifier", 0.3, [0.0, 0.6], 10, _prompts(3)),
        _cell("safety", "advbench", "safebeam", "classifier", 0.0, [0.0, 0.0], 10, _prompts(0))], label="safety")
    unlabelled = _run(tmp_path, "stage3", [
        _cell("safety", "advbench", "greedy", "classifier", 0.5, [0.2, 0.8], 10, _prompts(5, prefix="q"))])
    out = tmp_path / "cmp"
    md = report.compare([base, safe, unlabelled], str(out))
    assert (out / "compare.md").read_text() == md
    _assert_png(out / "compare.png")
    assert "## safety / advbench: asr, judge classifier" in md
    assert _lookup(md, "run", "standard", "greedy") == "60.0 [30.0, 90.0]"
    assert _lookup(md, "run", "safety", "safebeam") == "0.0 [0.0, 0.0], ≤ 30.0 (rule of 3)"
    assert _lookup(md, "run", "safety", "randomdrop") == "–"
    assert _lookup(md, "run", "stage3", "greedy") == "50.0 [20.0, 80.0]"
    # Against the first run, on shared prompts: safety's greedy loses p3..p5 (-30 points), p0..p2 agree.
    assert _lookup(md, "runs", "safety − standard", "greedy").startswith("-30.0 [")
    assert _lookup(md, "runs", "safety − standard", "greedy").endswith("pts, n=10")
    assert _lookup(md, "runs", "safety − standard", "safebeam").startswith("-40.0 [")
    assert _lookup(md, "runs", "stage3 − standard", "greedy") == "no shared prompts"
    # Between decodings of one run.
    assert _lookup(md, "run", "standard", "safebeam − greedy").startswith("-20.0 [")
    assert _lookup(md, "run", "standard", "safebeam − randomdrop").startswith("-10.0 [")
    assert _lookup(md, "run", "safety", "safebeam − randomdrop") == "–"
    assert report.compare([base]).startswith("# Comparison")


@pytest.mark.parametrize("content, message", [
    (None, r"not found"),
    ("{not json", r"not valid JSON"),
    ({"schema": 2, "cells": []}, r"field 'schema' is 2"),
    ({"schema": 1, "cells": {}}, r"field 'cells' must be a list"),
    ({"schema": 1, "cells": [{k: v for k, v in RUN_CELLS[0].items() if k != "rate"}]}, r"cells\[0\].rate: missing"),
    ({"schema": 1, "cells": [RUN_CELLS[0], {k: v for k, v in RUN_CELLS[0].items() if k != "judge"}]},
     r"cells\[1\].judge: missing"),
    ({"schema": 1, "cells": [{**RUN_CELLS[0], "per_prompt": []}]}, r"cells\[0\].per_prompt: must be dict"),
    ({"schema": 1, "cells": [{**RUN_CELLS[0], "ci": [0.1]}]}, r"cells\[0\].ci: must be \[low, high\]"),
    ({"schema": 1, "cells": [{**RUN_CELLS[0], "rate": 1.5}]}, r"cells\[0\].rate: must be a number in \[0, 1\]"),
    ({"schema": 1, "cells": [], "utility": []}, r"field 'utility' must be an object"),
])
def test_bad_results_json_names_the_file_and_field(tmp_path, content, message):
    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    if content is not None:
        (run_dir / "results.json").write_text(content if isinstance(content, str) else json.dumps(content))
    for call in (lambda: report.write_report(str(run_dir)), lambda: report.compare([str(run_dir)])):
        with pytest.raises(errors.UserError, match=re.escape(f"{run_dir}/results.json: ") + message):
            call()
