"""Training on the mesh: sharding invariance, accumulation, learning, non-finite steps, resume."""

import json
import os

import jax
import numpy as np
import pytest

from safejax import errors
from safejax.data import pipeline
from safejax.train import pretrain
from safejax.train.trainer import NonFiniteError


def _losses(trainer, batches):
    state = trainer.init_state()
    losses = []
    for batch in batches:
        state, metrics = trainer.train_step(state, trainer.global_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses, state


def _first_batches(data, n):
    stream = pipeline.train_batches(data, 0)
    return [next(stream) for _ in range(n)]


def test_sharded_and_single_device_training_give_the_same_losses(tiny_config):
    tiny_config("MESH_SHAPE = (2, 2, 2)")
    sharded, data, _ = pretrain.build_trainer()
    batches = _first_batches(data, 4)
    tiny_config("MESH_SHAPE = (1, 1, 1)")
    single, _, _ = pretrain.build_trainer(devices=jax.devices()[:1])
    sharded_losses, sharded_state = _losses(sharded, batches)
    single_losses, single_state = _losses(single, batches)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5)
    assert sharded_losses[-1] < sharded_losses[0]
    # The parameters really are sharded: an MLP kernel is split over fsdp and tensor.
    gate = sharded_state["params"]["blocks"][0]["mlp"]["gate"]
    assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(np.asarray(gate), np.asarray(single_state["params"]["blocks"][0]["mlp"]["gate"]),
                               rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tiny_config):
    tiny_config("MESH_SHAPE = (2, 2, 2)")
    whole, data, _ = pretrain.build_trainer()
    batches = _first_batches(data, 3)
    tiny_config("MESH_SHAPE = (2, 2, 2)", "TrainConfig.microbatches = 2")
    accumulated, _, _ = pretrain.build_trainer()
    np.testing.assert_allclose(_losses(whole, batches)[0], _losses(accumulated, batches)[0], rtol=2e-5)


def test_loss_falls_on_the_bundled_corpus(tiny_config, tmp_path):
    tiny_config("TRAIN_STEPS = 40", "CHECKPOINT_EVERY = 20")
    summary = pretrain.train(str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5
    assert summary["eval_loss"] < losses[0]
    for r in records:
        if "loss" in r:
            assert {"step", "loss", "tokens_per_sec", "mfu", "grad_norm", "lr"} <= r.keys()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
    assert os.path.exists(tmp_path / "config.gin")
    assert os.listdir(tmp_path / "tensorboard")


def test_nonfinite_steps_are_skipped_and_counted(tiny_config, tmp_path):
    # Weights this large overflow float32 activations: every loss is inf/NaN.
    tiny_config("TRAIN_STEPS = 3", "CHECKPOINT_EVERY = 100", "DecoderConfig.init_std = 1e30",
                "DataConfig.eval_batches = 0")
    trainer, data, _ = pretrain.build_trainer()
    initial = trainer.init_state()
    initial_params = jax.tree.map(np.asarray, initial["params"])
    summary = pretrain.train(str(tmp_path))
    assert summary["nonfinite_steps"] == 3 and summary["step"] == 3
    # Nothing was applied: the saved params are the initial ones, all finite.
    from safejax.train.checkpoint import Checkpointer

    state, record = Checkpointer(str(tmp_path)).restore(3, trainer.abstract_state)
    for a, b in zip(jax.tree.leaves(initial_params), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert record.data_position == 3 and record.seq_len == trainer.objective.seq_len


def test_nonfinite_step_stops_when_configured(tiny_config, tmp_path):
    tiny_config("TRAIN_STEPS = 3", "DecoderConfig.init_std = 1e30", "TrainConfig.on_nonfinite = 'stop'",
                "DataConfig.eval_batches = 0")
    with pytest.raises(NonFiniteError, match="step 1: loss or gradient is not finite"):
        pretrain.train(str(tmp_path))


def test_incompatible_checkpoint_is_refused(tiny_config, tmp_path):
    tiny_config("TRAIN_STEPS = 2", "CHECKPOINT_EVERY = 2", "DataConfig.eval_batches = 0")
    pretrain.train(str(tmp_path))
    tiny_config("TRAIN_STEPS = 4", "DecoderConfig.d_model = 64", "DataConfig.eval_batches = 0")
    with pytest.raises(errors.UserError, match=r"incompatible model: d_model=128 \(config: 64\)"):
        pretrain.train(str(tmp_path))


def test_resume_continues_from_the_checkpoint_step(tiny_config, tmp_path):
    tiny_config("TRAIN_STEPS = 3", "CHECKPOINT_EVERY = 3", "DataConfig.eval_batches = 0")
    assert pretrain.train(str(tmp_path))["step"] == 3
    tiny_config("TRAIN_STEPS = 5", "CHECKPOINT_EVERY = 5", "DataConfig.eval_batches = 0")
    summary = pretrain.train(str(tmp_path))
    assert summary["start_step"] == 3 and summary["step"] == 5
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]


def test_global_batch_must_divide_over_data_shards(tiny_config):
    tiny_config("MESH_SHAPE = (2, 2, 2)", "BATCH_SIZE = 6")
    with pytest.raises(errors.UserError, match="global batch 6 is not divisible by the 4 data shards"):
        pretrain.build_trainer()


def test_resume_on_a_different_mesh_reshards_the_checkpoint(tiny_config, tmp_path):
    tiny_config("TRAIN_STEPS = 2", "CHECKPOINT_EVERY = 2", "DataConfig.eval_batches = 0", "MESH_SHAPE = (2, 2, 2)")
    pretrain.train(str(tmp_path))
    tiny_config("TRAIN_STEPS = 3", "CHECKPOINT_EVERY = 3", "DataConfig.eval_batches = 0", "MESH_SHAPE = (1, 4, 2)")
    summary = pretrain.train(str(tmp_path))
    assert summary["start_step"] == 2 and summary["step"] == 3 and np.isfinite(summary["loss"])
