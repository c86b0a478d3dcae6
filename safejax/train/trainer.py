"""The training loop: sharded state, a jit-compiled train step, evaluation, checkpoints, metrics.

It is generic over an objective (what model, which loss): the decoder LM today, the safety
classifier tomorrow. The train state is a plain dict of arrays, sharded by the logical axes the
model declares:

    {"params": ..., "opt_state": ..., "step": (), "nonfinite_steps": ()}

`step` counts batches consumed (it is also the data position); a step whose loss or gradient is
not finite consumes its batch but leaves params and optimizer untouched.

An objective may declare a partial warm-up (the classifier's head-only phase): `partial_steps`
(int) and `partial_trainable(path) -> bool`. For steps 1..partial_steps only those parameters
are differentiated and updated; the others get no gradient computed (so no backward pass through
a frozen encoder) and keep their values exactly.

`batch_features()` gives each feature's longest per-example shape. Batches may be shorter along
the length axis (the classifier's length-bucketed batches): the step compiled ahead of time
serves the declared shapes, and jit compiles (once each) the others.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx, traverse_util

from safejax import config, errors, hardware, parallel
from safejax.train.checkpoint import Checkpointer, CheckpointRecord, check_compatible
from safejax.train.metrics import MetricsWriter, model_flops_utilization


class Objective(Protocol):
    """What the Trainer trains (train/lm.py, train/classify.py): the model, the loss over the
    batch features it declares, its cost, and what its checkpoints record. Optional: a partial
    warm-up, `partial_steps: int` and `partial_trainable(path) -> bool`."""

    name: str
    model_config: Any  # the model's config (DecoderConfig, ClassifierConfig)

    def create_model(self, rngs: nnx.Rngs) -> nnx.Module: ...

    def loss(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
        """(summed loss, summed weight): the Trainer divides, so microbatches add up exactly."""

    def batch_features(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Per-example (longest shape, dtype) of every feature the loss reads."""

    def flops_per_example(self) -> float: ...

    def tokens_per_example(self) -> int: ...

    def fingerprint(self) -> dict:
        """The fields that decide parameter shapes (a resume refuses a checkpoint of another)."""

    def checkpoint_fields(self) -> dict:
        """model_config, seq_len and vocabulary of train/checkpoint.CheckpointRecord."""

    def describe(self) -> dict: ...


