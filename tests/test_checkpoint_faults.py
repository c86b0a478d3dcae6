"""Checkpoint faults (issue 20 items 3 and 5): a newest step with files missing or arrays cut
short is skipped with a warning naming it, and every reader (resume, sample/serve/export's
loader, the record reader) falls back to the newest intact step; a save that fails mid-run stops
the run in one line, leaves no partial step, and a rerun resumes."""

import glob
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import FAST, TINY
from safejax import cli, config, errors
from safejax.inference import checkpoint as inference_checkpoint
from safejax.train import checkpoint, pretrain

STEPS = ["TRAIN_STEPS = 4", "CHECKPOINT_EVERY = 2", "DataConfig.eval_batches = 0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config.parse([TINY], FAST + STEPS)
    pretrain.train(workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    return workdir


def _damaged_copy(run, tmp_path, how):
    workdir = str(tmp_path / "copy")
    shutil.copytree(run, workdir)
    step_dir = os.path.join(workdir, "checkpoints", "4")
    if how == "files_removed":
        for entry in os.listdir(step_dir):
            path = os.path.join(step_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    else:  # the arrays' data files cut short (to 64 bytes: every array loses its data, whatever the order
        # in which the writes packed them; half a file could leave the params whole)
        for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
            os.truncate(path, min(64, os.path.getsize(path) // 2))
    return workdir


@pytest.mark.parametrize("how", ["files_removed", "truncated"])
def test_readers_fall_back_to_the_newest_intact_step(run, tmp_path, caplog, how):
    workdir = _damaged_copy(run, tmp_path, how)
    caplog.set_level(logging.WARNING)
    inference_checkpoint.parse_config(workdir)
    loaded = inference_checkpoint.load(workdir)  # what sample, serve and export open
    assert loaded.step == 2
    assert "checkpoint step 4" in caplog.text and "damaged" in caplog.text
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))  # a reader moves nothing
    if how == "files_removed":
        assert checkpoint.read_record(workdir).step == 2
    with pytest.raises(errors.UserError, match="checkpoint step 4 in .* is damaged"):
        inference_checkpoint.load(workdir, step=4)


def test_sample_on_a_damaged_newest_step_prints_its_output(run, tmp_path, capsys):
    workdir = _damaged_copy(run, tmp_path, "truncated")
    assert cli.main(["sample", "--checkpoint", workdir, "--prompt", "The", "--max_new_tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] >= 1


def test_train_resumes_from_the_newest_intact_step_and_sets_the_damaged_one_aside(run, tmp_path):
    workdir = _damaged_copy(run, tmp_path, "truncated")
    config.parse([TINY], FAST + ["TRAIN_STEPS = 6", "CHECKPOINT_EVERY = 2", "DataConfig.eval_batches = 0"])
    summary = pretrain.train(workdir)
    assert (summary["start_step"], summary["step"]) == (2, 6)
    assert os.listdir(os.path.join(workdir, checkpoint.DAMAGED_DIR)) == ["4"]
    assert sorted(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == [2, 4, 6]  # 4 written again


def test_no_intact_step_is_a_one_line_error(run, tmp_path):
    workdir = _damaged_copy(run, tmp_path, "files_removed")
    shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "state"))
    inference_checkpoint.parse_config(workdir)
    with pytest.raises(errors.UserError, match=r"no intact checkpoint in .*: steps \[2, 4\] are damaged"):
        inference_checkpoint.load(workdir)


# ---- 5. a save that fails mid-run (the disk is full) ---------------------------------------

def _train_cmd(workdir, *bindings):
    return [sys.executable, "-m", "safejax.cli", "train", f"--gin_file={TINY}", f"--workdir={workdir}",
            *[f"--gin.{b.replace(' ', '')}" for b in FAST], *[f"--gin.{b}" for b in bindings]]


def _file_size_limit(limit: int):
    """The kernel then fails every write past `limit` bytes of a file with EFBIG ("File too
    large"): a real OS error in the real writers (TensorStore's C++ writes included), as a full
    disk gives ENOSPC; no test can fill a disk, and no small filesystem can be mounted here."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error to the writer, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_failed_save_stops_the_run_in_one_line_and_a_rerun_resumes(run, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(run, workdir)  # steps 2 and 4 (a checkpoint is ~14 MB, metrics lines far less)
    env = {**os.environ, "SAFEJAX_HUGE_PAGES": "0", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    longer = ["TRAIN_STEPS=12", "CHECKPOINT_EVERY=4", "DataConfig.eval_batches=0"]
    failed = subprocess.run(_train_cmd(workdir, *longer), env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=_file_size_limit(1_000_000))
    err = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(err) == 1, failed.stderr[-3000:]
    assert err[0].startswith("safejax: error: could not write a checkpoint: ") and "File too large (errno 27)" in err[0]
    assert f"{workdir}/checkpoints/8" in err[0] and "newest intact checkpoint is step 4" in err[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # no *.orbax-checkpoint-tmp

    resumed = subprocess.run(_train_cmd(workdir, *longer), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert (summary["start_step"], summary["step"]) == (4, 12)
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == list(range(1, 13))  # the failed run's rows past step 4 were replayed, not kept twice
