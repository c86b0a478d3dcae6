"""Checkpoints with orbax: train state (sharded arrays) plus a small JSON record of what it is.

The record (CheckpointRecord) is the checkpoint's contract with every reader: the step and the
data-iterator position (resume), the objective and the shape fingerprint (a resume or a reader
refuses another model before touching any array), the model's whole config, the training
sequence length, the vocabulary (file, content hash, reserved ids) and, for a finetune, the run
it started from. Readers (resume, inference, export, eval) open a workdir through `Checkpointer`
and `read_record`, nothing else.

A damaged step (files missing, arrays cut short: a crash or a full disk mid-write, a bad copy)
is skipped by `Checkpointer.open` with a warning naming it, and the newest step that reads whole
is used; a writer moves the damaged steps aside (checkpoints-damaged/) so the run can write
those steps again. A save that fails (a full disk, no permission) stops the run as soon as it is
known (`check`, after every step): CheckpointWriteError names the path and the OS error, the
partial step is removed, and a rerun resumes from the newest intact one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from safejax import errors

T = TypeVar("T")
DAMAGED_DIR = "checkpoints-damaged"  # beside checkpoints/: the steps a writer set aside
PARTIAL_GLOB = "*.orbax-checkpoint-tmp*"  # orbax writes a step here, then renames it into place
# TensorStore's words for a failed write: 'Failed writing: "PATH": ... : REASON [os_error_code='N']'
_TENSORSTORE_WRITE = re.compile(r'Failed writing: "([^"]+)".*?: ([^:\[]+?) \[os_error_code=\'(\d+)\'\]')


class CheckpointWriteError(errors.UserError):
    """A checkpoint could not be written (disk full, no permission): the run stops, and a rerun
    resumes from the newest intact checkpoint once the cause is fixed."""


class _FailedWriteEchoes(logging.Filter):
    """asyncio's '... exception was never retrieved' for orbax's other writes of a failed save."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("exception was never retrieved" in message and "orbax" in message)


@functools.cache
def _quiet_failed_write_echoes() -> None:
    """When one write of a save fails, TensorStore's other writes of that step still finish: each
    reports the same failure again (asyncio logs its task, and its callback into orbax's event
    loop, closed by then, raises 'Event loop is closed' as an unraisable exception). The failure
    is reported once, by CheckpointWriteError; these echoes are not printed."""
    logging.getLogger("asyncio").addFilter(_FailedWriteEchoes())
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook


