"""`safejax train` as users run it: one-line errors for bad input, preemption, kill and resume,
and a real two-process (multi-controller) run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAST, REPO, TINY
from safejax import cli


def _main(capsys, *args):
    code = cli.main(["train", f"--gin_file={TINY}", *[f"--gin.{b.replace(' ', '')}" for b in FAST], *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("args,message", [
    (["--gin_file=configs/lm/nope.gin"], "gin file not found: configs/lm/nope.gin"),
    (["--gin.NoSuchThing.x=1"], "No configurable matching 'NoSuchThing'"),
    (["--gin.TRAIN_STEPS='many'"], "TRAIN_STEPS must be a positive integer, got 'many'"),
    (["--gin.TRAIN_STEPS=1)"], "in binding 'TRAIN_STEPS = 1)'"),
    (["--gin.TRAIN_STEP=5"], "no gin file defines or reads the macro TRAIN_STEP; did you mean TRAIN_STEPS?"),
    (["--gin.MESH_SHAPE=(3,1,1)"], "MESH_SHAPE (3, 1, 1) needs 3 devices but 8 are available"),
    (["--gin.MESH_SHAPE=(2,2,2)", "--gin.BATCH_SIZE=6"], "global batch 6 is not divisible by the 4 data shards"),
    (["--gin.jsonl_lm_task.files=['/nonexistent/corpus.jsonl']"], "corpus file not found: /nonexistent/corpus.jsonl"),
])
def test_bad_input_is_a_one_line_error(capsys, tmp_path, args, message):
    code, err = _main(capsys, f"--workdir={tmp_path}", *args)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("safejax: error:"), err
    assert message in err[0]


def test_unreadable_corpus_file_is_named(capsys, tmp_path):
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"this is not gzip data")
    code, err = _main(capsys, f"--workdir={tmp_path / 'run'}", f"--gin.jsonl_lm_task.files=['{broken}']")
    assert code == 2 and len(err) == 1
    assert f"cannot read corpus file {broken}" in err[0]


def test_missing_workdir_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", f"--gin_file={TINY}"])
    assert exit_info.value.code == 2


# ---- subprocess runs ----

def _env(devices=8, **extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}
    env.update(extra)
    return env


def _train_cmd(workdir, *bindings):
    return [sys.executable, "-m", "safejax.cli", "train", f"--gin_file={TINY}", f"--workdir={workdir}",
            *[f"--gin.{b.replace(' ', '')}" for b in FAST], *[f"--gin.{b}" for b in bindings]]


def _records(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def _wait_for_step(proc, workdir, step, timeout=300, checkpoint=None):
    """Until metrics.jsonl has `step` and, if given, the `checkpoint` step's save is committed
    (on a loaded machine the async save can trail the steps: a kill before it lands would
    resume from an earlier step than the test expects)."""
    deadline = time.time() + timeout
    committed = os.path.join(str(workdir), "checkpoints", str(checkpoint), "commit_success.txt")
    while time.time() < deadline:
        if (any(r.get("step", 0) >= step and "loss" in r for r in _records(workdir))
                and (checkpoint is None or os.path.exists(committed))):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {timeout}s")


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    steps = ["TRAIN_STEPS=16", "CHECKPOINT_EVERY=4", "DataConfig.eval_batches=0"]
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, *steps), env=_env(), check=True, capture_output=True, timeout=600)
    expected = {r["step"]: r["loss"] for r in _records(straight)}
    assert sorted(expected) == list(range(1, 17))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, *steps), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(proc, killed, 10, checkpoint=8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before_kill = len(_records(killed))

    result = subprocess.run(_train_cmd(killed, *steps), env=_env(), check=True, capture_output=True,
                            text=True, timeout=600)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["start_step"] in (4, 8, 12) and summary["step"] == 16
    assert done_before_kill >= 10
    records = _records(killed)  # the killed run's rows past the checkpoint were dropped, then replayed
    assert [r["step"] for r in records] == list(range(1, 17))
    for r in records:  # bit-identical on the CPU
        assert r["loss"] == expected[r["step"]], r["step"]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path, "TRAIN_STEPS=10000", "CHECKPOINT_EVERY=5000"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "preempted" and 3 <= summary["step"] < 10000
    assert os.listdir(tmp_path / "checkpoints") == [str(summary["step"])]


@pytest.mark.slow
def test_two_processes_train_and_checkpoint_together(tmp_path):
    """Two real JAX processes (4 CPU devices each) with the coordinator on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = _train_cmd(tmp_path, "TRAIN_STEPS=6", "CHECKPOINT_EVERY=3", "MESH_SHAPE=(2,2,2)")
    procs = [subprocess.Popen(cmd, env=_env(devices=4, SAFEJAX_COORDINATOR=f"127.0.0.1:{port}",
                                            SAFEJAX_NUM_PROCESSES="2", SAFEJAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(s["step"] == 6 and s["status"] == "completed" for s in summaries)
    assert summaries[0]["loss"] == summaries[1]["loss"]  # one global computation
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == list(range(1, 7))  # process 0 writes


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "safejax.cli", "--help"], capture_output=True, text=True,
                         env=_env(), cwd=REPO, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "bench" in out.stdout



@pytest.mark.slow
def test_bench_train_prints_the_figures_as_json():
    out = subprocess.run([sys.executable, "-m", "safejax.cli", "bench", "train", "--configs", "tiny",
                          "--steps", "2", "--warmup", "1"], capture_output=True, text=True, env=_env(devices=1),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    required = {"config", "tokens_per_sec", "mfu", "peak_flops", "params", "devices", "layers", "d_model",
                "heads", "mlp", "vocab", "seq_len", "batch"}
    assert required <= record.keys()
    assert record["config"] == "tiny" and record["tokens_per_sec"] > 0 and 0 < record["mfu"] < 1


def test_commands_without_gin_refuse_gin_bindings(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["score", "--gin.TRAIN_STEPS=5", "--checkpoint", str(tmp_path), "--input", "x.jsonl",
                  "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "`safejax score` takes no --gin bindings (got --gin.TRAIN_STEPS)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "sample", "data", "score"))


@pytest.mark.parametrize("lines", [[], ['{"id": "a"}', "{torn"]])
def test_an_empty_corpus_is_a_one_line_error(capsys, tmp_path, lines):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(line + "\n" for line in lines))
    code, err = _main(capsys, f"--workdir={tmp_path / 'run'}", f"--gin.jsonl_lm_task.files=['{corpus}']",
                      "--gin.DataConfig.eval_batches=0")
    assert code == 2 and len(err) == 1 and "has no training examples" in err[0], err
