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
moves it from there, rather than from a random direction of another scale. With `named`
(`--harm_tag`, `--role_markers`, or what an export recorded in config.json) the tokenizer's own
special tokens stand for ours instead, refused when absent or producible from raw text.

A tokenizer whose id 0 is a real token (SmolLM2's eos, Llama 3's "!") would lose it to seqio's
padding, so its row moves to a new last row and the vocabulary sees the token there
(interop/hf_tokenizer.py); our row 0 is padding, started as a new token's. Export moves it
back, so import then export gives the original tensors and tokenizer bit for bit. A
SentencePiece tokenizer.model cannot be remapped that way and is refused instead.
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


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)


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


def _named_tokens(hf: dict, config_path: str, named: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Reserved token -> (the tokenizer's token standing for it, where it was named): the flags'
    (`named`), else what an export recorded in config.json (safejax.reserved_tokens)."""
    recorded = (hf.get("safejax") or {}).get("reserved_tokens") or {}
    if not isinstance(recorded, dict) or set(recorded) - set(vocab_lib.RESERVED_TOKENS):
        raise errors.UserError(f"{config_path}: safejax.reserved_tokens must map reserved tokens to token texts")
    where = f"{config_path}: safejax.reserved_tokens"
    out = {token: (text, where) for token, text in recorded.items() if text != token}
    flags = {vocab_lib.HARM_TAG: "--harm_tag", **dict.fromkeys(vocab_lib.ROLE_MARKERS, "--role_markers")}
    out.update({token: (text, f"import {flags[token]}") for token, text in named.items()})
    return out


def _copy_tokenizer_json(hf_dir: str, vocab_dir: str, add_harm_tag: bool, named: dict[str, tuple[str, str]],
                         model_rows: int) -> tuple[str, list[str]]:
    """tokenizer.json and tokenizer_config.json into RUN/vocab: the named tokens checked and
    recorded, the missing reserved tokens added if asked, a real id 0 moved past every row."""
    tok = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    for text, where in named.values():
        hf_tokenizer.reserved_token_id(tok, text, where)
        if [t for t, _ in named.values()].count(text) > 1:
            raise errors.UserError(f"{where}: {text!r} is named for more than one reserved token")
    missing = [t for t in vocab_lib.RESERVED_TOKENS if t not in named and tok.token_to_id(t) is None]
    if named and missing and not add_harm_tag:
        raise errors.UserError(f"import: the tokenizer has no {', '.join(missing)}; add --add_harm_tag to add them "
                               "(or --harm_tag/--role_markers to name its own)")
    missing = missing if add_harm_tag else []
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
    _, settings = hf_tokenizer.read_config(os.path.join(hf_dir, "tokenizer.json"))
    settings.pop("safejax", None)  # what we record is decided here, never inherited
    recorded = {"reserved_tokens": {token: text for token, (text, _) in named.items()}} if named else {}
    path = os.path.join(vocab_dir, "tokenizer.json")
    config_path = os.path.join(vocab_dir, hf_tokenizer.TOKENIZER_CONFIG)
    os.makedirs(vocab_dir, exist_ok=True)
    tok.save(path)
    _write_json(config_path, {**settings, **({"safejax": recorded} if recorded else {})})
    if not hf_tokenizer.TokenizerJsonVocabulary(path).id_0_is_padding():
        # past the model's rows too, so that export gives every original row back
        recorded["id_0_moved_to"] = max(model_rows, tok.get_vocab_size(with_added_tokens=True))
        _write_json(config_path, {**settings, "safejax": recorded})
    return path, missing


def _copy_sentencepiece(hf_dir: str, vocab_dir: str, add_harm_tag: bool, named: dict) -> tuple[str, list[str]]:
    """tokenizer.model into RUN/vocab (with the reserved tokens added if asked); refused when its
    id 0 is something text produces, which seqio would take for padding."""
    source = os.path.join(hf_dir, "tokenizer.model")
    if named:
        _, where = next(iter(named.values()))
        raise errors.UserError(f"{where}: naming the tokenizer's own tokens needs a tokenizer.json ({hf_dir} has a "
                               "tokenizer.model); use --add_harm_tag")
    sp = vocab_lib.load_vocabulary(source).tokenizer
    byte_fallback = any(sp.is_byte(i) for i in range(sp.get_piece_size()))
    if sp.eos_id() == 0 or not (sp.is_control(0) or (sp.is_unknown(0) and byte_fallback)):
        raise errors.UserError(f"{source}: id 0 is {sp.id_to_piece(0)!r}, a token text or the eos produce, which "
                               "seqio takes for padding (no loss, wrong packing); import the tokenizer.json of this "
                               "tokenizer instead, whose id 0 safejax moves")
    path = os.path.join(vocab_dir, "tokenizer.model")
    os.makedirs(vocab_dir, exist_ok=True)
    if add_harm_tag:
        vocab_lib.add_reserved_tokens(source, path)
    else:
        shutil.copyfile(source, path)
    added = vocab_lib.load_vocabulary(path).tokenizer
    return path, [added.id_to_piece(i) for i in range(sp.get_piece_size(), added.get_piece_size())]


def _mean_row(table: np.ndarray, rows: int) -> np.ndarray:
    """The mean of the first `rows` rows (the tokenizer's own tokens): where new rows start."""
    return table[:rows].mean(axis=0, dtype=np.float64).astype(table.dtype)


def _config_gin(fields: dict, dtype: str, vocab_path: str, context: int) -> str:
    lines = ["# Written by `safejax import`: the imported model, its tokenizer as the data's vocabulary.",
             "include 'lm/base.gin'", "", f"SEQ_LEN = {context}", ""]
    lines += [f"DecoderConfig.{k} = {v!r}" for k, v in fields.items()]
    lines += [f"DecoderConfig.dtype = {dtype!r}", f"jsonl_lm_task.vocab_path = {vocab_path!r}", ""]
    return "\n".join(lines)


def import_hf(hf_dir: str, workdir: str, *, add_harm_tag: bool = False, named: dict[str, str] | None = None) -> dict:
    """Makes WORKDIR (new or empty) from the HF folder; a summary. `named`: reserved token -> the
    tokenizer's own special token to use for it (`--harm_tag`, `--role_markers`). A failed import
    leaves WORKDIR as it found it."""
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise errors.UserError(f"import: {workdir} exists and is not an empty directory")
    config_path = os.path.join(hf_dir, "config.json")
    hf = _read_json(config_path)
    fields = llama_layout.decoder_fields(hf, config_path)
    cfg = DecoderConfig(**fields)
    params = llama_layout.from_hf(read_tensors(hf_dir), cfg, hf_dir)  # every check before writing anything
    named = _named_tokens(hf, config_path, named or {})
    existed, workdir = os.path.exists(workdir), os.path.abspath(workdir)
    try:
        return _write_workdir(hf_dir, workdir, hf, fields, params, add_harm_tag, named)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        if existed:
            os.makedirs(workdir)
        raise


def _write_workdir(hf_dir: str, workdir: str, hf: dict, fields: dict, params: dict, add_harm_tag: bool,
                   named: dict) -> dict:
    vocab_dir = os.path.join(workdir, "vocab")
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        vocab_path, added = _copy_tokenizer_json(hf_dir, vocab_dir, add_harm_tag, named, fields["vocab_size"])
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):  # SentencePiece: our own vocabulary format
        vocab_path, added = _copy_sentencepiece(hf_dir, vocab_dir, add_harm_tag, named)
    else:
        raise errors.UserError(f"{hf_dir} has neither tokenizer.json nor tokenizer.model")
    vocabulary = vocab_lib.load_vocabulary(vocab_path)
    moved = getattr(vocabulary, "id_0_moved_to", None)
    first_new = vocabulary.vocab_size - len(added) - (moved is not None)  # the tokenizer's own tokens
    rows = max(fields["vocab_size"], first_new + len(added))
    for module in ("embed", "lm_head")[: 1 + ("lm_head" in params)]:
        table = params[module]["table"]
        if added:  # new tokens start as an average token
            table = np.concatenate([table, np.zeros((rows - table.shape[0], table.shape[1]), table.dtype)])
            table[first_new:] = _mean_row(table, first_new)
        if moved is not None:  # and so does our padding row
            table = llama_layout.move_id_0_in(table, _mean_row(table, first_new))
        params[module]["table"] = table
    fields["vocab_size"] = rows + (moved is not None)
    dtype = "float32" if hf.get("torch_dtype", hf.get("dtype")) == "float32" else "bfloat16"
    context = int(hf.get("max_position_embeddings") or 2048)
    gin_path = os.path.join(workdir, "config.gin")
    with open(gin_path, "w", encoding="utf-8") as f:
        f.write(_config_gin(fields, dtype, vocab_path, context))
    step = _save_step0(gin_path, workdir, params)
    return {"workdir": workdir, "step": step, "config": gin_path, "vocabulary": vocab_path,
            "vocab_size": fields["vocab_size"], "added_tokens": added, "id_0_moved_to": moved,
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
