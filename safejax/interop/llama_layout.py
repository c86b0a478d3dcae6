"""The one map between our decoder and Hugging Face's LlamaForCausalLM: config fields and tensors.

Our decoder computes what HF Llama computes: pre-norm RMSNorm blocks (eps inside the rsqrt, fp32),
RoPE in the split-halves layout (HF's rotate_half, so no q/k permutation), queries scaled by
head_dim ** -0.5, SwiGLU down(silu(gate(x)) * up(x)), no biases, no embedding scaling, no logit
soft-capping. Only the tensor layouts differ: we keep kernels input-major with heads as their own
axis ((d_model, heads, head_dim)); HF keeps torch Linear weights, (out_features, in_features).
Settings that would change the computation (rope scaling, biases, sliding windows, other
activations, another model_type) are refused with the field named, never approximated.
"""

from __future__ import annotations

import numpy as np

from safejax import errors
from safejax.models.decoder import DecoderConfig

ARCHITECTURE = "LlamaForCausalLM"
# config.json fields that do not change the computation (bookkeeping, generation, ids).
HARMLESS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "attention_dropout",
    "max_position_embeddings", "is_llama_config", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tie_word_embeddings", "safejax",
}
# Fields checked one by one: name -> the only value (or values) we compute exactly.
MUST_BE = {
    "hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,), "rope_scaling": (None,),
    "pretraining_tp": (1,), "rope_interleaved": (False,), "sliding_window": (None,),
    "use_sliding_window": (False,), "logit_softcapping": (None,), "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,), "layer_types": (None,),
}
SHAPES = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters"}


def decoder_fields(hf: dict, path: str) -> dict:
    """DecoderConfig fields of a HF config.json (as a dict); a one-line UserError naming the
    first field we do not compute exactly."""
    def refuse(field, why):
        raise errors.UserError(f"{path}: {field} {why}; safejax imports plain Llama-architecture models only")

    if hf.get("model_type") != "llama":
        refuse("model_type", f"is {hf.get('model_type')!r}, not 'llama'")
    if ARCHITECTURE not in (hf.get("architectures") or [ARCHITECTURE]):
        refuse("architectures", f"is {hf.get('architectures')!r}, not [{ARCHITECTURE!r}]")
    for field, allowed in MUST_BE.items():
        if field in hf and hf[field] not in allowed:
            refuse(field, f"is {hf[field]!r} (supported: {', '.join(map(repr, allowed))})")
    unknown = sorted(set(hf) - HARMLESS - set(MUST_BE) - SHAPES)
    if unknown:
        refuse(unknown[0], "is a field safejax does not know")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        refuse("rope_parameters", f"is {rope!r} (supported: the default rope_type, no scaling)")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            refuse(field, f"must be a positive integer, got {hf.get(field)!r}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    kv = hf.get("num_key_value_heads") or heads
    if heads % kv:
        refuse("num_key_value_heads", f"({kv}) does not divide num_attention_heads ({heads})")
    return {
        "vocab_size": hf["vocab_size"], "num_layers": hf["num_hidden_layers"], "d_model": hf["hidden_size"],
        "num_heads": heads, "num_kv_heads": kv if kv != heads else 0,
        "head_dim": head_dim if head_dim * heads != hf["hidden_size"] else 0,
        "mlp_dim": hf["intermediate_size"], "rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def hf_config(cfg: DecoderConfig, vocab_size: int, context: int, eos_id: int, bos_id: int | None,
              pad_id: int | None) -> dict:
    """config.json of LlamaForCausalLM for our decoder (fp32 weights; `vocab_size` rows, one fewer
    than ours where the tokenizer's id 0 was moved)."""
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "hidden_act": "silu", "max_position_embeddings": context, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "torch_dtype": "float32",
        "use_cache": True,
    }


def _block_tensors(i: int) -> dict[str, tuple[tuple[str, str], str]]:
    """HF name -> ((our module, our param), how it is laid out)."""
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (("attn_norm", "scale"), "vector"),
            p + "self_attn.q_proj.weight": (("attn", "wq"), "in_heads"),
            p + "self_attn.k_proj.weight": (("attn", "wk"), "in_heads"),
            p + "self_attn.v_proj.weight": (("attn", "wv"), "in_heads"),
            p + "self_attn.o_proj.weight": (("attn", "wo"), "heads_out"),
            p + "post_attention_layernorm.weight": (("mlp_norm", "scale"), "vector"),
            p + "mlp.gate_proj.weight": (("mlp", "gate"), "matrix"),
            p + "mlp.up_proj.weight": (("mlp", "up"), "matrix"),
            p + "mlp.down_proj.weight": (("mlp", "down"), "matrix")}


