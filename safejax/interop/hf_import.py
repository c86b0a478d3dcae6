"""`safejax import`: a local Hugging Face Llama-architecture folder as a safejax training workdir.

    RUN/config.gin             a complete LM config (lm/base.gin + the model's DecoderConfig, the
                               imported tokenizer as the data's vocabulary, SEQ_LEN = the context)
    RUN/vocab/                 the tokenizer: tokenizer.json + tokenizer_config.json, or tokenizer.model
    RUN/checkpoints/0          step 0 through the project's Checkpointer: the imported params, a
                               fresh optimizer state and a full CheckpointRecord

so that `safejax train --gin_file=RUN/config.gin --workdir=RUN` continues it and `sample`,
`serve` and the evaluations read it. With `add_harm_tag`, the reserved tokens (harm tag, role
markers) that the tokenizer lacks are added as new special ids at its end; the embedding (and an
untied head) grow to match and every new row starts as the mean of the tokenizer's existing rows:
a new token starts as an average token, so its logits start near the average and training
moves it from there, rather than from a random direction of another scale.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import tokenizers
from safetensors import SafetensorError
from safetensors.numpy import load_file

from safejax import config, errors
from safejax import vocab as vocab_lib
from safejax.interop import hf_tokenizer, llama_layout
from safejax.models.decoder import DecoderConfig
from safejax.train.checkpoint import Checkpointer, CheckpointRecord

INDEX = "model.safetensors.index.json"


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise errors.UserError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise errors.UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors, or of the shards its index names."""
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not files:
            raise errors.UserError(f"{index}: weight_map names no files")
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise errors.UserError(f"{hf_dir} has neither model.safetensors nor {INDEX} (only safetensors are read)")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(os.path.join(hf_dir, name)))
        except (OSError, SafetensorError) as e:
            raise errors.UserError(f"cannot read {os.path.join(hf_dir, name)}: {' '.join(str(e).split())}") from None
    return tensors


def _copy_tokenizer(hf_dir: str, vocab_dir: str, add_harm_tag: bool) -> tuple[str, list[str]]:
    """The tokenizer copied into RUN/vocab (with the reserved tokens added if asked); its path
    and the tokens added."""
    os.makedirs(vocab_dir, exist_ok=True)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        path = os.path.join(vocab_dir, "tokenizer.json")
        if os.path.isfile(os.path.join(hf_dir, hf_tokenizer.TOKENIZER_CONFIG)):  # it names the eos token
            shutil.copyfile(os.path.join(hf_dir, hf_tokenizer.TOKENIZER_CONFIG),
                            os.path.join(vocab_dir, hf_tokenizer.TOKENIZER_CONFIG))
        tok = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
        missing = [t for t in vocab_lib.RESERVED_TOKENS if tok.token_to_id(t) is None] if add_harm_tag else []
        if missing:
            tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        tok.save(path)
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):  # SentencePiece: our own vocabulary format
        path = os.path.join(vocab_dir, "tokenizer.model")
        before = vocab_lib.load_vocabulary(os.path.join(hf_dir, "tokenizer.model")).vocab_size
        if add_harm_tag:
            vocab_lib.add_reserved_tokens(os.path.join(hf_dir, "tokenizer.model"), path)
        else:
            shutil.copyfile(os.path.join(hf_dir, "tokenizer.model"), path)
        sp = vocab_lib.load_vocabulary(path).tokenizer
        missing = [sp.id_to_piece(i) for i in range(before, sp.get_piece_size())]
    else:
        raise errors.UserError(f"{hf_dir} has neither tokenizer.json nor tokenizer.model")
    return path, missing


def _grow_rows(table: np.ndarray, vocab_size: int, first_new: int) -> np.ndarray:
    """`table` with `vocab_size` rows; rows from `first_new` on (new tokens) are the mean of the
    rows before it."""
    grown = np.zeros((max(vocab_size, table.shape[0]), table.shape[1]), table.dtype)
    grown[: table.shape[0]] = table
    grown[first_new:] = table[:first_new].mean(axis=0, dtype=np.float64).astype(table.dtype)
    return grown


def _config_gin(fields: dict, dtype: str, vocab_path: str, context: int) -> str:
    lines = ["# Written by `safejax import`: the imported model, its tokenizer as the data's vocabulary.",
             "include 'lm/base.gin'", "", f"SEQ_LEN = {context}", ""]
    lines += [f"DecoderConfig.{k} = {v!r}" for k, v in fields.items()]
    lines += [f"DecoderConfig.dtype = {dtype!r}", f"jsonl_lm_task.vocab_path = {vocab_path!r}", ""]
    return "\n".join(lines)


def import_hf(hf_dir: str, workdir: str, *, add_harm_tag: bool = False) -> dict:
    """Makes WORKDIR (new or empty) from the HF folder; a summary."""
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise errors.UserError(f"import: {workdir} exists and is not an empty directory")
    config_path = os.path.join(hf_dir, "config.json")
    hf = _read_json(config_path)
    fields = llama_layout.decoder_fields(hf, config_path)
    cfg = DecoderConfig(**fields)
    params = llama_layout.from_hf(read_tensors(hf_dir), cfg, hf_dir)  # every check before writing anything

    workdir = os.path.abspath(workdir)
    vocab_path, added = _copy_tokenizer(hf_dir, os.path.join(workdir, "vocab"), add_harm_tag)
    vocabulary = vocab_lib.load_vocabulary(vocab_path)
    if added:
        first_new = vocabulary.vocab_size - len(added)
        fields["vocab_size"] = max(cfg.vocab_size, vocabulary.vocab_size)
        params["embed"]["table"] = _grow_rows(params["embed"]["table"], fields["vocab_size"], first_new)
        if "lm_head" in params:
            params["lm_head"]["table"] = _grow_rows(params["lm_head"]["table"], fields["vocab_size"], first_new)
    dtype = "float32" if hf.get("torch_dtype", hf.get("dtype")) == "float32" else "bfloat16"
    context = int(hf.get("max_position_embeddings") or 2048)
    gin_path = os.path.join(workdir, "config.gin")
    with open(gin_path, "w", encoding="utf-8") as f:
        f.write(_config_gin(fields, dtype, vocab_path, context))
    step = _save_step0(gin_path, workdir, params)
    return {"workdir": workdir, "step": step, "config": gin_path, "vocabulary": vocab_path,
            "vocab_size": fields["vocab_size"], "added_tokens": added,
            "reserved_ids": vocab_lib.describe(vocabulary)["reserved_ids"]}


def _save_step0(gin_path: str, workdir: str, params: dict) -> int:
    """Step 0 of WORKDIR: the params, the optimizer's initial state, the record `fit` resumes from."""
    from safejax.train import pretrain

    config.parse([gin_path], [])
    trainer, _, _ = pretrain.build_trainer()
    shardings = trainer.state_shardings
    params = jax.device_put(jax.tree.map(np.asarray, params), shardings["params"])
    state = {"params": params, "opt_state": jax.jit(trainer.tx.init, out_shardings=shardings["opt_state"])(params),
             "step": jax.device_put(np.zeros((), np.int32), shardings["step"]),
             "nonfinite_steps": jax.device_put(np.zeros((), np.int32), shardings["nonfinite_steps"])}
    objective = trainer.objective
    record = CheckpointRecord(step=0, data_position=0, objective=objective.name,
                              fingerprint=objective.fingerprint(), **objective.checkpoint_fields())
    with Checkpointer(workdir, asynchronous=False) as checkpointer:
        checkpointer.save(0, state, record, force=True)
        checkpointer.wait()
    return 0
