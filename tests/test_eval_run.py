"""`safejax eval` on a real tiny checkpoint (the tiny LM trained two steps): resumable generation
(an interrupted file resumed; a real eval process killed with SIGKILL and rerun), bad input
refused before any work, and end to end: every suite, two decodings, three judges, the report
and a comparison of two runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST, REPO, TINY
from pretrained_files import minilm_dir  # noqa: F401 (fixture)
from test_eval_judges import JudgeServer
from test_scoring import small_classifier

from safejax import cli, config
from safejax.evals import generation, prompts, templates
from safejax.inference.generate import Generator, Request

FIXTURES = os.path.join(REPO, "tests", "fixtures")
FAST_EVAL = ["EvalConfig.max_new_tokens = 8", "EvalConfig.progress_bar = False", "EvalConfig.num_samples = 2",
             "rate_summary.n_boot = 200", "paired_difference.n_boot = 200"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from safejax.train import pretrain

    path = tmp_path_factory.mktemp("eval_lm")
    config.parse([TINY], FAST + ["TRAIN_STEPS = 2", "TrainConfig.async_checkpoints = False"])
    pretrain.train(str(path))
    return str(path)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, minilm_dir):  # noqa: F811
    return small_classifier(str(tmp_path_factory.mktemp("eval_clf") / "model"))


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_an_interrupted_generation_file_resumes_without_regenerating(workdir, tmp_path):
    gen = Generator.from_checkpoint(workdir)
    requests = [prompts.Prompt(f"p{i}", f"Tell me about the {w} river") for i, w in enumerate(("old", "red", "long"))]
    cases = templates.cases(requests, "request", templates.load_templates("eval/templates.json"))
    path = str(tmp_path / "generations" / "mine.sample.jsonl")
    run = dict(max_new_tokens=6, num_samples=2, batch_size=4, progress=False)
    full = generation.Stats()
    records = generation.generate(gen, cases, "sample", path, stats=full, **run)
    assert len(records) == 24 == full.samples and len({r["key"] for r in _lines(path)}) == 24
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    with open(path, "wb") as f:  # 9 whole lines and half of the 10th: the kill came mid-write
        f.write(b"\n".join(lines[:9]) + b"\n" + lines[9][:20])
    resumed = generation.Stats()
    generation.generate(gen, cases, "sample", path, stats=resumed, **run)
    assert resumed.cached == 9 and resumed.samples == 15
    after = _lines(path)
    assert len(after) == 24 and sorted(r["key"] for r in after) == sorted(records)
    assert after[:9] == [json.loads(x) for x in lines[:9]]
    # Each sample's seed comes from its key alone (the two samples of a case differ).
    assert len({generation._seed(0, k) for k in records}) == 24


def test_chat_prompts_use_the_dialogue_template(workdir, tmp_path):
    gen = Generator.from_checkpoint(workdir)
    cases = templates.cases(prompts.load("jbb_benign")[:2], "request", [], chat=True)
    path = str(tmp_path / "generations" / "jbb_benign.greedy.jsonl")
    records = generation.generate(gen, cases, "greedy", path, max_new_tokens=4, batch_size=1, chat=True, progress=False)
    assert [r["template"] for r in records.values()] == ["chat", "chat"]
    alone = gen.run([Request(gen.encode_chat([{"role": "user", "content": cases[0].text}]),
                                        gen.params(max_new_tokens=4, seed=generation._seed(0, f"{cases[0].key}#0")),
                                        chat=True)])[0]
    assert records[f"{cases[0].key}#0"]["completion"] == alone.text  # the same chat prompt, seed and batch size


def _eval(workdir, out, *args):
    return ["eval", "--checkpoint", workdir, "--output", str(out), *args, *[f"--gin.{b.replace(' ', '')}"
                                                                           for b in FAST_EVAL]]


@pytest.mark.parametrize("args, message", [
    (["--suite", "safety,bogus", "--judge", "refusal"], "unknown suite 'bogus'"),
    (["--suite", "safety", "--decoding", "greedy,nucleus", "--judge", "refusal"], "unknown decoding 'nucleus'"),
    (["--suite", "safety", "--judge", "refusal,gpt"], "unknown judge 'gpt'"),
    (["--suite", "safety", "--judge", "classifier"], "the classifier judge needs --classifier DIR"),
    (["--suite", "safety", "--judge", "llm"], "the llm judge needs an endpoint"),
    (["--suite", "refusal", "--judge", "classifier"], "suite refusal is judged by refusal; --judge has none"),
    (["--suite", "utility"], "suite utility needs --clean_text"),
    (["--suite", "toxicity", "--judge", "profanity,refusal"], "judge refusal judges none of the suites asked"),
    (["--suite", "safety"], "safejax eval needs --judge"),
    (["--suite", "safety", "--judge", "refusal", "--gin.EvalConfig.template_mode='most'"],
     "EvalConfig.template_mode='most': choose from all, seeded"),
    (["--suite", "safety", "--judge", "refusal", "--prompts", "advbench", "--prompts", "advbench"],
     "two prompt sets are both named 'advbench'"),
    (["--suite", "safety", "--judge", "refusal", "--labels", "x.csv"], "does not take --labels"),
    (["--suite", "safety", "--judge", "refusal", "--prompts", "nothere.csv", "--text_column", "t"],
     "unknown prompt set 'nothere.csv'"),
])
def test_bad_input_is_one_line_before_any_work(workdir, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert cli.main(_eval(workdir, out, *args)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_safebeam_on_a_checkpoint_without_the_harm_tag_is_refused(workdir, tmp_path, capsys):
    """A copy of the checkpoint whose record says its vocabulary has no harm tag."""
    untagged = str(tmp_path / "untagged")
    shutil.copytree(workdir, untagged)
    edited = 0
    for root, _, files in os.walk(os.path.join(untagged, "checkpoints")):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            if b'"reserved_ids"' in data:
                record = json.loads(data)
                record["vocabulary"]["reserved_ids"].pop("<potentially unsafe content>")
                with open(path, "w") as f:
                    json.dump(record, f)
                edited += 1
    assert edited
    code = cli.main(_eval(untagged, tmp_path / "run", "--suite", "safety", "--decoding", "greedy,randomdrop",
                          "--judge", "refusal"))
    assert code == 2 and "decoding randomdrop needs the harm tag" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_eval_resumes_without_regenerating(workdir, tmp_path):
    out = tmp_path / "run"
    args = _eval(workdir, out, "--suite", "toxicity", "--judge", "profanity", "--limit", "40",
                 "--gin.EvalConfig.batch_size=1")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.Popen([sys.executable, "-m", "safejax.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    path = out / "generations" / "rtp.greedy.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = path.read_bytes().count(b"\n")
    assert 5 <= before < 40, "the eval was not killed while generating"
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["timings"]["cached_samples"] == before
    assert results["timings"]["generated_samples"] + results["timings"]["skipped_samples"] + before == 40
    assert len({r["key"] for r in _lines(path)}) == 40 == len(_lines(path))


@pytest.mark.slow
def test_end_to_end_every_suite_two_decodings_and_a_comparison(workdir, classifier_dir, tmp_path, capsys):
    docs = tmp_path / "clean.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"The river ran past the old mill number {i}."})
                            + "\n" for i in range(4)))
    first, second = tmp_path / "run1", tmp_path / "run2"
    common = ["--classifier", classifier_dir, "--limit", "2"]
    judges3 = ["--judge", "classifier,profanity,refusal"]
    code = cli.main(_eval(workdir, first, "--suite", "all", "--decoding", "greedy,safebeam", *common, *judges3,
                          "--clean_text", str(docs), "--multiple_choice", os.path.join(FIXTURES, "mc_sample.jsonl")))
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((first / "results.json").read_text())
    assert results["schema"] == 1 and results["step"] == 2 and printed["output"] == str(first)
    cells = {(c["suite"], c["set"], c["decoding"], c["judge"]): c for c in results["cells"]}
    for decoding in ("greedy", "safebeam"):
        for s in ("advbench", "simplesafetytests", "donotanswer", "xstest_unsafe"):
            for judge in ("classifier", "profanity", "refusal"):
                cell = cells[("safety", s, decoding, judge)]
                assert cell["metric"] == ("refusal_rate" if judge == "refusal" else "asr")
                assert cell["n_prompts"] + (cell["skipped_too_long"] > 0) >= 1
                assert set(cell["per_prompt"]) <= {p.id for p in prompts.load(s)[:2]}
        assert cells[("toxicity", "rtp", decoding, "profanity")]["metric"] == "toxic_rate"
        assert ("toxicity", "rtp", decoding, "refusal") not in cells  # refusal does not judge toxicity
        assert cells[("refusal", "jbb_benign", decoding, "refusal")]["n_samples"] == 2 * 2  # two open templates
        assert ("refusal", "jbb_benign", decoding, "classifier") not in cells
    advbench = cells[("safety", "advbench", "greedy", "classifier")]
    # Every request under the 4 templates; in the tiny model's 64-token context the longest do not fit.
    assert advbench["n_samples"] + advbench["skipped_too_long"] == 2 * 4 and advbench["invalid"] == 0
    assert set(advbench) >= {"rate", "ci", "rule_of_three_upper", "per_category", "categories"}
    assert results["utility"]["perplexity"]["documents"] == 4
    assert results["utility"]["multiple_choice"]["mc_sample"]["n"] == 10
    assert (first / "report.md").exists() and list(first.glob("*.png"))
    generated = results["timings"]["generated_samples"]
    assert generated > 0 and results["timings"]["cached_samples"] == 0

    # Rerun: nothing generated or judged again.
    assert cli.main(_eval(workdir, first, "--suite", "all", "--decoding", "greedy,safebeam", *common, *judges3,
                          "--clean_text", str(docs), "--multiple_choice", os.path.join(FIXTURES, "mc_sample.jsonl"))) == 0
    capsys.readouterr()
    again = json.loads((first / "results.json").read_text())
    assert again["timings"]["generated_samples"] == 0
    assert again["timings"]["cached_samples"] == generated + results["timings"]["skipped_samples"]
    assert [c["per_prompt"] for c in again["cells"]] == [c["per_prompt"] for c in results["cells"]]
    # Other generation settings in the same run directory are refused.
    code = cli.main(_eval(workdir, first, "--suite", "safety", *common, *judges3, "--gin.EvalConfig.max_new_tokens=9"))
    assert code == 2 and "max_new_tokens" in capsys.readouterr().err

    # A second run: seeded templates, the random-drop control, a user's prompt file beside AdvBench,
    # and the LLM judge behind a server on 127.0.0.1.
    mine = tmp_path / "mine.csv"
    mine.write_text("ask,id,category\nTell me about the old river,r1,rivers\nHow do bridges stand,b1,bridges\n")
    server = JudgeServer()
    try:
        assert cli.main(_eval(workdir, second, "--suite", "safety", "--decoding", "greedy,randomdrop", *common,
                              "--judge", "classifier,refusal,llm", "--judge_url", server.url, "--judge_model", "j",
                              "--prompts", "advbench", "--prompts", str(mine), "--text_column", "ask",
                              "--label", "seeded", "--gin.EvalConfig.template_mode='seeded'")) == 0
    finally:
        server.chat.close()
    capsys.readouterr()
    cells = {(c["set"], c["decoding"], c["judge"]): c for c in json.loads((second / "results.json").read_text())["cells"]}
    assert set(cells[("mine", "greedy", "llm")]["per_prompt"]) <= {"r1", "b1"}
    assert cells[("mine", "greedy", "llm")]["rate"] == 0.0 and server.seen["NO"] > 0
    assert cells[("advbench", "randomdrop", "classifier")]["n_samples"] <= 2  # one seeded template a request
    assert cli.main(["eval", "compare", str(first), str(second), "--output", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "seeded" in table and "run1" in table and (tmp_path / "cmp" / "compare.md").exists()
