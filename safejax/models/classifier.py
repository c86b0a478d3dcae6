"""The safety classifier: a pretrained encoder, mean pooling, and a linear head over the 6 rubric
scores (a multiclass head, not a regression, as in PAPER.md §1).

Its export format and the batching `Scorer` live in safety/classifier_export.py.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from safejax import errors
from safejax.models import encoder as enc
from safejax.models.layers import make_param
from safejax.parallel import constrain
from safejax.safety.rubric import NUM_SCORES



@gin.configurable
@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    encoder: enc.EncoderConfig = enc.EncoderConfig()
    seq_len: int = 128  # tokens per text (the tokenizer truncates longer ones)
    num_classes: int = NUM_SCORES
    pretrained: bool = True  # start from the encoder's pretrained weights (False: random, tests)

    def __post_init__(self):
        if not 0 < self.seq_len <= self.encoder.max_positions:
            raise errors.UserError(f"ClassifierConfig.seq_len={self.seq_len} must be in 1.."
                                   f"{self.encoder.max_positions} (the encoder's positions)")

    def shape_dict(self) -> dict:
        return {**self.encoder.shape_dict(), "num_classes": self.num_classes}


class SafetyClassifier(nnx.Module):
    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        self.encoder = enc.Encoder(cfg.encoder, rngs=rngs)
        if cfg.pretrained:
            enc.load_pretrained(self.encoder)
        d = cfg.encoder.d_model
        self.head_w = make_param(rngs, nnx.initializers.normal(stddev=d**-0.5), (d, cfg.num_classes),
                                 ("embed", "classes"), jnp.float32)
        self.head_b = make_param(rngs, nnx.initializers.zeros, (cfg.num_classes,), ("classes",), jnp.float32)
        self.cfg = cfg

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """(batch, length) token ids and mask -> (batch, num_classes) float32 logits."""
        return self.head(self.encoder.pool(tokens, mask))

    def resume(self, hidden: jax.Array, mask: jax.Array, start: int) -> jax.Array:
        """The logits from hidden states after the encoder's first `start` layers (the scoring
        cascade's second stage)."""
        return self.head(enc.mean_pool(self.encoder.resume(hidden, mask, start), mask))

    def head(self, pooled: jax.Array) -> jax.Array:
        logits = pooled @ self.head_w[...] + self.head_b[...]
        return constrain(logits, ("batch", "classes"))


def is_head(path: tuple) -> bool:
    """The head's parameters (trained alone during the warm-up)."""
    return path[0] in ("head_w", "head_b")
