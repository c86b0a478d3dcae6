"""Optimizer and learning-rate schedules (optax), configured in gin.

Defaults follow PAPER.md's pretraining setup: AdamW, lr 5e-4, weight decay 0.01, global-norm
clipping. Weight decay skips norms' scales (1-D parameters), as is usual for Llama-style models.
"""

from __future__ import annotations

import gin
import jax
import optax

from safejax import errors


@gin.configurable
def learning_rate_schedule(steps: int, *, kind: str = "cosine", peak: float = 5e-4,
                           warmup_steps: int = 100, final_fraction: float = 0.1,
                           decay_fraction: float = 0.2) -> optax.Schedule:
    """`cosine`: linear warmup then cosine decay to `final_fraction * peak` at `steps`.

    `wsd` (warmup-stable-decay): linear warmup, constant, then linear decay over the last
    `decay_fraction` of the steps; a run can be extended by resuming before the decay starts.
    `constant`: warmup then flat.
    """
    warmup_steps = min(warmup_steps, steps)
    final = peak * final_fraction
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    rest = max(steps - warmup_steps, 1)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=final_fraction)
    elif kind == "wsd":
        decay = max(int(rest * decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay)], [rest - decay])
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise errors.UserError(f"learning_rate_schedule.kind must be cosine, wsd or constant; got {kind!r}")
    return optax.join_schedules([warmup, after], [warmup_steps])


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


@gin.configurable
def adamw(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.01, clip_norm: float = 1.0) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts)
