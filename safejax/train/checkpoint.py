"""Checkpoints with orbax: train state (sharded arrays) plus a small JSON record of metadata.

The JSON record carries the step, the data-iterator position and the model's shape fingerprint,
so a resume can refuse a checkpoint of another model before touching any array.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from safejax import errors


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> None:
        """Starts writing (asynchronously) a checkpoint; refuses to save non-finite values."""
        if not all_finite(state):
            raise FloatingPointError(f"refusing to save a non-finite train state at step {step}")
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def read_meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored.meta

    def restore(self, step: int, abstract_state):
        """Restores the state into the shardings given by `abstract_state` (ShapeDtypeStructs)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def check_compatible(saved: dict, expected: dict, directory: str) -> None:
    """One-line error when a checkpoint holds another model than the config describes."""
    diffs = [f"{k}={saved.get(k)!r} (config: {v!r})" for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise errors.UserError(f"checkpoint in {directory} is of an incompatible model: " + ", ".join(diffs))


@jax.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def all_finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return True
    return bool(np.all(np.asarray(_finite_flags(leaves).addressable_data(0))))
