"""The decoder's behaviour: causality, packed-document isolation, GQA, parameter naming and counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safejax.models.decoder import Decoder, DecoderConfig, count_params
from safejax import errors
from safejax.models import attention
from safejax.models.layers import gated_silu, rope_tables

CFG = DecoderConfig(vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                    mlp_dim=128, dtype="float32")


def _model(cfg=CFG, seed=0):
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def test_logits_shape_and_dtype():
    tokens = jnp.ones((2, 16), jnp.int32)
    logits = _model()(tokens)
    assert logits.shape == (2, 16, CFG.vocab_size)
    assert logits.dtype == jnp.float32


def test_causal_future_tokens_do_not_change_past_logits():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, CFG.vocab_size, size=(1, 12))
    changed = tokens.copy()
    changed[0, 8:] = rng.integers(4, CFG.vocab_size, size=4)
    model = _model()
    a, b = model(jnp.asarray(tokens)), model(jnp.asarray(changed))
    np.testing.assert_allclose(a[0, :8], b[0, :8], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[0, 8:], b[0, 8:])


def test_packed_documents_do_not_see_each_other():
    """A document packed after another gives the same logits as the document alone."""
    rng = np.random.default_rng(1)
    first, second = rng.integers(4, CFG.vocab_size, size=7), rng.integers(4, CFG.vocab_size, size=5)
    packed = np.concatenate([first, second])[None]
    segments = np.array([[1] * 7 + [2] * 5])
    positions = np.array([list(range(7)) + list(range(5))])
    model = _model()
    together = model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
    alone = model(jnp.asarray(second[None]))
    np.testing.assert_allclose(together[0, 7:], alone[0], rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv():
    """GQA with K/V heads shared by query groups == MHA whose K/V heads are those copies."""
    gqa = _model()
    mha_cfg = DecoderConfig(**{**CFG.__dict__, "num_kv_heads": 0})
    mha = _model(mha_cfg, seed=1)
    groups = CFG.num_heads // CFG.kv_heads
    for g_block, m_block in zip(gqa.blocks, mha.blocks):
        for name in ("wq", "wo"):
            getattr(m_block.attn, name)[...] = getattr(g_block.attn, name)[...]
        for name in ("wk", "wv"):
            getattr(m_block.attn, name)[...] = jnp.repeat(getattr(g_block.attn, name)[...], groups, axis=1)
        m_block.mlp, m_block.attn_norm, m_block.mlp_norm = g_block.mlp, g_block.attn_norm, g_block.mlp_norm
    mha.embed, mha.final_norm = gqa.embed, gqa.final_norm
    tokens = jnp.asarray(np.random.default_rng(2).integers(4, CFG.vocab_size, size=(2, 10)))
    np.testing.assert_allclose(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_every_parameter_has_logical_axes_matching_its_rank():
    state = nnx.state(_model())
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables
    for v in variables:
        axes = v.get_metadata()["logical_axes"]
        assert len(axes) == v[...].ndim


@pytest.mark.parametrize("tie", [True, False])
def test_param_count_matches_config_formula(tie):
    cfg = DecoderConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    state = nnx.state(_model(cfg))
    actual = sum(x.size for x in jax.tree.leaves(state))
    assert actual == count_params(cfg)["total"]


def test_rope_base_changes_the_function():
    tokens = jnp.asarray(np.random.default_rng(3).integers(4, CFG.vocab_size, size=(1, 10)))
    a = _model(CFG)(tokens)
    b = _model(DecoderConfig(**{**CFG.__dict__, "rope_base": 500.0}))(tokens)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_does_not_change_gradients(policy):
    tokens = jnp.asarray(np.random.default_rng(4).integers(4, CFG.vocab_size, size=(2, 8)))

    def grads(cfg):
        model = _model(cfg)
        graphdef, params = nnx.split(model)
        loss = lambda p: nnx.merge(graphdef, p)(tokens).mean()  # noqa: E731
        return jax.tree.leaves(jax.grad(loss)(params))

    plain = grads(CFG)
    remat = grads(DecoderConfig(**{**CFG.__dict__, "remat": policy}))
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="remat"):
        DecoderConfig(remat="sometimes")
    with pytest.raises(ValueError, match="divisible"):
        DecoderConfig(d_model=100, num_heads=3)


def test_blockwise_causal_attention_equals_one_block():
    tokens = jnp.asarray(np.random.default_rng(5).integers(4, CFG.vocab_size, size=(2, 24)))
    segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24])
    positions = jnp.asarray([list(range(10)) + list(range(14)), list(range(24))])
    whole = _model(DecoderConfig(**{**CFG.__dict__, "query_block": 0}))(tokens, positions, segments)
    for block in (5, 8, 16):
        blocked = _model(DecoderConfig(**{**CFG.__dict__, "query_block": block}))(tokens, positions, segments)
        np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5)


def _plain_attention(q, k, v, segments):
    """Reference: one masked softmax over the full score matrix (same segment, not in the future)."""
    t = q.shape[3]
    allowed = np.tril(np.ones((t, t), bool))[None] & (segments[:, :, None] == segments[:, None, :])
    scores = jnp.where(allowed[:, None, None], jnp.einsum("bkgth,bksh->bkgts", q, k), -1e30)
    return jnp.einsum("bkgts,bksh->bkgth", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("kernel,query_block,t", [("blockwise", 0, 12), ("blockwise", 5, 12), ("blockwise", 8, 12),
                                                  ("blockwise", 16, 12), ("dot_product", 0, 12), ("splash", 0, 128)])
def test_causal_attention_and_its_gradients_match_a_plain_masked_softmax(kernel, query_block, t):
    """Every kernel that runs on a CPU (splash in Pallas' interpreter), blocks of queries and the
    hand-written backward pass change nothing, with GQA groups, packed documents and padding."""
    rng = np.random.default_rng(6)
    b, kv, g, h = 2, 2, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((b, kv, g, t, h), (b, kv, t, h), (b, kv, t, h)))
    cut = t * 5 // 12
    segments = np.array([[1] * cut + [2] * (t - 2 * (t // 6) - cut) + [0] * (2 * (t // 6)), [1] * t])
    weights = jnp.asarray(rng.normal(size=(b, kv, g, t, h)), jnp.float32)

    def ours(q, k, v):
        return attention.causal_attention(q, k, v, jnp.asarray(segments), kernel=kernel, query_block=query_block,
                                          dtype=jnp.float32)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * weights).sum()

    np.testing.assert_allclose(ours(q, k, v), _plain_attention(q, k, v, segments), rtol=1e-5, atol=1e-5)
    expected = jax.grad(loss(lambda *a: _plain_attention(*a, segments)), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_splash_under_shard_map_on_the_mesh_matches_blockwise():
    """On a (data 2, fsdp 2, tensor 2) mesh the splash kernel runs per device on its rows and K/V heads."""
    from safejax import parallel

    rules = (("batch", ("data", "fsdp")), ("kv_heads", "tensor"), ("heads", "tensor"))
    mesh = parallel.build_mesh((2, 2, 2))
    rng = np.random.default_rng(8)
    b, kv, g, t, h = 4, 2, 2, 128, 8
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((b, kv, g, t, h), (b, kv, t, h), (b, kv, t, h)))
    segments = jnp.asarray(np.repeat(np.arange(1, 5), 32)[None].repeat(b, 0))

    def run(kernel):
        with parallel.using(mesh, rules), jax.set_mesh(mesh):
            return jax.jit(lambda *a: attention.causal_attention(*a, kernel=kernel, query_block=0,
                                                                 dtype=jnp.float32))(q, k, v, segments)

    np.testing.assert_allclose(run("splash"), run("blockwise"), rtol=1e-5, atol=1e-5)


def test_auto_picks_the_kernel_of_each_platform():
    assert attention.resolve("auto", "cpu") == "blockwise"
    assert attention.resolve("auto", "gpu", "bfloat16") == "cudnn"
    assert attention.resolve("auto", "gpu", "float32") == "dot_product"  # cuDNN's flash kernel is bf16/fp16 only
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("dot_product", "tpu") == "dot_product"
    with pytest.raises(errors.UserError, match="'cudnn' needs a GPU"):
        attention.resolve("cudnn", "cpu")
    with pytest.raises(errors.UserError, match="DecoderConfig.attention must be one of"):
        DecoderConfig(attention="flash")


def test_the_decoder_gives_the_same_logits_with_every_cpu_kernel():
    tokens = jnp.asarray(np.random.default_rng(7).integers(4, CFG.vocab_size, size=(2, 24)))
    segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24])
    positions = jnp.asarray([list(range(10)) + list(range(14)), list(range(24))])
    base = _model(DecoderConfig(**{**CFG.__dict__, "attention": "blockwise"}))(tokens, positions, segments)
    plain = _model(DecoderConfig(**{**CFG.__dict__, "attention": "dot_product"}))(tokens, positions, segments)
    np.testing.assert_allclose(plain, base, rtol=1e-5, atol=1e-5)


def test_rope_tables_match_sin_and_cos_of_the_fp32_angles():
    positions = jnp.asarray([[0, 1, 2, 7], [3, 0, 1, 2]])
    sin, cos = rope_tables(positions, 8, 10000.0, max_position=8)
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(4, dtype=jnp.float32) / 4))
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
    assert sin.shape == cos.shape == (2, 4, 1, 4)
    np.testing.assert_allclose(sin, jnp.sin(angles), atol=1e-6)
    np.testing.assert_allclose(cos, jnp.cos(angles), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_silu_and_its_gradients_match_autodiff(dtype):
    rng = np.random.default_rng(7)
    gate, up, weights = (jnp.asarray(rng.normal(scale=3.0, size=(3, 5, 16)), dtype) for _ in range(3))

    def loss(fn):
        return lambda g, u: (fn(g, u).astype(jnp.float32) * weights.astype(jnp.float32)).sum()

    plain = lambda g, u: (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(dtype)  # noqa: E731
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(gated_silu(gate, up).astype(jnp.float32), plain(gate, up).astype(jnp.float32),
                               rtol=tol, atol=tol)
    expected = jax.grad(loss(plain), argnums=(0, 1))(gate, up)
    for got, want in zip(jax.jit(jax.grad(loss(gated_silu), argnums=(0, 1)))(gate, up), expected):
        assert got.dtype == dtype
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), rtol=tol, atol=tol)
