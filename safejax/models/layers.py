"""Transformer building blocks in Flax NNX, shared by the decoder LM and (later) the encoder.

Every parameter is an `nnx.Param` with a `logical_axes` tuple naming each dimension (embed, mlp,
heads, kv_heads, head_dim, vocab); activations are annotated with `parallel.constrain`. The mesh
mapping lives in one rules table (configs/mesh/rules.gin), so no layer knows about devices.

Parameters are stored in `param_dtype` (fp32) and cast to the compute `dtype` (bf16) where used:
mixed precision without a separate master copy. The training attention kernels (one per
platform) are in models/attention.py; `attend` is the decoding attention over a K/V cache.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safejax.models import attention as attention_lib
from safejax.parallel import constrain

Axes = tuple[str | None, ...]


def make_param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
    """A parameter initialised with `init` and tagged with its logical axis names."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def dense(x: jax.Array, kernel: jax.Array, in_dims: int = 1, out_dtype=None) -> jax.Array:
    """Contracts x's last `in_dims` axes with kernel's first ones, as a single 2-D matmul.

    XLA:CPU runs (batch, length, d) @ (d, f) and its gradients far slower than the same
    (batch * length, d) @ (d, f) (measured: 1.6x for the SwiGLU block); on accelerators the
    reshapes are free.
    """
    in_shape, out_shape = kernel.shape[:in_dims], kernel.shape[in_dims:]
    lead = x.shape[: x.ndim - in_dims]
    k = math.prod(in_shape)
    y = jnp.dot(x.reshape(-1, k), kernel.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(*lead, *out_shape)


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

    def attend(self, x: jax.Array, table_t: jax.Array | None = None) -> jax.Array:
        """Logits x @ table.T; `table_t`, the table copied as (dim, vocab) by `transposed`, is
        read instead when given."""
        kernel = self.table[...].T if table_t is None else table_t
        logits = dense(x, kernel.astype(self.dtype), out_dtype=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def transposed(self) -> jax.Array:
        """A (dim, vocab) copy of the table, for `attend`."""
        return constrain(jnp.transpose(self.table[...]), ("embed", "vocab"))


def rope_tables(positions: jax.Array, head_dim: int, base: float, max_position: int) -> tuple[jax.Array, jax.Array]:
    """sin and cos (batch, length, 1, head_dim // 2) of the rotary angles of positions below
    max_position, in fp32, shared by every layer's queries and keys.

    They are looked up in a table built with numpy while tracing (a constant of the program):
    computed inside the jit, XLA:CPU fuses sin and cos into each layer's rotation, forward and
    backward, and evaluates them for every element of every head (~4% of a `small` training
    step). The angles are rounded to fp32 as a traced fp32 computation would round them.
    """
    half = head_dim // 2
    inv_freq = (1.0 / (base ** (np.arange(half, dtype=np.float32) / half))).astype(np.float32)
    angles = (np.arange(max_position, dtype=np.float32)[:, None] * inv_freq).astype(np.float64)
    return tuple(jnp.asarray(f(angles), jnp.float32)[positions][:, :, None] for f in (np.sin, np.cos))


def rotary(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary position embedding over the last axis, in the split-halves layout of Llama.

    x: (batch, length, heads, head_dim); rope: `rope_tables` of the tokens' positions.
    """
    sin, cos = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attend(q, k, v, bias, dtype) -> jax.Array:
    """Softmax attention of q (b, kv, g, t, h) over k, v (b, kv, s, h); bias (b, 1, t, s)."""
    logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32) + bias[:, :, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bksh->bkgth", probs, v)


CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # a K or V cache, head-major like `attend`


class Attention(nnx.Module):
    """Multi-head causal self-attention with optional grouped-query (fewer K/V heads) and RoPE."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 init_std: float, dtype, param_dtype, rngs: nnx.Rngs,
                 query_block: int = 0, kernel: str = "blockwise"):
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
        self.query_block = query_block
        self.kernel = kernel  # a kernel of models/attention.py, already resolved for the platform
        self.dtype = dtype

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], segment_ids: jax.Array) -> jax.Array:
        q, k, v = self._project(x, rope)
        return self._output(attention_lib.causal_attention(q, k, v, segment_ids, kernel=self.kernel,
                                                           query_block=self.query_block, dtype=self.dtype))

    def decode(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], bias: jax.Array, cache: dict,
               index: jax.Array) -> tuple[jax.Array, dict]:
        """Attention of new tokens over a K/V cache they are first written into.

        cache: {"k", "v"} of shape (b, kv, s, h); the new tokens' K/V go to columns
        index .. index + t - 1; bias (b, 1, t, s) says which columns each new token sees, so the
        caller decides causality, padding and tree-shaped lookahead.
        """
        q, k, v = self._project(x, rope)
        start = (0, 0, index, 0)
        cache = {name: constrain(jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype), start),
                                 CACHE_AXES) for name, new in (("k", k), ("v", v))}
        return self._output(attend(q, cache["k"], cache["v"], bias, self.dtype)), cache

    def _project(self, x, rope):
        """Queries (b, kv, g, t, h), pre-scaled, and keys, values (b, kv, t, h), with RoPE."""
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        q = constrain(dense(x, w(self.wq)), ("batch", "length", "heads", "head_dim"))
        k = constrain(dense(x, w(self.wk)), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(dense(x, w(self.wv)), ("batch", "length", "kv_heads", "head_dim"))
        q = rotary(q, rope)
        k = rotary(k, rope)

        b, t, n, h = q.shape
        kv = k.shape[2]
        # Head-major layout for the two batched matmuls (measured faster on XLA:CPU); query
        # groups of size n // kv share one K/V head.
        q = (q * h**-0.5).reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # b k g t h
        return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def _output(self, out):
        b, kv, g, t, h = out.shape
        out = constrain(out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h), ("batch", "length", "heads", "head_dim"))
        return constrain(dense(out, self.wo[...].astype(self.dtype), in_dims=2), ("batch", "length", "embed"))


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
        gate = constrain(dense(x, w(self.gate)), ("batch", "length", "mlp"))
        up = constrain(dense(x, w(self.up)), ("batch", "length", "mlp"))
        return constrain(dense(gated_silu(gate, up), w(self.down)), ("batch", "length", "embed"))


@jax.custom_vjp
def gated_silu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, computed in fp32.

    The backward pass works from the two matmul outputs, which are kept anyway. Plain autodiff
    also kept silu(gate) and the product's intermediates, (tokens x mlp) arrays written in the
    forward pass and read back (measured: ~1.5% of a `small` training step on the CPU).
    """
    return _gated_silu_fwd(gate, up)[0]


def _gated_silu_fwd(gate, up):
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype), (gate, up)


def _gated_silu_bwd(residuals, d_out):
    gate, up = residuals
    g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), d_out.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    d_gate = d * u * sig * (1.0 + g * (1.0 - sig))
    return d_gate.astype(gate.dtype), (d * g * sig).astype(up.dtype)


gated_silu.defvjp(_gated_silu_fwd, _gated_silu_bwd)
