"""`safejax demo`: the stage runner's resume (a stage that fails midway runs again, finished ones
are skipped), the demo corpus (deterministic, no `<unk>`, the classifier's test splits held
out), and `safejax demo --quick` end to end with a real rerun that resumes two stages."""

import glob
import gzip
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO
from pretrained_files import minilm_dir  # noqa: F401 (fixture)

from safejax.demo import corpus, pipeline, settings, stages


def test_a_failed_stage_runs_again_and_finished_ones_are_skipped(tmp_path):
    calls = []

    def stage(name, fail=False):
        def run():
            calls.append(name)
            (tmp_path / f"{name}.partial").write_text("half")
            if fail:
                raise RuntimeError(f"{name} killed")
            return {"wrote": name}
        return run

    first = [stages.Stage("a", "does a", stage("a")), stages.Stage("b", "does b", stage("b", fail=True)),
             stages.Stage("c", "does c", stage("c"))]
    lines = []
    with pytest.raises(RuntimeError, match="b killed"):
        stages.run_stages(str(tmp_path), first, lines.append)
    assert calls == ["a", "b"]
    assert stages.finished(str(tmp_path), "a")["summary"] == {"wrote": "a"}
    assert stages.finished(str(tmp_path), "b") is None  # no marker for the stage that died
    second = [first[0], stages.Stage("b", "does b", stage("b")), first[2]]
    markers = stages.run_stages(str(tmp_path), second, lines.append)
    assert calls == ["a", "b", "b", "c"]  # a skipped, b run again, then c
    assert list(markers) == ["a", "b", "c"] and markers["b"]["summary"] == {"wrote": "b"}
    assert any(line.startswith("[1/3] a: finished earlier") for line in lines)
    assert any(line.startswith("[2/3] b: done in") and line.endswith("over 2 attempts") for line in lines)
    assert markers["b"]["attempts"] == 2 and markers["a"]["attempts"] == 1


def test_wikitext_cleaning_drops_unk_sentences_and_headings():
    text = " = Heading = \n The cat sat on the mat . It ate a <unk> for lunch . Then it slept @-@ soundly " \
           "through the night , as cats do .\n = = Sub = = \n"
    cleaned = corpus.clean_wikitext(text)
    assert "<unk>" not in cleaned and "Heading" not in cleaned and "Sub" not in cleaned
    assert cleaned == "The cat sat on the mat. Then it slept-soundly through the night, as cats do."


def _quick_corpus(tmp_path, name):
    from safejax import config
    from safejax.safety import documents, labeled
    from safejax.train import classify  # noqa: F401

    cfg = settings.load(["demo/quick.gin"], [])
    config.parse(list(cfg.classifier_gin), [])
    labeled_cfg, doc_cfg = labeled.LabeledDataConfig(), documents.DocumentDataConfig()
    counts = corpus.compose(str(tmp_path / name), cfg, labeled_cfg, doc_cfg)
    return cfg, counts, labeled_cfg, doc_cfg


def _records(directory):
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl.gz"))):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            out += [json.loads(line) for line in f]
    return out


def test_demo_corpus_is_deterministic_clean_and_keeps_the_test_splits_out(tmp_path):
    from safejax.data import sources
    from safejax.safety import labeled

    cfg, counts, labeled_cfg, doc_cfg = _quick_corpus(tmp_path, "one")
    _quick_corpus(tmp_path, "two")
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert one == two and one
    assert set(counts) == set(cfg.corpus_chars) | {"held_out_clean"} and counts["held_out_clean"]["documents"] > 0
    for name, budget in cfg.corpus_chars.items():
        assert counts[name]["documents"] > 0 and counts[name]["characters"] <= budget + cfg.max_document_chars
    assert not any("<unk>" in r["text"] for r in one)
    assert os.path.isfile(tmp_path / "one" / "SOURCES.md")
    # corpus documents of the classifier's document test split are not in the corpus
    from safejax.safety import documents

    for r in one:
        source, _, doc_id = r["id"].partition(":")
        if source != corpus.SNIPPETS:
            assert documents.split_of(f"{source}:{doc_id}", doc_cfg.seed, doc_cfg.split_fractions) != "test"
    # no labeled snippet of the classifier's test split is in a thread
    import dataclasses

    every = dataclasses.replace(labeled_cfg, sources=tuple(labeled.SOURCES))
    _, loaded = labeled.load(every)
    test = {e.text.strip() for e in labeled.split(loaded.examples, every.seed, every.split_fractions)["test"]}
    lines = {line for r in one if r["source"] == corpus.SNIPPETS for line in r["text"].split("\n")}
    assert lines and not lines & test
    assert len(list(sources.iter_records(sorted(glob.glob(str(tmp_path / "one" / "*.jsonl.gz")))))) == len(one)


