"""`safejax bench score`: one JSON line with the throughput figures, on a few bundled documents."""

import json

import pytest
from pretrained_files import minilm_dir  # noqa: F401 (fixture)
from test_scoring import small_classifier

from safejax import cli

FIELDS = {"docs_per_sec", "tokens_per_sec", "windows_per_sec", "batch", "seq_len", "docs", "windows",
          "tokens", "devices", "load_avg_1m", "windows_sha1"}


def _run(capsys, *argv):
    assert cli.main(["bench", "score", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_score_prints_its_figures(tmp_path, minilm_dir, capsys):  # noqa: F811
    model = small_classifier(str(tmp_path / "model"))
    result = _run(capsys, "--checkpoint", model, "--docs", "3", "--warmup", "1", "--batch", "8", "--overlap", "8")
    assert FIELDS <= set(result)
    assert result["docs"] == 3 and result["batch"] == 8 and result["seq_len"] == 32
    assert result["windows"] > 3 and result["tokens"] <= 32 * result["windows"]
    assert result["tokens_per_sec"] > result["windows_per_sec"] > result["docs_per_sec"] > 0
    again = _run(capsys, "--checkpoint", model, "--docs", "3", "--warmup", "0", "--batch", "8", "--overlap", "4")
    assert again["windows"] < result["windows"] and again["windows_sha1"] != result["windows_sha1"]


@pytest.mark.slow
def test_bench_score_defaults_to_pretrained_minilm(minilm_dir, capsys):  # noqa: F811
    result = _run(capsys, "--docs", "1", "--warmup", "0")
    assert result["seq_len"] == 256 and result["batch"] == 32 and result["docs"] == 1
    assert result["overlap"] == 32
