"""Training attention: causal softmax attention within packed documents, one kernel per target.

Every kernel takes q (b, kv, g, t, h), pre-scaled, k, v (b, kv, t, h) and segment_ids (b, t),
0 for padding, and returns (b, kv, g, t, h). A query sees the keys of its own segment up to
itself (a padding token sees padding only, so no row is empty). `DecoderConfig.attention`:

  blockwise    hand-written forward and backward passes, by blocks of queries; tuned for XLA:CPU
  dot_product  `jax.nn.dot_product_attention` (XLA) with the mask as an array: the plain reference
  cudnn        `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash
               kernel (GPU, bf16/fp16): causal mask type, segments as a mask it folds into a bias
  splash       the Pallas splash kernel (TPU) per (batch row, K/V head) with segment ids, under
               shard_map on the mesh; on a CPU it runs in Pallas' interpreter (tests only: slow)
  auto         cudnn on a GPU (dot_product when the compute dtype is fp32), splash on a TPU,
               blockwise on a CPU

Decoding (layers.attend over a K/V cache) is the same on every platform.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from safejax import errors, parallel

KERNELS = ("auto", "blockwise", "dot_product", "cudnn", "splash")
SPLASH_BLOCK = 512  # the splash kernel's block sizes (at most): MaxText's defaults on TPU v4/v5


def resolve(kernel: str, platform: str | None = None, dtype="bfloat16") -> str:
    """The kernel `kernel` means on `platform` (default: JAX's default backend)."""
    if kernel not in KERNELS:
        raise errors.UserError(f"DecoderConfig.attention must be one of {', '.join(KERNELS)}; got {kernel!r}")
    platform = platform or jax.default_backend()
    if kernel == "auto":
        if platform == "gpu":
            return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "dot_product"
        return "splash" if platform == "tpu" else "blockwise"
    if kernel == "cudnn" and platform != "gpu":
        raise errors.UserError(f"DecoderConfig.attention = 'cudnn' needs a GPU (this backend is {platform})")
    return kernel


def causal_attention(q, k, v, segment_ids, *, kernel: str, query_block: int, dtype) -> jax.Array:
    """The training attention with a resolved `kernel` (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    if kernel == "blockwise":
        return blockwise(q, k, v, segment_ids, query_block, dtype)
    if kernel in ("dot_product", "cudnn"):
        return _dot_product(q, k, v, segment_ids, "xla" if kernel == "dot_product" else "cudnn")
    if kernel == "splash":
        return _splash(q, k, v, segment_ids)
    raise ValueError(f"unresolved attention kernel {kernel!r}")


def _dot_product(q, k, v, segment_ids, implementation: str) -> jax.Array:
    """Through jax.nn.dot_product_attention's (B, T, N, H) layout; its GQA groups head n with
    K/V head n // g, the order of our (kv, g) heads."""
    b, kv, g, t, h = q.shape
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (b, 1, t, t)
    if implementation == "xla":
        mask, causal = same & jnp.tril(jnp.ones((t, t), bool)), False
    else:
        mask, causal = same, True  # cuDNN's causal mask type skips the upper blocks
    out = jax.nn.dot_product_attention(
        q.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        mask=mask, scale=1.0, is_causal=causal, implementation=implementation)
    return out.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)


def _splash(q, k, v, segment_ids) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, kv, g, t, h = q.shape
    block = min(SPLASH_BLOCK, t)
    if t % block or block % 128:
        raise errors.UserError(f"attention = 'splash' needs a sequence length that is a multiple of 128, got {t}")
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(g)])
    kernel = sk.make_splash_mqa(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                interpret=jax.default_backend() != "tpu")

    def one_row_one_head(q1, k1, v1, seg):  # q1 (g, t, h), k1, v1 (t, h), seg (t,)
        return kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=seg, kv=seg))

    def local(q, k, v, seg):
        per_head = jax.vmap(one_row_one_head, in_axes=(0, 0, 0, None))
        return jax.vmap(per_head, in_axes=(0, 0, 0, 0))(q, k, v, seg).astype(q.dtype)

    active = parallel.active()
    if active is None:
        return local(q, k, v, segment_ids)
    mesh, rules = active
    spec = lambda *axes, shape: parallel.logical_to_spec(axes, rules, mesh, shape)  # noqa: E731
    q_spec = spec("batch", "kv_heads", None, None, None, shape=q.shape)
    kv_spec = spec("batch", "kv_heads", None, None, shape=k.shape)
    seg_spec = spec("batch", None, shape=segment_ids.shape)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)


