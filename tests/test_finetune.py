"""`safejax finetune`: starts from another run's parameters exactly, records its source, refuses
a source it cannot continue, resumes a killed finetune like an uninterrupted one, and a tiny
pretrain -> instruct -> gsm8k chain whose every stage samples."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import FAST, TINY
from safejax import cli, config
from safejax.evals import gsm8k
from safejax.inference import checkpoint as inference_checkpoint
from safejax.inference.generate import Generator
from safejax.train import checkpoint
from test_cli import _env, _records, _wait_for_step

QUICK = ["SEQ_LEN=64", "BATCH_SIZE=8", "DataConfig.eval_batches=0", "TrainConfig.progress_bar=False"]


def _gin(bindings):
    return [f"--gin.{b.replace(' ', '')}" for b in bindings]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny pretrained run: 4 steps, checkpoints at 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    args = ["train", f"--gin_file={TINY}", *_gin(FAST), "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_EVERY=2",
            "--gin.DataConfig.eval_batches=0", f"--workdir={workdir}"]
    assert cli.main(args) == 0
    return workdir


def _finetune(capsys, source, workdir, stage="gsm8k", *bindings, step=None):
    args = ["finetune", f"--from={source}", f"--gin_file=finetune/{stage}.gin", f"--workdir={workdir}",
            *_gin(QUICK), *_gin(bindings)] + ([f"--step={step}"] if step else [])
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else err.strip().splitlines())


def _logits(workdir, step=None):
    inference_checkpoint.parse_config(workdir)
    loaded = inference_checkpoint.load(workdir, step)
    tokens = np.asarray([list(loaded.vocabulary.encode("The river and the stone"))], np.int32)
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    return np.asarray(jax.device_get(loaded.model(tokens, positions, np.ones_like(tokens))))


def test_a_finetune_starts_from_the_source_parameters_exactly_and_records_it(capsys, source, tmp_path):
    code, summary = _finetune(capsys, source, tmp_path / "ft", "gsm8k", "TRAIN_STEPS=1", "PEAK_LR=0.0",
                              "GSM8K_EVAL=0", step=2)
    assert code == 0 and summary["start_step"] == 0 and summary["step"] == 1
    assert np.array_equal(_logits(str(tmp_path / "ft")), _logits(source, 2))  # lr 0: the source's own logits
    record = checkpoint.read_record(str(tmp_path / "ft"))
    assert record.init_from == {"workdir": os.path.abspath(source), "step": 2}
    assert record.model_config == checkpoint.read_record(source).model_config
    written = open(tmp_path / "ft" / "config.gin").read()
    assert f"InitFrom.workdir = '{os.path.abspath(source)}'" in written and "DecoderConfig.d_model = 128" in written


@pytest.mark.parametrize("problem", ["not_a_workdir", "no_such_step", "shape", "vocabulary", "other_source"])
def test_a_source_it_cannot_continue_is_a_one_line_error(capsys, source, tmp_path, problem):
    workdir, extra, step, origin = tmp_path / "ft", [], None, source
    if problem == "not_a_workdir":
        origin, message = str(tmp_path), "not a safejax training workdir"
    elif problem == "no_such_step":
        step, message = 3, "no checkpoint of step 3"
    elif problem == "shape":
        extra, message = ["DecoderConfig.d_model=64"], "changes the model's shapes: d_model=64 (the source has 128)"
    elif problem == "vocabulary":
        extra, message = [f"chat_task.vocab_path='{_other_vocabulary(tmp_path)}'"], "its vocabulary"
    else:
        assert _finetune(capsys, source, workdir, "gsm8k", "TRAIN_STEPS=1", "GSM8K_EVAL=0", step=2)[0] == 0
        extra, message = ["TRAIN_STEPS=2"], "was started from"
    code, err = _finetune(capsys, origin, workdir, "gsm8k", "GSM8K_EVAL=0", *extra, step=step)
    assert code == 2 and len(err) == 1 and err[0].startswith("safejax: error:"), err
    assert message in err[0]


def _other_vocabulary(tmp_path):
    from safejax import vocab
    from safejax.data import sources

    path = str(tmp_path / "other.model")
    texts = (t for t, _ in zip(sources.iter_texts(sources.bundled_corpus_files()), range(200)))
    return vocab.train_sentencepiece(texts, path, vocab_size=500)


def _finetune_cmd(source, workdir, *bindings):
    return [sys.executable, "-m", "safejax.cli", "finetune", f"--from={source}", "--gin_file=finetune/gsm8k.gin",
            f"--workdir={workdir}", *_gin(QUICK), "--gin.GSM8K_EVAL=0", *_gin(bindings)]


@pytest.mark.slow
def test_kill_mid_finetune_and_resume_reproduces_the_uninterrupted_loss_curve(source, tmp_path):
    steps = ["TRAIN_STEPS=12", "CHECKPOINT_EVERY=4"]
    straight = tmp_path / "straight"
    subprocess.run(_finetune_cmd(source, straight, *steps), env=_env(), check=True, capture_output=True, timeout=600)
    expected = {r["step"]: r["loss"] for r in _records(straight)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_finetune_cmd(source, killed, *steps), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(proc, killed, 6, checkpoint=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_records(killed))
    result = subprocess.run(_finetune_cmd(source, killed, *steps), env=_env(), check=True, capture_output=True,
                            text=True, timeout=600)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["start_step"] in (4, 8) and summary["step"] == 12
    for r in _records(killed)[done:]:  # resumed from its own checkpoint, bit-identical on the CPU
        assert r["loss"] == expected[r["step"]], r["step"]


@pytest.mark.slow
def test_pretrain_instruct_gsm8k_chain_and_every_stage_samples(capsys, source, tmp_path):
    instruct, maths = str(tmp_path / "instruct"), str(tmp_path / "gsm8k")
    code, summary = _finetune(capsys, source, instruct, "instruct", "TRAIN_STEPS=3")
    assert code == 0 and summary["step"] == 3
    code, summary = _finetune(capsys, instruct, maths, "gsm8k", "TRAIN_STEPS=3", "GSM8K_EVAL=2",
                              "gsm8k_accuracy.max_new_tokens=8")
    assert code == 0 and summary["gsm8k"]["examples"] == 2 and 0.0 <= summary["gsm8k"]["accuracy"] <= 1.0
    assert summary["gsm8k"]["too_long"] == 1  # at SEQ_LEN 64 the first question leaves no room to answer
    assert checkpoint.read_record(maths).init_from["workdir"] == os.path.abspath(instruct)
    for workdir in (source, instruct, maths):
        generator = Generator.from_checkpoint(workdir)
        [completion] = generator.run([_chat_request(generator)])
        assert completion.tokens and completion.finish_reason in ("stop", "length")
    config.parse([], [])


def _chat_request(generator):
    from safejax.inference.generate import Request

    prompt = generator.encode_chat([{"role": "user", "content": "How many apples are left?"}])
    return Request(prompt, generator.params(strategy="greedy", max_new_tokens=4), chat=True)


def test_gsm8k_final_numbers():
    assert gsm8k.final_number("3 + 4 = 7 apples\n#### 1,200") == "1200"
    assert gsm8k.final_number("so she pays 12.0 dollars.") == "12"
    assert gsm8k.final_number("#### -5") == "-5" and gsm8k.final_number("no number") is None
    assert [r["answer"].rsplit("####", 1)[1].strip() for r in gsm8k.questions(2)] == ["18", "3"]
