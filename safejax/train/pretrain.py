"""`safejax train`: pretrain (or continue) the decoder LM from gin configs.

Everything comes from gin: model (DecoderConfig), data (DataConfig, the Task registered by
jsonl_lm_task), loop (TrainConfig), optimizer (adamw, learning_rate_schedule), mesh
(build_mesh, logical_rules). The effective config is written to WORKDIR/config.gin.
"""

from __future__ import annotations

import json
import logging
import os

import jax

from safejax import config, errors, parallel
from safejax import vocab as vocab_lib
from safejax.data import pipeline
from safejax.data.quarantine import QUARANTINE
from safejax.models.decoder import DecoderConfig
from safejax.train import finetune, optim
from safejax.train.checkpoint import Checkpointer
from safejax.train.lm import LanguageModelObjective
from safejax.train.trainer import TrainConfig, Trainer, fit


def build_trainer(devices=None) -> tuple[Trainer, pipeline.DataConfig, object]:
    """Builds the trainer, data config and lr schedule from the bound gin config.

    `devices` restricts the mesh to some devices (tests compare a sharded run with one device).
    """
    cfg = TrainConfig()
    data = pipeline.DataConfig()
    model = DecoderConfig()
    mesh = parallel.build_mesh(devices=devices)
    rules = parallel.logical_rules()
    schedule = optim.learning_rate_schedule(cfg.steps)
    vocabulary = pipeline.vocabulary(data)
    if vocabulary.vocab_size > model.vocab_size:
        raise errors.UserError(f"the vocabulary {vocabulary.sentencepiece_model_file} has {vocabulary.vocab_size} "
                               f"pieces but DecoderConfig.vocab_size is {model.vocab_size}: ids above it would "
                               "have no embedding")
    objective = LanguageModelObjective(model, data.seq_len, vocab_lib.describe(vocabulary))
    trainer = Trainer(objective, optim.adamw(schedule), cfg, mesh, rules, data.global_batch_size)
    return trainer, data, schedule


def train(workdir: str) -> dict:
    """Trains to TrainConfig.steps in WORKDIR (resuming if it holds a checkpoint); returns a
    summary. With InitFrom bound (`safejax finetune`), a fresh run starts from that run's params."""
    trainer, data, schedule = build_trainer()
    init = finetune.InitFrom()
    initial_params, init_from = None, None
    if init.workdir:
        step, record = finetune.source_record(init.workdir, init.step)
        finetune.check_vocabulary(record, pipeline.vocabulary(data), init.workdir)
        init_from = init.describe(step)

        def initial_params():
            with Checkpointer(init.workdir, read_only=True) as source:
                return source.open(lambda s: source.restore_params(s, trainer.abstract_state["params"]), step)[1]
    if jax.process_index() == 0:
        config.write_effective_config(workdir)
    QUARANTINE.reset()  # the summary counts this run's records only (and those already in its file)
    QUARANTINE.write_to(os.path.join(os.path.abspath(workdir), f"quarantine-{jax.process_index()}.jsonl"))
    logging.info("model %s on mesh %s", json.dumps(trainer.objective.describe()), dict(trainer.mesh.shape))
    summary = fit(trainer, workdir,
                  lambda position: pipeline.in_background(pipeline.train_batches(data, position)),
                  lambda: pipeline.eval_batches(data), schedule, initial_params, init_from)
    summary.update(workdir=os.path.abspath(workdir),
                   checkpoints=os.path.join(os.path.abspath(workdir), "checkpoints"),
                   metrics=os.path.join(os.path.abspath(workdir), "metrics.jsonl"),
                   quarantined=QUARANTINE.counts())
    return summary
