"""A decoder-only Transformer language model of the Llama / SmolLM2 family, in Flax NNX.

Read top to bottom: config, one block (pre-norm attention + pre-norm SwiGLU MLP), the stack.
Inputs follow seqio's packed decoder features: token ids, positions within each packed document
and segment ids (0 = padding), so packed documents never attend to each other.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from safejax import config, errors
from safejax.models import attention as attention_lib
from safejax.models.layers import Attention, Embedding, RMSNorm, SwiGLU, rope_tables

# From this many rows, decoding reads the output head from `Decoder.output_kernel` (measured on
# XLA:CPU; below it, the vocab-major table is faster).
HEAD_KERNEL_MIN_ROWS = 4

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Model dimensions and numerics. Everything that changes the parameters' shapes lives here."""

    vocab_size: int = 8192
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads (full multi-head attention)
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 384
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch
    attention: str = "auto"  # the training attention kernel (models/attention.py): auto picks per platform
    query_block: int = 128  # blockwise kernel: queries by blocks, skipping masked keys; 0: one block

    def __post_init__(self):
        config.check_types(self)
        for name in ("dtype", "param_dtype"):
            try:
                floating = jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise errors.UserError(f"DecoderConfig.{name} must be a floating dtype (float32, bfloat16, "
                                       f"float16), got {getattr(self, name)!r}")
        if self.remat != "none" and self.remat not in REMAT_POLICIES:
            raise errors.UserError(f"DecoderConfig.remat must be one of none, {', '.join(REMAT_POLICIES)}; "
                             f"got {self.remat!r}")
        if self.attention not in attention_lib.KERNELS:
            raise errors.UserError(f"DecoderConfig.attention must be one of {', '.join(attention_lib.KERNELS)}; "
                                   f"got {self.attention!r}")
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise errors.UserError(f"DecoderConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.head_dim and self.d_model % self.num_heads:
            raise errors.UserError(f"DecoderConfig: d_model={self.d_model} is not divisible by "
                             f"num_heads={self.num_heads}; set head_dim")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def shape_dict(self) -> dict:
        """The fields that decide parameter shapes: two checkpoints are compatible iff these match."""
        return {k: getattr(self, k) for k in ("vocab_size", "num_layers", "d_model", "num_heads",
                                               "num_kv_heads", "head_dim", "mlp_dim", "tie_embeddings")}


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size,
                              init_std=cfg.init_std, dtype=dt,
                              param_dtype=pdt, rngs=rngs, query_block=cfg.query_block,
                              kernel=attention_lib.resolve(cfg.attention, dtype=cfg.dtype))
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, init_std=cfg.init_std, dtype=dt,
                          param_dtype=pdt, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], segment_ids: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), rope, segment_ids)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x, rope, bias, cache, index):
        attn, cache = self.attn.decode(self.attn_norm(x), rope, bias, cache, index)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), cache


class Decoder(nnx.Module):
    """Token ids -> next-token logits (fp32)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, dtype=dt,
                               param_dtype=pdt, rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else Embedding(
            cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x = self.embed(tokens)
        rope = self._rope(positions, tokens.shape[1])
        for block in self.blocks:
            x = self._run_block(block, x, rope, segment_ids)
        return self._logits(x)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: list[dict], index: jax.Array,
               attend_mask: jax.Array, last_only: bool = False,
               head: jax.Array | None = None) -> tuple[jax.Array, list[dict]]:
        """Cached forward for sampling: the new tokens' K/V are written into `cache` at columns
        index .. index + t - 1, and each new token attends where attend_mask (b, t, s) is True.

        Returns the logits (b, t, vocab), or (b, 1, vocab) for the last token with `last_only`
        (a prompt's prefill), and the updated cache (from `init_cache`). `head`, the output
        head as `output_kernel` lays it out, replaces the vocab-major table in the last matmul
        from HEAD_KERNEL_MIN_ROWS rows on.
        """
        bias = jnp.where(attend_mask, 0.0, -1e30).astype(jnp.float32)[:, None]
        x = self.embed(tokens)
        rope = self._rope(positions, attend_mask.shape[-1])
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block.decode(x, rope, bias, layer_cache, index)
            new_cache.append(layer_cache)
        x = x[:, -1:] if last_only else x
        use_head = head is not None and x.shape[0] * x.shape[1] >= HEAD_KERNEL_MIN_ROWS
        return self._logits(x, head if use_head else None), new_cache

    def output_kernel(self) -> jax.Array:
        """The output head as a (d_model, vocab) matrix, a copy for decoding.

        Decoding multiplies a few rows by the head every step. XLA:CPU repacks the
        (vocab, d_model) table on every call; with this copy, `small`'s decoding took 1-8% less
        CPU at 4-32 rows (greedy batch 8, beam search, Safe Beam), but 5% more at one row.
        """
        return self._head().transposed()

    def _rope(self, positions, max_position):
        """Positions are below the sequence length (packed documents) or the cache length."""
        return rope_tables(positions, self.cfg.head_size, self.cfg.rope_base, max_position)

    def _head(self) -> Embedding:
        return self.embed if self.lm_head is None else self.lm_head

    def _logits(self, x, head=None):
        return self._head().attend(self.final_norm(x), head)

    def _run_block(self, block, x, rope, segment_ids):
        if self.cfg.remat == "none":
            return block(x, rope, segment_ids)
        policy = REMAT_POLICIES[self.cfg.remat]
        return nnx.remat(lambda b, *args: b(*args), policy=policy)(block, x, rope, segment_ids)


def init_cache(cfg: DecoderConfig, batch: int, length: int) -> list[dict]:
    """An empty K/V cache for `Decoder.decode`: per layer {"k", "v"} of (batch, kv_heads, length,
    head_dim) in the compute dtype."""
    shape = (batch, cfg.kv_heads, length, cfg.head_size)
    return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
            for _ in range(cfg.num_layers)]


def count_params(cfg: DecoderConfig) -> dict[str, int]:
    """Parameter counts from the config alone: total, and the part that takes part in matmuls."""
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * cfg.mlp_dim + 2 * d
    embed = cfg.vocab_size * d
    total = cfg.num_layers * per_layer + d + embed * (1 if cfg.tie_embeddings else 2)
    # The input lookup is a gather, not a matmul; the output head always is one.
    matmul = cfg.num_layers * (per_layer - 2 * d) + embed
    return {"total": total, "matmul": matmul}


def flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul weight plus causal attention.

    Attention is counted as in the PaLM paper (12 * layers * heads * head_dim * seq_len), the
    convention MaxText and most MFU reports use.
    """
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
    return 6 * count_params(cfg)["matmul"] + attn
