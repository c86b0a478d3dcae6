"""Damaged checkpoints (issue 20 item 3): a newest step with files missing or arrays cut short is
skipped with a warning naming it, and every reader (resume, sample/serve/export's loader, the
record reader) falls back to the newest intact step."""

import glob
import json
import logging
import os
import shutil

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
    else:  # the arrays' data files cut to half their size
        for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
            os.truncate(path, os.path.getsize(path) // 2)
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
