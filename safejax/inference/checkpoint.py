"""Opening a training workdir for inference: its gin config, its vocabulary, its parameters.

A workdir written by `safejax train` holds config.gin (the effective config, so the model is
rebuilt exactly) and orbax checkpoints whose `state` item holds params next to the optimizer
state. Only the params are read (orbax partial restore), straight into the shardings that the
logical-axis rules give them on this machine's mesh.
"""

from __future__ import annotations

import dataclasses
import os

import gin
import jax
import orbax.checkpoint as ocp
import seqio
from flax import nnx

from safejax import config, errors, parallel
from safejax import vocab as vocab_lib
from safejax.models.decoder import Decoder, DecoderConfig
from safejax.train.checkpoint import check_compatible


@dataclasses.dataclass
class Loaded:
    model: Decoder
    config: DecoderConfig
    vocabulary: seqio.SentencePieceVocabulary
    reserved: dict[str, int]  # reserved token -> id; empty for a vocabulary made without them
    context: int  # the training sequence length: the longest prompt + completion accepted
    step: int
    mesh: jax.sharding.Mesh
    rules: tuple


def parse_config(workdir: str, gin_files=(), bindings=()) -> None:
    """Binds the workdir's training config, then the sampling defaults, then the user's files
    and bindings (later ones win)."""
    from safejax.inference import params, server  # noqa: F401 (registers their configurables)

    path = os.path.join(workdir, "config.gin")
    if not os.path.isfile(path):
        raise errors.UserError(f"{workdir} is not a safejax training workdir: it has no config.gin")
    config.parse([path, os.path.join(config.CONFIG_DIR, "sample", "default.gin"), *gin_files], bindings)


def load(workdir: str, step: int | None = None, vocab_path: str | None = None) -> Loaded:
    """Loads the params of `step` (default: the latest) under the bound gin config."""
    cfg = DecoderConfig()
    mesh, rules = parallel.build_mesh(), parallel.logical_rules()
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise errors.UserError(f"{workdir} has no checkpoints/ directory")
    manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
    try:
        steps = manager.all_steps()
        if not steps:
            raise errors.UserError(f"no checkpoint in {directory}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise errors.UserError(f"no checkpoint of step {step} in {directory}; it has {sorted(steps)}")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        check_compatible(meta.get("model", {}), {"objective": "lm", **cfg.shape_dict()}, directory)
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        axes = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                                             is_leaf=lambda x: isinstance(x, nnx.Variable)))
        shapes = state.to_pure_dict()
        shardings = parallel.tree_shardings(axes, shapes, rules, mesh)
        target = {"params": jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                         shapes, shardings)}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
    finally:
        manager.close()
    state.replace_by_pure_dict(restored.state["params"])
    vocabulary = vocab_lib.load_vocabulary(vocab_path or _bound_vocab_path())
    if vocabulary.vocab_size > cfg.vocab_size:
        raise errors.UserError(f"vocabulary {vocabulary.sentencepiece_model_file} has {vocabulary.vocab_size} "
                               f"pieces but the model only {cfg.vocab_size} ids")
    try:
        reserved = vocab_lib.reserved_ids(vocabulary)
    except errors.UserError:
        reserved = {}
    return Loaded(nnx.merge(graphdef, state), cfg, vocabulary, reserved, _bound_seq_len(), step, mesh, rules)


def _bound_vocab_path() -> str:
    from safejax.data import tasks

    try:
        return gin.query_parameter("jsonl_lm_task.vocab_path")
    except ValueError:
        return tasks.BUNDLED_VOCAB


def _bound_seq_len() -> int:
    value = gin.query_parameter("DataConfig.seq_len")
    if isinstance(value, gin.config.ConfigurableReference):  # a macro such as %SEQ_LEN
        value = value.scoped_configurable_fn()
    return int(value)
