"""`safejax finetune`: continue a trained LM on new data from its parameters (instruction tuning,
benign finetuning on GSM8K; PAPER.md §4-5).

The new run starts from the source's parameters (an orbax partial restore of params only, into
this run's mesh and shardings) with a fresh optimizer, schedule and step count from the
finetuning config. The model is the source's: its recorded config is bound into this run's gin
config (so config.gin describes the model and `sample`/`serve` open the run like any other),
under whatever numerics the user's config sets (dtype, attention kernel, remat); a field that
changes parameter shapes and differs from the source is refused by name. The source is recorded
in config.gin (InitFrom) and in every checkpoint record (`init_from`). A killed finetune resumes
from its own checkpoints and never reads the source again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import gin

from safejax import config, errors
from safejax import vocab as vocab_lib
from safejax.models.decoder import DecoderConfig
from safejax.train.checkpoint import Checkpointer, CheckpointRecord, check_lm_record


@gin.configurable
@dataclasses.dataclass(frozen=True)
class InitFrom:
    """The run whose parameters a finetune starts from."""

    workdir: str = ""
    step: int | None = None  # None: the source's latest checkpoint

    def describe(self, step: int) -> dict:
        return {"workdir": os.path.abspath(self.workdir), "step": step}


def source_record(workdir: str, step: int | None) -> tuple[int, CheckpointRecord]:
    """The source checkpoint's step and record, or a one-line error (not a workdir, no such
    step, not an LM, a record too old to say what model it holds)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise errors.UserError(f"--from {workdir}: not a safejax training workdir (no checkpoints/)")
    with Checkpointer(workdir, read_only=True) as checkpointer:
        step, record = checkpointer.open(checkpointer.read_record, step)
    check_lm_record(record, f"--from {workdir}: step {step}")
    return step, record


def _bound_fields() -> dict:
    """DecoderConfig fields the parsed gin config sets to other than their defaults."""
    built = DecoderConfig()
    return {f.name: getattr(built, f.name) for f in dataclasses.fields(DecoderConfig)
            if getattr(built, f.name) != f.default}


def model_bindings(record: CheckpointRecord, source: str) -> list[str]:
    """gin bindings giving the source's model config to this run, for every field the user's
    config leaves alone; a shape field the user set to another value is a one-line error."""
    shapes = DecoderConfig(**record.model_config).shape_dict()
    mine = _bound_fields()
    clashes = [f"{k}={v!r} (the source has {record.model_config[k]!r})" for k, v in mine.items()
               if k in shapes and v != record.model_config.get(k)]
    if clashes:
        raise errors.UserError(f"--from {source}: the finetuning config changes the model's shapes: {', '.join(clashes)}")
    return [f"DecoderConfig.{k} = {v!r}" for k, v in record.model_config.items() if k not in mine]


def parse(source: str, step: int | None, gin_files: Sequence[str], bindings: Sequence[str]) -> int:
    """Binds the finetuning config over the source's model; returns the source step."""
    step, record = source_record(source, step)
    init = [f"InitFrom.workdir = {os.path.abspath(source)!r}", f"InitFrom.step = {step}"]
    config.parse(gin_files, [*bindings, *init])
    config.parse(gin_files, [*model_bindings(record, source), *bindings, *init])
    return step


def check_vocabulary(record: CheckpointRecord, vocabulary, source: str) -> None:
    """The data must be tokenized as the source was trained: same vocabulary file content."""
    mine = vocab_lib.describe(vocabulary)
    if mine["sha256"] != record.vocabulary["sha256"]:
        raise errors.UserError(f"--from {source}: its vocabulary ({record.vocabulary['path']}) is not the "
                               f"finetuning data's ({mine['path']}); set the tasks' vocab_path to the source's")