def write_failure(e: BaseException) -> str:
    """'PATH: OS error (errno N)' from a failed save: an OSError in the exception's chain (Python
    writers) or TensorStore's message (the arrays), else its first line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.filename or '?'}: {seen.strerror} (errno {seen.errno})"
        seen = seen.__cause__ or seen.__context__
    match = _TENSORSTORE_WRITE.search(str(e))
    if match:
        return f"{match.group(1)}: {match.group(2).strip()} (errno {match.group(3)})"
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """The JSON saved beside each checkpoint's arrays. `model_config`, `seq_len` and
    `vocabulary` are None in records written before they were recorded (such a checkpoint
    resumes, but inference refuses it)."""

    step: int
    data_position: int
    objective: str             # "lm" | "classifier"
    fingerprint: dict          # the fields that decide parameter shapes, with the objective
    model_config: dict | None  # every field of the model's config (nested configs as dicts)
    seq_len: int | None        # the training sequence length
    vocabulary: dict | None    # vocab.describe(): path, sha256, pieces, reserved_ids (LM only)
    init_from: dict | None = None  # a finetune's source run {"workdir", "step"}; None: from scratch

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = out.pop("fingerprint")  # the key resumes have always read
        return out

    @classmethod
    def from_json(cls, meta: dict) -> CheckpointRecord:
        fingerprint = meta.get("model", {})
        return cls(step=int(meta["step"]), data_position=int(meta["data_position"]),
                   objective=meta.get("objective", fingerprint.get("objective", "")), fingerprint=fingerprint,
                   model_config=meta.get("model_config"), seq_len=meta.get("seq_len"),
                   vocabulary=meta.get("vocabulary"), init_from=meta.get("init_from"))


class Checkpointer:
    """One workdir's checkpoints. `read_only` opens an existing one (no directory is created)."""

    def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True, read_only: bool = False):
        self.read_only, self._failed = read_only, False
        if not read_only:
            _quiet_failed_write_echoes()
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        if read_only and not os.path.isdir(self.directory):
            raise errors.UserError(f"{workdir} has no checkpoints/ directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               enable_async_checkpointing=asynchronous and not read_only,
                                               cleanup_tmp_directories=not read_only)  # a killed run's partial step
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def pick(self, step: int | None = None) -> int:
        """`step` (default: the latest), or a one-line error naming the steps there are."""
        steps = self._manager.all_steps()
        if not steps:
            raise errors.UserError(f"no checkpoint in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise errors.UserError(f"no checkpoint of step {step} in {self.directory}; it has {sorted(steps)}")
        return step

    def open(self, read: Callable[[int], T], step: int | None = None) -> tuple[int, T]:
        """(step, read(step)) for `step`, or for the newest step that `read` reads whole. A step
        whose read fails (damage: orbax and TensorStore raise many kinds) is skipped with a warning
        naming it; a writer moves it aside. A UserError from `read` (another model) is no damage
        and is raised. The named `step` damaged, or no step intact: a one-line error."""
        steps = [self.pick(step)] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise errors.UserError(f"no checkpoint in {self.directory}")
        damaged = []
        for candidate in steps:
            try:
                result = read(candidate)
            except errors.UserError:
                raise
            except Exception as e:  # noqa: BLE001 (see the docstring)
                reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                if step is not None:
                    raise errors.UserError(f"checkpoint step {step} in {self.directory} is damaged ({reason})") from e
                logging.warning("checkpoint step %d in %s is damaged, skipping it (%s)", candidate, self.directory,
                                reason)
                damaged.append(candidate)
                continue
            if damaged:
                logging.warning("using checkpoint step %d of %s, the newest intact one", candidate, self.directory)
                self._set_aside(damaged)
            return candidate, result
        raise errors.UserError(f"no intact checkpoint in {self.directory}: steps {sorted(damaged)} are damaged "
                               "(see the warnings)")

    def _set_aside(self, steps: list[int]) -> None:
        """A writer moves damaged steps out of checkpoints/ (kept for a look, never read again)."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, str(step))
                suffix = 0
                while os.path.exists(target):
                    suffix += 1
                    target = os.path.join(aside, f"{step}.{suffix}")
                os.replace(os.path.join(self.directory, str(step)), target)
                logging.warning("moved damaged checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("safejax: damaged checkpoints set aside")
        self._manager.reload()

    def save(self, step: int, state, record: CheckpointRecord, *, force: bool = False) -> None:
        """Starts writing (asynchronously) a checkpoint; refuses to save non-finite values."""
        if not all_finite(state):
            raise FloatingPointError(f"refusing to save a non-finite train state at step {step}")
        with self._stop_on_failure():
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record.to_json())), force=force)

    def check(self) -> None:
        """Raises CheckpointWriteError once an asynchronous save has failed (cheap: once a step)."""
        with self._stop_on_failure():
            self._manager.check_for_errors()

    @contextlib.contextmanager
    def _stop_on_failure(self):
        try:
            yield
        except errors.UserError:
            raise
        except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise plain Exceptions)
            self._failed = True
            for partial in glob.glob(os.path.join(self.directory, PARTIAL_GLOB)):
                shutil.rmtree(partial, ignore_errors=True)
            self._manager.reload()
            intact = self._manager.latest_step()
            raise CheckpointWriteError(
                f"could not write a checkpoint: {write_failure(e)}; training stopped, the newest intact checkpoint "
                f"is {'step ' + str(intact) if intact is not None else 'none'}; fix that and rerun to resume") from e

    def read_record(self, step: int) -> CheckpointRecord:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return CheckpointRecord.from_json(restored.meta)

    def restore(self, step: int, abstract_state):
        """Restores the state into the shardings given by `abstract_state` (ShapeDtypeStructs)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, CheckpointRecord.from_json(restored.meta)

    def restore_params(self, step: int, target):
        """Only the params (orbax partial restore), into the shardings of `target`'s
        ShapeDtypeStructs: readers that need no optimizer state never read it."""
        target = {"params": target}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
        return restored.state["params"]

    def wait(self) -> None:
        if not self._failed:
            with self._stop_on_failure():
                self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 (the failed save, raised once already)
            if not self._failed:
                raise


def read_record(workdir: str, step: int | None = None) -> CheckpointRecord:
    """The record of `step` (default: the newest intact one) of a training workdir."""
    with Checkpointer(workdir, read_only=True) as checkpointer:
        return checkpointer.open(checkpointer.read_record, step)[1]


def check_lm_record(record: CheckpointRecord, where: str) -> None:
    """A reader of an LM checkpoint needs one that is an LM and says what model and vocabulary
    it holds; `where` names it in the one-line error."""
    if record.objective != "lm":
        raise errors.UserError(f"{where} is a {record.objective or 'unknown'} checkpoint, not an LM")
    if record.model_config is None or record.vocabulary is None:
        raise errors.UserError(f"{where} was written before checkpoints recorded their model and vocabulary; "
                               "resume it with `safejax train` to write a new one")


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