def _demo(workdir, *extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user runs it: the real devices
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "safejax.cli", "demo", "--quick", "--workdir", workdir, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, time.perf_counter() - began


@pytest.mark.slow
def test_demo_quick_end_to_end_and_a_rerun_resumes(tmp_path, minilm_dir):  # noqa: F811
    workdir = str(tmp_path / "demo")
    out, _ = _demo(workdir)
    demo = pipeline.Demo(workdir, settings.load(["demo/quick.gin"], []))
    names = [s.name for s in demo.stages()]
    for name in names:
        assert f"] {name}: done in" in out
        assert stages.finished(workdir, name) is not None, name
    assert os.path.isfile(demo.path("classifier", "model", "classifier.json"))
    assert stages.finished(workdir, "classifier")["summary"]["test"]["model"]["n"] > 0
    assert demo.corpus_files() and glob.glob(demo.path("scores", "*.jsonl.gz"))
    assert glob.glob(demo.path("split", "score_0", "*"))
    synth = stages.finished(workdir, "synth")["summary"]
    assert set(synth) == {"rephrase", "refuseweb", "moral"}
    assert all(os.path.isfile(s["output"]) for s in synth.values())
    for run in pipeline.LM_RUNS:
        assert glob.glob(demo.path("lm", run, "checkpoints", "*"))
        assert glob.glob(demo.path("finetune", run, "checkpoints", "*"))
    for run in pipeline.EVAL_RUNS:
        results = pipeline.load_results(demo, run)
        cells = {(c["suite"], c["decoding"]) for c in results["cells"]}
        assert cells == {(s, d) for s in ("safety", "toxicity", "refusal") for d in demo.cfg.decodings}
        assert results["utility"]["perplexity"]["perplexity_tag_removed"] > 0
    with open(demo.path("report.md"), encoding="utf-8") as f:
        report = f.read()
    for section in ("## Figure 1", "## Efficacy targets", "## Paired differences", "## Every decoding",
                    "## Perplexity", "## The classifier", "## The demo corpus", "## Synthetic data",
                    "## Training", "## Stage wall times", "SAFE + Safe Beam", "SAFE + random drop (control)",
                    "after benign finetuning"):
        assert section in report, section
    assert "n/a" not in report.split("## Efficacy targets")[0]  # every Figure 1 cell measured
    assert os.path.isfile(demo.path("figure1.png")) and os.path.isfile(demo.path("stage_times.png"))
    assert f"report: {demo.path('report.md')}" in out and "| after benign finetuning |" in out
    assert os.listdir(demo.path("xla_cache"))  # the stages' compilations, reused by later stages and reruns
    # A rerun skips the finished stages; with two markers gone (as after a kill in the last eval)
    # those two run again, the eval from its cached generations.
    os.remove(stages.marker_path(workdir, "eval_safe_gsm8k"))
    os.remove(stages.marker_path(workdir, "report"))
    again, _ = _demo(workdir)
    for name in names[:-2]:
        assert f"] {name}: finished earlier" in again, name
    assert "] eval_safe_gsm8k: done in" in again and "] report: done in" in again
    cached = pipeline.load_results(demo, "safe-gsm8k")["timings"]
    assert cached["generated_samples"] == 0 and cached["cached_samples"] > 0


def test_demo_refuses_another_mode_in_the_same_workdir(tmp_path):
    from safejax import cli

    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "manifest.json").write_text(json.dumps({"mode": "full", "base_url": None, "model": None}))
    assert cli.main(["demo", "--quick", "--workdir", str(workdir)]) == 2
    assert cli.main(["demo", "--quick", "--workdir", str(workdir), "--base_url", "http://127.0.0.1:1/v1"]) == 2


def test_safe_trains_without_the_kinds_the_classifier_left_empty(tmp_path):
    """A classifier that puts nothing at 4-5 leaves RefuseWeb (and so Moral Education) and the
    tagged 4-5 originals without data: the synth stage skips those jobs and SAFE's mixture drops
    those kinds, saying why, instead of failing."""
    import gin

    from safejax import config

    (tmp_path / "stages").mkdir()

    def mark(name, summary):
        stages.write_json(stages.marker_path(str(tmp_path), name), {"stage": name, "wall_s": 1.0, "summary": summary})

    folders = {"score_0": 258, "score_1": 0, "score_2": 1, "score_3": 166, "score_4": 0, "score_5": 0}
    mark("split", {"documents": folders})
    assert pipeline._no_input("rephrase", folders, {}) is None
    assert pipeline._no_input("refuseweb", folders, {}) == "no documents scored 4-5"
    assert pipeline._no_input("moral", folders, {"refuseweb": {"kept": 0}}) is not None
    mark("synth", {"rephrase": {"output": str(tmp_path / "r"), "kept": 30},
                   "refuseweb": {"skipped": "no documents scored 4-5", "items": 0, "kept": 0},
                   "moral": {"skipped": "no RefuseWeb dialogues to turn into articles", "items": 0, "kept": 0}})
    demo = pipeline.Demo(str(tmp_path), settings.load(["demo/full.gin"], []))
    files = ["demo/lm.gin", "ablations/full.gin"]
    extra, dropped = demo._without_empty_kinds(files, [])
    assert dropped["dropped_kinds"] == {"refuseweb": "no documents scored 4-5",
                                        "moral_education": "no RefuseWeb dialogues to turn into articles",
                                        "score_4_5_tagged": "no documents scored 4-5"}
    config.parse(files, extra)
    kinds = {**gin.query_parameter("safety_data.ablations"),
             **gin.query_parameter("safety_data.extra_ablations")}[gin.query_parameter("%MIXTURE")]
    assert kinds == ["score_0", "rephrased", "score_1_3_tagged"]


def test_4chan_threads_lose_their_post_headers_and_links():
    thread = ("Anonymous 06/07/17(Wed)03:37:31 No.128843129: first post /his/?\n\n\n"
              "Anonymous 06/07/17(Wed)03:38:38 No.128843200: >>128843129\nsecond post\n\n\n"
              "Anonymous 06/07/17(Wed)03:42:07 No.128843410: >>>/a/\n\n\n"
              "Anonymous 06/07/17(Wed)03:43:01 No.128843464: a reply in 1939.")
    assert corpus.clean_4chan(thread) == "first post /his/?\n\nsecond post\n\na reply in 1939."