def move_id_0_in(table: np.ndarray, padding_row: np.ndarray) -> np.ndarray:
    """HF vocabulary rows as ours when the tokenizer's id 0 is a real token (interop/hf_tokenizer.py):
    its row goes to a new last id, row 0 (our padding) becomes `padding_row`."""
    out = np.concatenate([table, table[:1]])
    out[0] = padding_row
    return out


def move_id_0_out(table: np.ndarray, moved_to: int, where: str) -> np.ndarray:
    """The inverse of move_id_0_in: the last row back to id 0, our padding row dropped."""
    if table.shape[0] != moved_to + 1:
        raise errors.UserError(f"{where}: the vocabulary moved id 0 to {moved_to} but the model has "
                               f"{table.shape[0]} rows, not {moved_to + 1}")
    return np.concatenate([table[moved_to:], table[1:moved_to]])


def to_hf(params: dict, cfg: DecoderConfig, id_0_moved_to: int | None = None, where: str = "") -> dict[str, np.ndarray]:
    """Our params (nnx pure dict of numpy arrays) as HF state-dict tensors (a moved id 0 moved back)."""
    out = {"model.embed_tokens.weight": params["embed"]["table"], "model.norm.weight": params["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["table"]
    if id_0_moved_to is not None:
        for name in ("model.embed_tokens.weight", "lm_head.weight")[: 1 + (not cfg.tie_embeddings)]:
            out[name] = move_id_0_out(out[name], id_0_moved_to, where)
    for i in range(cfg.num_layers):
        for name, ((module, param), layout) in _block_tensors(i).items():
            w = params["blocks"][i][module][param]
            if layout == "in_heads":  # (d, heads, head_dim) -> (heads * head_dim, d)
                w = w.reshape(w.shape[0], -1).T
            elif layout == "heads_out":  # (heads, head_dim, d) -> (d, heads * head_dim)
                w = w.reshape(-1, w.shape[-1]).T
            elif layout == "matrix":
                w = w.T
            out[name] = w
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf(tensors: dict[str, np.ndarray], cfg: DecoderConfig, path: str) -> dict:
    """HF state-dict tensors as our params (nnx pure dict, float32); a UserError naming a tensor
    that is missing, unexpected or of the wrong shape."""
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    expected = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        expected["lm_head.weight"] = (cfg.vocab_size, d)
    shapes = {"input_layernorm": (d,), "post_attention_layernorm": (d,), "q_proj": (h * hd, d),
              "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, h * hd),
              "gate_proj": (cfg.mlp_dim, d), "up_proj": (cfg.mlp_dim, d), "down_proj": (d, cfg.mlp_dim)}
    for i in range(cfg.num_layers):
        for name in _block_tensors(i):
            expected[name] = shapes[name.split(".")[-2]]
    ignorable = {k for k in tensors if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise errors.UserError(f"{path}: lm_head.weight differs from model.embed_tokens.weight but "
                                   "tie_word_embeddings is true")
        ignorable.add("lm_head.weight")
    for name in sorted(set(tensors) - set(expected) - ignorable):
        raise errors.UserError(f"{path}: unexpected tensor {name} (biases and other layers are not supported)")
    for name, shape in expected.items():
        if name not in tensors:
            raise errors.UserError(f"{path}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise errors.UserError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, config.json "
                                   f"says {shape}")
    f32 = {k: np.asarray(tensors[k], np.float32) for k in expected}
    params = {"embed": {"table": f32["model.embed_tokens.weight"]}, "final_norm": {"scale": f32["model.norm.weight"]},
              "blocks": {i: {} for i in range(cfg.num_layers)}}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"table": f32["lm_head.weight"]}
    for i in range(cfg.num_layers):
        for name, ((module, param), layout) in _block_tensors(i).items():
            w = f32[name]
            if layout == "in_heads":
                w = w.T.reshape(d, -1, hd)
            elif layout == "heads_out":
                w = w.T.reshape(h, hd, d)
            elif layout == "matrix":
                w = w.T
            params["blocks"][i].setdefault(module, {})[param] = np.ascontiguousarray(w)
    return params
