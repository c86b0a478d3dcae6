"""Opening a training workdir for inference: its config, its vocabulary, its parameters.

The checkpoint's record (train/checkpoint.CheckpointRecord) says what the model was trained
with: its shapes, training length and vocabulary (checked by content hash). The workdir's
config.gin gives the model config (numerics such as dtype may be overridden; shapes may not) and
the sampling and serving settings. Only the params are read (orbax partial restore),
straight into the shardings that the logical-axis rules give them on this machine's mesh.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import seqio
from flax import nnx

from safejax import config, errors, parallel
from safejax import vocab as vocab_lib
from safejax.models.decoder import Decoder, DecoderConfig
from safejax.train.checkpoint import Checkpointer, check_compatible, check_lm_record


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
    """Loads the params of `step` (default: the newest intact one, train/checkpoint.Checkpointer.open)
    as its checkpoint record describes them: its shapes, the training length and the vocabulary
    (`vocab_path` may point at a copy of it; a file with other content is refused)."""
    mesh, rules = parallel.build_mesh(), parallel.logical_rules()
    cfg = DecoderConfig()  # config.gin's, with the user's numerics (dtype, query_block); shapes checked
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes, shardings = parallel.module_shardings(state, rules, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    with Checkpointer(workdir, read_only=True) as checkpointer:
        def read(candidate: int):
            record = checkpointer.read_record(candidate)
            check_lm_record(record, f"{workdir} step {candidate}")
            check_compatible(record.fingerprint, {"objective": "lm", **cfg.shape_dict()}, checkpointer.directory)
            return record, checkpointer.restore_params(candidate, target)

        step, (record, params) = checkpointer.open(read, step)
    state.replace_by_pure_dict(params)
    vocabulary = vocab_lib.load_recorded(record.vocabulary, vocab_path)
    reserved = {k: int(v) for k, v in record.vocabulary["reserved_ids"].items()}
    return Loaded(nnx.merge(graphdef, state), cfg, vocabulary, reserved, int(record.seq_len), step, mesh, rules)
