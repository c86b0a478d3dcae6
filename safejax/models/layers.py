"""Transformer building blocks in Flax NNX, shared by the decoder LM and (later) the encoder.

Every parameter is an `nnx.Param` with a `logical_axes` tuple naming each dimension (embed, mlp,
heads, kv_heads, head_dim, vocab); activations are annotated with `parallel.constrain`. The mesh
mapping lives in one rules table (configs/mesh/rules.gin), so no layer knows about devices.

Parameters are stored in `param_dtype` (fp32) and cast to the compute `dtype` (bf16) where used:
mixed precision without a separate master copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from safejax.parallel import constrain

Axes = tuple[str | None, ...]


def make_param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
    """A parameter initialised with `init` and tagged with its logical axis names."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (no bias, no mean subtraction), computed in fp32."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embedding(nnx.Module):
    """Token embedding; `attend` reuses the same table as the output head when tied."""

    def __init__(self, vocab: int, dim: int, *, init_std: float, dtype, param_dtype, rngs):
        init = nnx.initializers.normal(stddev=init_std)
        self.table = make_param(rngs, init, (vocab, dim), ("vocab", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.table[...].astype(self.dtype), ids, axis=0)
        return constrain(x, ("batch", "length", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        logits = jnp.einsum("btd,vd->btv", x, self.table[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding over the last axis, in the split-halves layout of Llama.

    x: (batch, length, heads, head_dim); positions: (batch, length) integer positions.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (b, t, half)
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal mask that also keeps tokens of one packed document from seeing another's.

    segment_ids: (batch, length), 0 for padding. Returns bool (batch, 1, length, length).
    """
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    not_pad = (segment_ids != 0)[:, :, None]
    return (causal[None] & same_doc & not_pad)[:, None]


class Attention(nnx.Module):
    """Multi-head causal self-attention with optional grouped-query (fewer K/V heads) and RoPE."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rope_base: float, init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        init = nnx.initializers.normal(stddev=init_std)
        self.wq = make_param(rngs, init, (d_model, num_heads, head_dim),
                             ("embed", "heads", "head_dim"), param_dtype)
        self.wk = make_param(rngs, init, (d_model, num_kv_heads, head_dim),
                             ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wv = make_param(rngs, init, (d_model, num_kv_heads, head_dim),
                             ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wo = make_param(rngs, init, (num_heads, head_dim, d_model),
                             ("heads", "head_dim", "embed"), param_dtype)
        self.rope_base = rope_base
        self.dtype = dtype

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        q = constrain(jnp.einsum("btd,dnh->btnh", x, w(self.wq)), ("batch", "length", "heads", "head_dim"))
        k = constrain(jnp.einsum("btd,dkh->btkh", x, w(self.wk)), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(jnp.einsum("btd,dkh->btkh", x, w(self.wv)), ("batch", "length", "kv_heads", "head_dim"))
        q = rotary(q, positions, self.rope_base)
        k = rotary(k, positions, self.rope_base)

        b, t, n, h = q.shape
        kv = k.shape[2]
        # Head-major layout for the two batched matmuls (measured faster on XLA:CPU); query
        # groups of size n // kv share one K/V head.
        q = (q * h**-0.5).reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # b k g t h
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # b k s h
        logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
        out = constrain(out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h), ("batch", "length", "heads", "head_dim"))
        return constrain(jnp.einsum("btnh,nhd->btd", out, w(self.wo)), ("batch", "length", "embed"))


class SwiGLU(nnx.Module):
    """Gated MLP: down(silu(gate(x)) * up(x)), as in Llama and SmolLM2."""

    def __init__(self, d_model: int, mlp_dim: int, *, init_std: float, dtype, param_dtype, rngs):
        init = nnx.initializers.normal(stddev=init_std)
        self.gate = make_param(rngs, init, (d_model, mlp_dim), ("embed", "mlp"), param_dtype)
        self.up = make_param(rngs, init, (d_model, mlp_dim), ("embed", "mlp"), param_dtype)
        self.down = make_param(rngs, init, (mlp_dim, d_model), ("mlp", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        gate = constrain(x @ w(self.gate), ("batch", "length", "mlp"))
        up = constrain(x @ w(self.up), ("batch", "length", "mlp"))
        return constrain((jax.nn.silu(gate) * up) @ w(self.down), ("batch", "length", "embed"))
