"""`safejax export`: a training checkpoint as a Hugging Face folder that transformers loads with
no custom code (LlamaForCausalLM, the fast tokenizer, our chat template).

    DIR/config.json                    LlamaForCausalLM; "safejax" holds the harm tag's text and id,
                                       each reserved token's (import reads them back)
    DIR/model.safetensors              fp32 weights, as trained (or model-0000i-of-0000n.safetensors
                                       + model.safetensors.index.json above max_shard_bytes)
    DIR/generation_config.json         greedy; stops at end of sequence and end of turn
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json   (interop/hf_tokenizer_files.py)

The checkpoint is opened the way inference opens it (inference/checkpoint.load: record, shapes,
vocabulary checked by content hash).
"""

from __future__ import annotations

import json
import os

import gin
import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from safejax import errors
from safejax import vocab as vocab_lib
from safejax.data import dialogue
from safejax.inference import checkpoint
from safejax.interop import hf_tokenizer_files, llama_layout

INDEX = "model.safetensors.index.json"


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Tensors in name order, cut into groups under max_shard_bytes (a bigger tensor alone)."""
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensors[name], size + nbytes
    return [*shards, current] if current else shards


def write_weights(tensors: dict[str, np.ndarray], output: str, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards and their index; returns the files written."""
    shards = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers reads the arrays as torch tensors
    if len(shards) == 1:
        save_file(shards[0], os.path.join(output, "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(output, name), metadata=metadata)
        names.append(name)
        weight_map.update({tensor: name for tensor in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(output, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return [*names, INDEX]


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)


@gin.configurable
def export(workdir: str, output: str, step: int | None = None, *, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Writes the export of `step` (default: the latest) into `output` (new or empty); a summary."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise errors.UserError(f"export: {output} exists and is not an empty directory")
    if max_shard_bytes <= 0:
        raise errors.UserError(f"export.max_shard_bytes must be positive, got {max_shard_bytes}")
    loaded = checkpoint.load(workdir, step)
    params = jax.device_get(nnx.state(loaded.model, nnx.Param).to_pure_dict())
    moved = getattr(loaded.vocabulary, "id_0_moved_to", None)  # an imported tokenizer.json's (hf_tokenizer.py)
    tensors = llama_layout.to_hf(params, loaded.config, moved, f"{workdir} step {loaded.step}")
    reserved = hf_tokenizer_files.exported_reserved(loaded.vocabulary, loaded.reserved)
    os.makedirs(output, exist_ok=True)
    ids = hf_tokenizer_files.write(loaded.vocabulary, reserved, loaded.context, output)
    files = write_weights(tensors, output, max_shard_bytes)
    hf = llama_layout.hf_config(loaded.config, len(tensors["model.embed_tokens.weight"]), loaded.context,
                                ids["eos_token_id"], ids["bos_token_id"], ids["pad_token_id"])
    harm_tag = reserved.get(vocab_lib.HARM_TAG, (vocab_lib.HARM_TAG, None))
    hf["safejax"] = {"harm_tag": harm_tag[0], "harm_tag_id": harm_tag[1],
                     "reserved_ids": {text: token_id for text, token_id in reserved.values()},
                     "reserved_tokens": {token: text for token, (text, _) in reserved.items()},
                     "checkpoint": os.path.abspath(workdir), "step": loaded.step,
                     "vocabulary_sha256": vocab_lib.describe(loaded.vocabulary)["sha256"]}
    _write_json(os.path.join(output, "config.json"), hf)
    stops = [ids["eos_token_id"], *([reserved[dialogue.END_OF_TURN][1]] if dialogue.END_OF_TURN in reserved else [])]
    _write_json(os.path.join(output, "generation_config.json"),
                {"bos_token_id": ids["bos_token_id"], "eos_token_id": stops, "pad_token_id": ids["pad_token_id"],
                 "do_sample": False, "max_length": loaded.context})
    return {"output": os.path.abspath(output), "step": loaded.step, "files": files,
            "parameters": int(sum(t.size for t in tensors.values())),
            "harm_tag_id": harm_tag[1]}
