"""`safejax synth` in the whole pipeline: score folders of `safejax data split` in, the ablation
mixtures reading its records with no glue (`safejax data stats`, `safejax train`), the Beam job on
the DirectRunner, the classifier gate with a real (small, random) classifier, and the endpoint
backend end to end against `safejax serve` of a tiny checkpoint over HTTP on 127.0.0.1."""

import json
import os

import pytest

import safety_fixtures as fx
from pretrained_files import minilm_dir  # noqa: F401 (fixture)
from safejax import cli, config
from safejax.data.quarantine import QUARANTINE

QUIET = ["--gin.SynthConfig.progress_bar=False"]


@pytest.fixture(scope="module")
def synth_dirs(tmp_path_factory):
    """The fixture corpus split into score folders, then all three synth jobs (template backend)."""
    root = tmp_path_factory.mktemp("synth")
    paths = fx.make(str(root / "data"), documents=120)
    split = str(root / "split")
    QUARANTINE.reset()
    assert cli.main(["data", "split", "--output", split] +
                    ["--gin." + b.replace(" = ", "=") for b in fx.bindings(paths)]) == 0
    out = {"split": split, "paths": paths}
    for job, source in (("rephrase", split), ("refuseweb", split)):
        out[job] = str(root / job)
        assert cli.main(["synth", job, "--input", source, "--output", out[job], *QUIET]) == 0
    out["moral"] = str(root / "moral")
    assert cli.main(["synth", "moral", "--input", out["refuseweb"], "--output", out["moral"], *QUIET]) == 0
    QUARANTINE.write_to(None)
    return out


def _summary(directory):
    return json.load(open(os.path.join(directory, "summary.json")))


def _bindings(dirs) -> list[str]:
    return [f"SPLIT_DIR = {dirs['split']!r}", f"REPHRASED = [{dirs['rephrase'] + '/rephrased.jsonl'!r}]",
            f"REFUSEWEB = [{dirs['refuseweb'] + '/refuseweb.jsonl'!r}]",
            f"MORAL_EDUCATION = [{dirs['moral'] + '/moral_education.jsonl'!r}]", "safety_data.shuffle_buffer_size = 64"]


def test_split_folders_in_and_the_ablation_mixture_reads_every_kind(synth_dirs, capsys):
    rephrase, refuse, moral = (_summary(synth_dirs[j]) for j in ("rephrase", "refuseweb", "moral"))
    # fixture scores are id % 6: 1-3 are half the corpus, 4-5 a third
    assert set(rephrase["score_before"]) == {"1", "2", "3"} and set(refuse["score_before"]) == {"4", "5"}
    assert rephrase["kept"] > 0 and refuse["kept"] == refuse["items"] and moral["kept"] == refuse["kept"]
    capsys.readouterr()
    args = ["data", "stats", "ablation_full"] + ["--gin." + b.replace(" = ", "=", 1) for b in _bindings(synth_dirs)]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    for kind in ("rephrased", "refuseweb", "moral_education"):
        assert report["tasks"][kind]["documents"] > 0, kind


@pytest.mark.slow
def test_the_lm_trains_on_ablation_full_from_synth_output(synth_dirs, tmp_path):
    from conftest import FAST, TINY
    from safejax.train import pretrain

    config.parse([TINY, "data/safety.gin"], FAST + _bindings(synth_dirs) + [
        f"CORPUS = {[synth_dirs['paths']['corpus']]!r}", "MIXTURE = 'ablation_full'", "DataConfig.seq_len = 64",
        "TRAIN_STEPS = 2", "CHECKPOINT_EVERY = 2", "safety_data.validation_permille = 300",
        "corpus/jsonl_source.validation_permille = 300"])
    summary = pretrain.train(str(tmp_path / "run"))
    metrics = [json.loads(line) for line in open(summary["metrics"])]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2


def test_the_beam_job_writes_the_same_records_as_a_local_run(synth_dirs, tmp_path):
    out = str(tmp_path / "beam")
    assert cli.main(["synth", "refuseweb", "--input", synth_dirs["split"], "--output", out, "--beam", *QUIET]) == 0
    local = sorted(open(os.path.join(synth_dirs["refuseweb"], "refuseweb.jsonl")).read().splitlines())
    parts = sorted(p for p in os.listdir(out) if p.startswith("part-"))
    beam = sorted(line for p in parts for line in open(os.path.join(out, p, "refuseweb.jsonl")).read().splitlines())
    assert beam == local and len(parts) >= 2


@pytest.mark.slow
def test_the_gate_scores_every_output_with_a_real_classifier(synth_dirs, tmp_path, minilm_dir):
    from test_scoring import small_classifier

    model = small_classifier(str(tmp_path / "classifier" / "model"))
    out = str(tmp_path / "gated")
    assert cli.main(["synth", "moral", "--input", synth_dirs["refuseweb"], "--output", out, "--classifier", model,
                     "--gin.SynthConfig.reject_at={'moral': 3}", *QUIET]) == 0
    summary = _summary(out)
    assert summary["kept"] + summary["rejected"] == summary["items"]
    assert "None" not in summary["score_after"]  # every output was scored
    for name in ("moral_education.jsonl", "rejected.jsonl"):
        for line in open(os.path.join(out, name)) if os.path.exists(os.path.join(out, name)) else []:
            record = json.loads(line)
            assert (record["provenance"]["score_after"] >= 3) == (name == "rejected.jsonl")


@pytest.mark.slow
def test_endpoint_backend_against_safejax_serve(synth_dirs, tmp_path, monkeypatch):
    """Real HTTP to the project's own server: requests, replies and the cache work end to end. A
    two-step model writes nonsense that runs to max_tokens, so most replies are invalid and kept
    with their raw text; what is asserted is that every item is settled exactly once."""
    from conftest import FAST, TINY
    from safejax.inference.generate import Generator
    from safejax.inference.server import Server, ServerConfig
    from safejax.train import pretrain

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    workdir = str(tmp_path / "lm")
    config.parse([TINY], FAST + ["TRAIN_STEPS = 2", "TrainConfig.async_checkpoints = False",
                                 "SEQ_LEN = 1024"])  # room for the prompt
    pretrain.train(workdir)
    server = Server(Generator.from_checkpoint(workdir), ServerConfig(port=0, batch_wait_ms=50), model_name="tiny").start()
    try:
        out = str(tmp_path / "served")
        args = ["synth", "moral", "--input", synth_dirs["refuseweb"] + "/refuseweb.jsonl", "--output", out,
                "--backend", "endpoint", "--base_url", server.url + "/v1", "--model", "tiny", "--concurrency", "4",
                "--gin.ChatEndpoint.max_tokens=8", "--gin.ChatEndpoint.temperature=0.0", *QUIET]
        assert cli.main(args) == 0
        summary = _summary(out)
        assert summary["kept"] + summary["invalid"] == summary["items"] > 0
        assert summary["requests"] >= summary["items"] and summary["tokens_out"] > 0
        invalid = [json.loads(line) for line in open(os.path.join(out, "invalid.jsonl"))]
        assert all(r["raw"] is not None and r["backend"] == "endpoint" and r["model"] == "tiny" for r in invalid)
        assert cli.main(args) == 0 and _summary(out)["requests"] == 0  # the rerun sends nothing
    finally:
        server.shutdown()