def blockwise(q, k, v, segment_ids, query_block: int, dtype) -> jax.Array:
    """The CPU kernel. Queries go by blocks of `query_block` that each score only the keys up
    to their end ((n + 1) / 2n of the score matrix for n blocks; 0: one block).

    Flash-style, with a hand-written backward pass (custom VJP): the mask is computed inside the
    score fusion from positions and segment ids (no (b, t, t) bias array to read), the output is
    normalised after the value product, and only the log-sum-exp per query is kept; the backward
    pass recomputes the probabilities from the scores instead of storing them. On the CPU the
    score-sized arrays cost memory traffic, not FLOPs, so fewer passes over them is the win.
    """
    b, kv, g, t, h = q.shape
    out = _flash(q.reshape(b * kv, g, t, h), k.reshape(b * kv, t, h), v.reshape(b * kv, t, h),
                 jnp.repeat(segment_ids, kv, axis=0), query_block, jnp.dtype(dtype))
    return out.reshape(b, kv, g, t, h)


def _query_blocks(t: int, query_block: int) -> list[tuple[int, int]]:
    block = query_block if 0 < query_block < t else t
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _block_scores(q, k, segments, start: int, end: int) -> jax.Array:
    """fp32 scores (z, g, end - start, end) of queries start..end-1 over keys 0..end-1, masked
    with -1e30 (finite, so a max over them stays finite); the mask is built in the same fusion."""
    s = jnp.einsum("zgth,zsh->zgts", q[:, :, start:end], k[:, :end], preferred_element_type=jnp.float32)
    q_pos = start + jax.lax.broadcasted_iota(jnp.int32, (end - start, end), 0)
    k_pos = jax.lax.broadcasted_iota(jnp.int32, (end - start, end), 1)
    allowed = (q_pos >= k_pos) & (segments[:, start:end, None] == segments[:, None, :end])
    return jnp.where(allowed[:, None], s, -1e30)


def _concat_blocks(blocks):
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=2)


def _attention_fwd(q, k, v, segments, query_block, dtype):
    """Output (z, g, t, h) and log-sum-exp (z, g, t, 1)."""
    outs, lses = [], []
    for start, end in _query_blocks(q.shape[2], query_block):
        s = _block_scores(q, k, segments, start, end)
        peak = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("zgts,zsh->zgth", p.astype(dtype), v[:, :end], preferred_element_type=jnp.float32)
        outs.append((o / total).astype(dtype))  # normalised on (t, h), not on (t, s)
        lses.append(peak + jnp.log(total))
    return _concat_blocks(outs), _concat_blocks(lses)


def _attention_bwd(q, k, v, segments, out, lse, d_out, query_block, dtype):
    """Gradients of q, k, v, the probabilities recomputed from the scores and the log-sum-exp."""
    f32 = jnp.float32
    # rowsum(d_out * out) as a batched dot, not a multiply + reduce: XLA:CPU (jax 0.10.2) hands
    # the latter to YNNPACK, many times slower for this 64-wide reduction (benchmarks/PEERS.md).
    delta = jnp.einsum("zgth,zgth->zgt", d_out, out, preferred_element_type=f32)[..., None]  # (z, g, t, 1)
    # dk and dv are accumulated transposed, (z, h, t): XLA:CPU runs the products that contract
    # the queries faster with head_dim as their output's rows than as its columns.
    z, keys, h = k.shape
    dq_blocks, dk_t, dv_t = [], jnp.zeros((z, h, keys), f32), jnp.zeros((z, h, keys), f32)
    for start, end in _query_blocks(q.shape[2], query_block):
        p = jnp.exp(_block_scores(q, k, segments, start, end) - lse[:, :, start:end])
        do = d_out[:, :, start:end]
        dp = jnp.einsum("zgth,zsh->zgts", do, v[:, :end], preferred_element_type=f32)
        ds = (p * (dp - delta[:, :, start:end])).astype(dtype)
        dq_blocks.append(jnp.einsum("zgts,zsh->zgth", ds, k[:, :end], preferred_element_type=f32))
        dk_t = dk_t.at[:, :, :end].add(jnp.einsum("zgth,zgts->zhs", q[:, :, start:end], ds, preferred_element_type=f32))
        dv_t = dv_t.at[:, :, :end].add(jnp.einsum("zgth,zgts->zhs", do, p.astype(dtype), preferred_element_type=f32))
    return _concat_blocks(dq_blocks), dk_t.transpose(0, 2, 1), dv_t.transpose(0, 2, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, segments, query_block, dtype):
    """Attention over (batch row, K/V head) pairs z: q (z, g, t, h), k, v (z, t, h), segments (z, t)."""
    return _flash_fwd(q, k, v, segments, query_block, dtype)[0]


def _flash_fwd(q, k, v, segments, query_block, dtype):
    out, lse = _attention_fwd(q, k, v, segments, query_block, dtype)
    return out, (q, k, v, segments, out, lse)


def _flash_bwd(query_block, dtype, residuals, d_out):
    q, k, v, segments, out, lse = residuals
    dq, dk, dv = _attention_bwd(q, k, v, segments, out, lse, d_out, query_block, dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