class NonFiniteError(errors.UserError):
    """Raised when a step's loss or gradient is not finite and the config says to stop."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = gin.REQUIRED
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    eval_every: int = 0  # 0: evaluate only at the end
    seed: int = 42
    microbatches: int = 1  # gradient accumulation: the global batch is split into this many
    on_nonfinite: str = "skip"  # skip: count the step and go on; stop: raise NonFiniteError
    peak_flops_per_device: float = 0.0  # 0: the published peak, or measured on the CPU
    progress_bar: bool = True

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise errors.UserError(f"TRAIN_STEPS must be a positive integer, got {self.steps!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every <= 0:
            raise errors.UserError(f"CHECKPOINT_EVERY must be a positive integer, got {self.checkpoint_every!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 32:
            raise errors.UserError(f"TrainConfig.seed must be an integer in [0, 2**32), got {self.seed!r} "
                                   "(the initialisation key holds 32 bits: larger seeds would collide)")
        if self.on_nonfinite not in ("skip", "stop"):
            raise errors.UserError(f"TrainConfig.on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}")
        config.check_types(self)
        if self.microbatches < 1:
            raise errors.UserError(f"TrainConfig.microbatches must be >= 1, got {self.microbatches}")


class Trainer:
    """Owns the sharded train state and the compiled steps for one objective on one mesh."""

    def __init__(self, objective: Objective, optimizer: optax.GradientTransformation, cfg: TrainConfig,
                 mesh, rules, global_batch_size: int):
        self.objective, self.tx, self.cfg = objective, optimizer, cfg
        self.mesh, self.rules = mesh, rules
        self.global_batch_size = global_batch_size
        self._check_batch()

        abstract_model = nnx.eval_shape(lambda: objective.create_model(nnx.Rngs(0)))
        self.graphdef, abstract_state = nnx.split(abstract_model)
        param_shapes, param_shardings = parallel.module_shardings(abstract_state, rules, mesh)
        replicated = parallel.replicated(mesh)
        opt_shapes = jax.eval_shape(self.tx.init, param_shapes)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, opt_shapes, param_shardings,
            transform_non_params=lambda _: replicated)
        self.state_shardings = {"params": param_shardings, "opt_state": opt_shardings,
                                "step": replicated, "nonfinite_steps": replicated}
        self.abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            {"params": param_shapes, "opt_state": opt_shapes,
             "step": jax.ShapeDtypeStruct((), jnp.int32),
             "nonfinite_steps": jax.ShapeDtypeStruct((), jnp.int32)},
            self.state_shardings)
        # Per feature: (batch, length...) by its rank, so per-example scalars (labels) work too.
        self._batch_sharding = {
            name: parallel.sharding_for(("batch",) + ("length",) * len(shape), rules, mesh)
            for name, (shape, _) in objective.batch_features().items()}

        self.partial_steps = int(getattr(objective, "partial_steps", 0))
        self._trainable = ({path: bool(objective.partial_trainable(path))
                            for path in traverse_util.flatten_dict(param_shapes)}
                           if self.partial_steps else None)

        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._compiled_steps, self._compiled_shapes = {}, {}
        self._train_steps = {
            partial: jax.jit(functools.partial(self._step, partial=partial),
                             in_shardings=(self.state_shardings, self._batch_sharding),
                             out_shardings=(self.state_shardings, replicated), donate_argnums=0)
            for partial in ((False, True) if self.partial_steps else (False,))}
        self._eval_step = jax.jit(self._eval, in_shardings=(param_shardings, self._batch_sharding),
                                  out_shardings=replicated)

    def _check_batch(self):
        parallel.per_shard_batch(self.global_batch_size, self.cfg.microbatches, self.mesh, self.rules)

    # ---- pure functions, compiled in __init__ ----

    def _init_state(self):
        model = self.objective.create_model(nnx.Rngs(self.cfg.seed))
        params = nnx.state(model).to_pure_dict()
        return {"params": params, "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32), "nonfinite_steps": jnp.zeros((), jnp.int32)}

    def _loss_sums(self, params, batch):
        with parallel.using(self.mesh, self.rules):
            return self.objective.loss(nnx.merge(self.graphdef, params), batch)

    def _partial_grad_fn(self, params, batch):
        """Like value_and_grad(_loss_sums) but differentiating only the trainable parameters;
        the frozen ones get zero gradients without a backward pass through them."""
        flat = traverse_util.flatten_dict(params)
        frozen = {k: v for k, v in flat.items() if not self._trainable[k]}
        trainable = {k: v for k, v in flat.items() if self._trainable[k]}

        def loss(trainable, batch):
            return self._loss_sums(traverse_util.unflatten_dict({**frozen, **trainable}), batch)

        value, grads = jax.value_and_grad(loss, has_aux=True)(trainable, batch)
        zeros = {k: jnp.zeros_like(v) for k, v in frozen.items()}
        return value, traverse_util.unflatten_dict({**zeros, **grads})

    def _gradients(self, params, batch, partial=False):
        """Mean loss and gradient over the batch, accumulated over microbatches if configured."""
        grad_fn = (self._partial_grad_fn if partial
                   else jax.value_and_grad(self._loss_sums, has_aux=True))
        n = self.cfg.microbatches
        if n == 1:
            (loss_sum, weight), grads = grad_fn(params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

            def accumulate(carry, mb):
                (loss_sum, weight), grads = grad_fn(params, mb)
                acc_grads, acc_loss, acc_weight = carry
                return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss_sum,
                        acc_weight + weight), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum, weight), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), micro)
        weight = jnp.maximum(weight, 1.0)
        return loss_sum / weight, jax.tree.map(lambda g: g / weight, grads)

    def _step(self, state, batch, partial=False):
        params, opt_state = state["params"], state["opt_state"]
        loss, grads = self._gradients(params, batch, partial)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(params, opt_state):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            if partial:  # weight decay would otherwise still move the frozen parameters
                flat = traverse_util.flatten_dict(updates)
                updates = traverse_util.unflatten_dict(
                    {k: u if self._trainable[k] else jnp.zeros_like(u) for k, u in flat.items()})
            return optax.apply_updates(params, updates), opt_state

        # A non-finite step leaves params and optimizer state exactly as they were.
        params, opt_state = jax.lax.cond(ok, apply, lambda p, o: (p, o), params, opt_state)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "nonfinite_steps": state["nonfinite_steps"] + (~ok).astype(jnp.int32)}
        return new_state, {"loss": loss, "grad_norm": grad_norm, "applied": ok}

    def _eval(self, params, batch):
        loss_sum, weight = self._loss_sums(params, batch)
        return jnp.stack([loss_sum, weight])

    # ---- state lifecycle ----

    def init_state(self):
        return self._init()

    def resume(self, checkpointer: Checkpointer) -> tuple[CheckpointRecord, Any] | None:
        """The record and state of the newest intact checkpoint (damaged newer ones are skipped
        and set aside, Checkpointer.open), or None: start fresh. Each step's JSON record is read
        first, so an incompatible checkpoint is refused before any array is touched."""
        if checkpointer.latest_step() is None:
            return None

        def read(step: int):
            record = checkpointer.read_record(step)
            check_compatible(record.fingerprint, self.objective.fingerprint(), checkpointer.directory)
            return record, checkpointer.restore(step, self.abstract_state)[0]

        step, resumed = checkpointer.open(read)
        logging.info("resumed from step %d in %s", step, checkpointer.directory)
        return resumed

    def load_state(self, checkpointer: Checkpointer, step: int | None, initial_params: Callable | None = None):
        """The state of checkpoint `step`, or a fresh one (its params from `initial_params()`,
        already in this trainer's shardings, when given: a finetune's first start)."""
        if step is None:
            state = self.init_state()
            if initial_params is not None:
                state["params"] = initial_params()
            return state
        return checkpointer.open(lambda s: checkpointer.restore(s, self.abstract_state)[0], step)[1]

    def compile(self, start_step: int = 0) -> None:
        """Compiles the train step(s) still needed after `start_step` ahead of time (while the
        input pipeline warms up)."""
        batch = {name: jax.ShapeDtypeStruct((self.global_batch_size, *shape), dtype,
                                            sharding=self._batch_sharding[name])
                 for name, (shape, dtype) in self.objective.batch_features().items()}
        needed = ([True] if start_step < self.partial_steps else []) + \
                 ([False] if self.cfg.steps > self.partial_steps else [])
        for partial in needed:
            self._compiled_steps[partial] = self._train_steps[partial].lower(self.abstract_state, batch).compile()
        self._compiled_shapes = {name: b.shape for name, b in batch.items()}

    def global_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return parallel.host_batch_to_global(host_batch, self.mesh, self.rules, self.global_batch_size)

    def train_step(self, state, global_batch, step: int | None = None):
        """One step; `step` (1-based, the step being taken) selects the partial warm-up step."""
        partial = step is not None and step <= self.partial_steps
        compiled = self._compiled_steps.get(partial)
        if compiled is None or any(global_batch[k].shape != v for k, v in self._compiled_shapes.items()):
            compiled = self._train_steps[partial]
        return compiled(state, global_batch)

    def evaluate(self, params, host_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        totals = np.zeros(2)
        for b in host_batches:
            totals += np.asarray(self._eval_step(params, self.global_batch(b)).addressable_data(0))
        loss = totals[0] / max(totals[1], 1.0)
        return {"eval_loss": float(loss), "eval_perplexity": float(np.exp(min(loss, 50.0)))}


class _Preemption:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks after each step (single-
    process runs): the run writes a checkpoint and stops. A second Ctrl-C stops at once.

    Multi-process runs use JAX's preemption sync point instead, so that every host stops at the
    same step.
    """

    def __init__(self):
        self.requested = self.interrupted = False
        self._previous = {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.interrupted:
            raise KeyboardInterrupt
        self.requested = True
        self.interrupted = self.interrupted or signum == signal.SIGINT
        if self.interrupted:
            logging.warning("interrupted: writing a checkpoint after this step (Ctrl-C again stops at once)")

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _scalar(x) -> float:
    return np.asarray(x.addressable_data(0)).item()


def fit(trainer: Trainer, workdir: str, batches_from: Callable[[int], Iterator[dict]],
        load_eval_batches: Callable[[], list], schedule: optax.Schedule | None = None,
        initial_params: Callable | None = None, init_from: dict | None = None) -> dict:
    """Trains to `cfg.steps`, resuming from WORKDIR's latest checkpoint if there is one.

    `batches_from(position)` gives this process's batches from a data position on; it and
    `load_eval_batches` run in threads, so the input pipeline warms up while the steps compile.
    Metrics of a step are read after the next step is dispatched, so the host never stalls the
    device. A fresh run takes its params from `initial_params()` when given (a finetune), and
    every checkpoint record names that source (`init_from`); a resume never calls it, and refuses
    a source other than the one its checkpoints name. Returns a summary: final step, status
    (completed | preempted: SIGTERM | interrupted: Ctrl-C), last losses.
    """
    cfg = trainer.cfg
    preemption = _Preemption()  # from here on a SIGTERM or Ctrl-C stops after a step, with a checkpoint
    try:
        return _fit(trainer, workdir, batches_from, load_eval_batches, schedule, initial_params, init_from,
                    preemption)
    finally:
        preemption.restore()


def _fit(trainer, workdir, batches_from, load_eval_batches, schedule, initial_params, init_from, preemption):
    cfg = trainer.cfg
    checkpointer = Checkpointer(workdir, keep=cfg.keep_checkpoints, asynchronous=cfg.async_checkpoints)
    resumed = trainer.resume(checkpointer)
    if resumed is not None and resumed[0].init_from != init_from:
        raise errors.UserError(f"{workdir} was started from {resumed[0].init_from or 'scratch'}, not from "
                               f"{init_from or 'scratch'}; use another workdir")
    batches = batches_from(resumed[0].data_position if resumed else 0)
    eval_loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eval_batches")
    eval_future = eval_loader.submit(load_eval_batches)
    state = resumed[1] if resumed else trainer.load_state(checkpointer, None, initial_params)
    start = int(_scalar(state["step"]))
    trainer.compile(start)
    writer = MetricsWriter(workdir, start)  # rows past `start` (a killed run's replayed steps) go
    peak, peak_source = hardware.peak_flops(cfg.peak_flops_per_device)
    examples = trainer.global_batch_size
    tokens_per_step = trainer.objective.tokens_per_example() * examples
    flops_per_token = trainer.objective.flops_per_example() / trainer.objective.tokens_per_example()
    fingerprint = trainer.objective.fingerprint()
    bar = tqdm.tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                    disable=not (cfg.progress_bar and jax.process_index() == 0))
    summary = {"start_step": start, "status": "completed", "peak_flops": peak, "peak_source": peak_source}
    pending = None  # (step, device metrics) of the last dispatched step
    last_time = time.perf_counter()

    def report(step, device_metrics):
        nonlocal last_time
        metrics = {k: _scalar(v) for k, v in device_metrics.items()}
        now = time.perf_counter()
        elapsed, last_time = now - last_time, now
        tokens_per_sec = tokens_per_step / elapsed
        record = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                  "applied": bool(metrics["applied"]), "tokens_per_sec": tokens_per_sec,
                  "mfu": model_flops_utilization(flops_per_token, tokens_per_sec, peak),
                  "peak_flops": peak, "peak_source": peak_source, "step_time_s": elapsed}
        if schedule is not None:
            record["lr"] = float(schedule(step - 1))
        writer.write(step, record)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
        summary["loss"] = metrics["loss"]
        if not record["applied"]:
            logging.warning("step %d: non-finite loss or gradient, update skipped", step)
            if cfg.on_nonfinite == "stop":
                raise NonFiniteError(f"step {step}: loss or gradient is not finite (loss={metrics['loss']}, "
                                     f"grad_norm={metrics['grad_norm']}); stopping because "
                                     f"TrainConfig.on_nonfinite = 'stop'")

    def save(step, force=False):
        record = CheckpointRecord(step=step, data_position=step, objective=trainer.objective.name,
                                  fingerprint=fingerprint, init_from=init_from,
                                  **trainer.objective.checkpoint_fields())
        checkpointer.save(step, state, record, force=force)

    try:
        for step in range(start + 1, cfg.steps + 1):
            state, device_metrics = trainer.train_step(state, trainer.global_batch(next(batches)), step)
            if pending:
                report(*pending)
            pending = (step, device_metrics)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save(step)
            checkpointer.check()  # a failed save (disk full) stops the run at once
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps and eval_future.result():
                writer.write(step, trainer.evaluate(state["params"], eval_future.result()))
            if preemption.reached(step):
                report(*pending)
                pending = None
                if step % cfg.checkpoint_every:
                    save(step, force=True)
                summary["status"] = "interrupted" if preemption.interrupted else "preempted"
                break
        if pending:
            report(*pending)
        if summary["status"] == "completed" and eval_future.result():
            result = trainer.evaluate(state["params"], eval_future.result())
            writer.write(cfg.steps, result)
            summary.update(result)
    finally:
        eval_loader.shutdown(wait=False, cancel_futures=True)
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    summary["step"] = int(_scalar(state["step"]))
    summary["nonfinite_steps"] = int(_scalar(state["nonfinite_steps"]))
    return summary
