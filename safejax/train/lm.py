"""The language-modelling objective: which model to build, which batch features it reads, its loss.

The trainer is generic; this is the part that knows it trains a decoder LM on seqio's packed
decoder features (a classifier objective plugs into the same trainer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from safejax.data.pipeline import FEATURES
from safejax.models.decoder import Decoder, DecoderConfig, count_params, flops_per_token



@jax.custom_vjp
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token -log softmax(logits)[target], for fp32 logits (..., vocab) and int targets (...).

    By hand rather than through log_softmax and take_along_axis: the forward keeps only the
    log-sum-exp per token, and the backward is one fused pass, softmax - one_hot, over the
    (tokens x vocab) logits, where autodiff writes a broadcast one-hot gradient and re-reads the
    logits several times.
    """
    return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
    peak = jnp.max(logits, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1, keepdims=True)) + peak
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    return (lse - target_logit)[..., 0], (logits, targets, lse)


def _cross_entropy_bwd(residuals, grad):
    logits, targets, lse = residuals
    one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    return (jnp.exp(logits - lse) - one_hot) * grad[..., None], None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@dataclasses.dataclass(frozen=True)
class LanguageModelObjective:
    model_config: DecoderConfig
    seq_len: int
    vocabulary: dict | None = None  # vocab.describe() of the data's vocabulary, for the checkpoint record

    name = "lm"

    def create_model(self, rngs: nnx.Rngs) -> Decoder:
        return Decoder(self.model_config, rngs=rngs)

    def loss(self, model: Decoder, batch: dict) -> tuple[jax.Array, jax.Array]:
        """Summed token cross-entropy and the summed weights (the caller divides, so that
        gradient accumulation over microbatches equals one big batch exactly)."""
        logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
        weights = batch["weights"].astype(jnp.float32)
        return (cross_entropy(logits.astype(jnp.float32), batch["targets"]) * weights).sum(), weights.sum()

    def batch_features(self) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
        """Per-example shape and dtype of each batch feature the loss reads."""
        return {name: ((self.seq_len,), jnp.int32) for name in FEATURES.values()}

    def flops_per_example(self) -> float:
        return flops_per_token(self.model_config, self.seq_len) * self.seq_len

    def tokens_per_example(self) -> int:
        return self.seq_len

    def fingerprint(self) -> dict:
        return {"objective": self.name, **self.model_config.shape_dict()}

    def checkpoint_fields(self) -> dict:
        """What the checkpoint record says of the model beyond its shapes."""
        return {"model_config": dataclasses.asdict(self.model_config), "seq_len": self.seq_len,
                "vocabulary": self.vocabulary}

    def describe(self) -> dict:
        m = self.model_config
        return {"params": count_params(m)["total"], "layers": m.num_layers, "d_model": m.d_model,
                "heads": m.num_heads, "kv_heads": m.kv_heads, "mlp": m.mlp_dim,
                "vocab": m.vocab_size, "seq_len": self.seq_len}
