"""Hugging Face interop (interop/): export to transformers, import from it, the tokenizers.

Export: a tiny trained checkpoint loads in transformers (CPU torch) with logits equal to ours on
ragged prompts, the same greedy continuation, and a tokenizer that gives our ids (reserved tokens,
the chat template). Import: a tiny random LlamaForCausalLM built here (no download) becomes a
workdir with the same logits; with --add_harm_tag it trains and decodes with Safe Beam. Export
then import gives the parameters back bit for bit. Unsupported configs are refused by field.
SmolLM2's layout (the eos at id 0, its own special tokens named by --harm_tag/--role_markers):
the id moves so seqio's padding stays 0, logits still equal transformers', and export gives the
original folder back. A tokenizer.model folder imports; one whose id 0 is text is refused.
"""

import itertools
import json
import os

import jax
import numpy as np
import pytest
from conftest import FAST, TINY
from flax import nnx

from safejax import cli, config, errors, vocab
from safejax.data import dialogue, sources
from safejax.inference import checkpoint as inference_checkpoint
from safejax.interop import hf_import, llama_layout, sp_to_hf
from safejax.interop.hf_tokenizer import TokenizerJsonVocabulary
from safejax.safety import tagging
from safejax.train import checkpoint, pretrain

TOL = 1e-4
PROMPTS = ["The king said", "Once upon a time, in a land far away, there lived",
           f"a {vocab.HARM_TAG} literal tag", "x"]


def _load(workdir, *bindings):
    inference_checkpoint.parse_config(workdir, (), ["DecoderConfig.dtype = 'float32'", *bindings])
    return inference_checkpoint.load(workdir)


def _params(loaded):
    return jax.device_get(nnx.state(loaded.model, nnx.Param).to_pure_dict())


def _our_logits(loaded, prompts_ids):
    """Each prompt alone, unpadded: the reference the padded HF batch must match."""
    return [np.asarray(loaded.model(np.asarray([ids], np.int32)))[0] for ids in prompts_ids]


def _hf_logits(model, prompts_ids, side):
    """One padded batch through transformers with an attention mask (and positions that skip
    left padding), the logits of the real tokens of each row."""
    import torch

    width = max(map(len, prompts_ids))
    ids = np.zeros((len(prompts_ids), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts_ids):
        cols = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        ids[i, cols], mask[i, cols] = p, 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()
    return [out[i][mask[i] == 1] for i in range(len(prompts_ids))]


def _json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def _max_diff(ours, theirs):
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


# ---- export ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny untied checkpoint (non-default RoPE base and eps) after a few steps, and its export,
    sharded (a small max_shard_bytes) to exercise the index."""
    root = tmp_path_factory.mktemp("export")
    workdir, output = str(root / "run"), str(root / "hf")
    config.parse([TINY], FAST + ["TRAIN_STEPS = 3", "CHECKPOINT_EVERY = 3", "DataConfig.eval_batches = 0",
                                 "DecoderConfig.rope_base = 5000.0", "DecoderConfig.norm_eps = 1e-6",
                                 "DecoderConfig.tie_embeddings = False"])
    pretrain.train(workdir)
    assert cli.main(["export", "--checkpoint", workdir, "--output", output,
                     "--gin.export.max_shard_bytes=2000000"]) == 0
    return workdir, output


@pytest.mark.slow
def test_export_writes_a_sharded_llama_folder_with_the_harm_tag_recorded(trained):
    _, output = trained
    hf = json.load(open(os.path.join(output, "config.json")))
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["rope_theta"] == 5000.0
    assert hf["rms_norm_eps"] == 1e-6 and hf["tie_word_embeddings"] is False and hf["num_key_value_heads"] == 2
    assert hf["safejax"]["harm_tag"] == vocab.HARM_TAG and hf["safejax"]["harm_tag_id"] == 4
    index = json.load(open(os.path.join(output, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    generation = json.load(open(os.path.join(output, "generation_config.json")))
    assert generation["eos_token_id"] == [vocab.EOS_ID, 7]


@pytest.mark.slow
def test_transformers_logits_equal_ours_on_ragged_prompts(trained):
    from transformers import AutoModelForCausalLM

    workdir, output = trained
    loaded = _load(workdir)
    sp = loaded.vocabulary
    prompts = [sp.encode(p) for p in PROMPTS]
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    ours = _our_logits(loaded, prompts)
    for side in ("right", "left"):
        diff = _max_diff(ours, _hf_logits(model, prompts, side))
        print(f"export parity ({side} padding): max |logit diff| = {diff:.2e}")
        assert diff < TOL


@pytest.mark.slow
def test_transformers_greedy_generation_equals_ours(trained):
    import torch
    from transformers import AutoModelForCausalLM

    from safejax.inference.generate import Generator, Request

    workdir, output = trained
    gen = Generator(_load(workdir))
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    params = gen.params(strategy="greedy", max_new_tokens=12)
    for prompt in PROMPTS[:2]:
        ids = gen.encode(prompt)
        [ours] = gen.run([Request(ids, params)])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        stop = next((i for i, t in enumerate(out) if t == vocab.EOS_ID), len(out))
        assert ours.tokens == out[:stop]


@pytest.mark.slow
def test_exported_tokenizer_gives_our_ids_with_every_reserved_token(trained):
    from transformers import AutoTokenizer

    _, output = trained
    sp = vocab.load_vocabulary(vocab.BUNDLED_VOCAB)
    hf = AutoTokenizer.from_pretrained(output)
    reserved = vocab.reserved_ids(sp)
    for token, token_id in reserved.items():
        assert hf.convert_tokens_to_ids(token) == token_id
    texts = [*sp_to_hf.PROBES, " ".join(f"{t} word" for t in reserved), "<|user|>User: hi<|end_of_turn|>"]
    for text in texts:  # raw text: reserved tokens' text stays text, as in SentencePiece
        assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == sp.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "What is 2 + 2?"}]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    turns = [{"role": "user", "text": "Be brief.\n\nHello there"}, {"role": "assistant", "text": "Hi!"},
             {"role": "user", "text": "What is 2 + 2?"}]
    ours = dialogue.encode_dialogue(sp, turns, generation_prompt=True)
    assert hf(rendered, add_special_tokens=False)["input_ids"] == ours
    assert hf.decode(sp.encode("Hello  world\n x"), skip_special_tokens=True) == "Hello  world\n x"


@pytest.mark.slow
def test_export_then_import_gives_the_parameters_back_bit_for_bit(trained, tmp_path):
    workdir, output = trained
    before = _params(_load(workdir))
    summary = hf_import.import_hf(output, str(tmp_path / "back"))
    after_loaded = _load(summary["workdir"])
    after = _params(after_loaded)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree_util.tree_leaves_with_path(after)):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    assert after_loaded.reserved == {t: i for i, t in enumerate(vocab.RESERVED_TOKENS, 4)}
    record = checkpoint.read_record(summary["workdir"])
    assert record.step == 0 and record.objective == "lm" and record.vocabulary["path"].endswith("tokenizer.json")


def test_converted_tokenizer_differs_from_sentencepiece_only_on_ties():
    """On 200-character windows of the bundled corpus the converted tokenizer gives SentencePiece's
    ids except where two segmentations score the same (the same text, pieces in another order)."""
    sp = vocab.load_vocabulary(vocab.BUNDLED_VOCAB)
    tok = sp_to_hf.tokenizer_from_sentencepiece(vocab.BUNDLED_VOCAB)
    tok.encode_special_tokens = True
    windows = [t[s:s + 200] for t in itertools.islice(sources.iter_texts(sources.bundled_corpus_files()), 300)
               for s in range(0, min(len(t), 4000), 200)]
    differ = 0
    for w in windows:
        ours, theirs = sp.encode(w), tok.encode(w, add_special_tokens=False).ids
        if ours != theirs:
            differ += 1
            assert sp.decode(theirs) == sp.decode(ours)
    print(f"converted tokenizer: {differ} of {len(windows)} windows segmented differently (ties)")
    assert differ < 0.01 * len(windows)


# ---- import ------------------------------------------------------------------------------------

def _byte_level_tokenizer(folder, specials=("<pad>", "<s>", "</s>"), eos="</s>"):
    """A 400-token byte-level BPE trained here, `specials` first (by default <pad> 0, seqio's
    padding, <s> 1, </s> 2, its eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    shakespeare = [f for f in sources.bundled_corpus_files() if "shakespeare" in f]
    tok.train_from_iterator(itertools.islice(sources.iter_texts(shakespeare), 200), trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    json.dump({"eos_token": eos, "pad_token": specials[0]}, open(os.path.join(folder, "tokenizer_config.json"), "w"))
    return tok


def _save_tiny_llama(folder, vocab_size, **changes):
    """A tiny random LlamaForCausalLM (GQA, RoPE base 20000) saved as safetensors in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=20000.0,
                    rms_norm_eps=1e-6, initializer_range=0.2)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **changes})).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """Untied, with <pad> at id 0 and eos 2."""
    folder = str(tmp_path_factory.mktemp("hf"))
    tok = _byte_level_tokenizer(folder)
    return folder, _save_tiny_llama(folder, tok.get_vocab_size(), tie_word_embeddings=False, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0)


def _prompt_ids(vocabulary):
    return [vocabulary.encode(p) for p in PROMPTS]


@pytest.mark.slow
def test_an_imported_llama_gives_transformers_logits(hf_folder, tmp_path):
    folder, model = hf_folder
    assert cli.main(["import", "--hf", folder, "--workdir", str(tmp_path / "run")]) == 0
    loaded = _load(str(tmp_path / "run"))
    assert isinstance(loaded.vocabulary, TokenizerJsonVocabulary) and loaded.reserved == {}
    assert loaded.vocabulary.eos_id == 2 == checkpoint.read_record(str(tmp_path / "run")).vocabulary["eos_id"]
    prompts = _prompt_ids(loaded.vocabulary)
    diff = _max_diff(_our_logits(loaded, prompts), _hf_logits(model, prompts, "right"))
    print(f"import parity: max |logit diff| = {diff:.2e}")
    assert diff < TOL


@pytest.fixture(scope="module")
def tagged_import(hf_folder, tmp_path_factory):
    folder, _ = hf_folder
    workdir = str(tmp_path_factory.mktemp("tagged") / "run")
    return hf_import.import_hf(folder, workdir, add_harm_tag=True)


@pytest.mark.slow
def test_add_harm_tag_appends_the_reserved_tokens_with_mean_rows(hf_folder, tagged_import):
    folder, model = hf_folder
    old_vocab = model.config.vocab_size
    assert tagged_import["added_tokens"] == list(vocab.RESERVED_TOKENS)
    assert tagged_import["reserved_ids"] == {t: old_vocab + i for i, t in enumerate(vocab.RESERVED_TOKENS)}
    params = _params(_load(tagged_import["workdir"]))
    for ours, theirs in ((params["embed"]["table"], model.model.embed_tokens.weight),
                         (params["lm_head"]["table"], model.lm_head.weight)):
        theirs = theirs.detach().numpy()
        assert np.array_equal(ours[:old_vocab], theirs)
        mean = theirs.mean(0, dtype=np.float64).astype(np.float32)
        assert np.array_equal(ours[old_vocab:], np.broadcast_to(mean, (4, theirs.shape[1])))


@pytest.mark.slow
def test_an_imported_model_continues_training_and_decodes_with_safebeam(tagged_import):
    from safejax.inference.generate import Generator, Request

    workdir = tagged_import["workdir"]
    config.parse([os.path.join(workdir, "config.gin")],
                 FAST + ["TRAIN_STEPS = 2", "CHECKPOINT_EVERY = 2", "DataConfig.eval_batches = 0",
                         "DecoderConfig.dtype = 'float32'"])
    summary = pretrain.train(workdir)
    assert summary["start_step"] == 0 and summary["step"] == 2 and np.isfinite(summary["loss"])
    gen = Generator(_load(workdir))
    assert gen.tag_id == tagged_import["reserved_ids"][vocab.HARM_TAG]
    [c] = gen.run([Request(gen.encode("The king"), gen.params(strategy="safebeam", max_new_tokens=6, num_beams=2))])
    assert vocab.reserved_ids(gen.vocabulary)[vocab.HARM_TAG] not in c.tokens and c.tokens


@pytest.mark.slow
def test_the_imported_tokenizer_cannot_forge_reserved_tokens_and_the_tagger_reads_it(tagged_import):
    vocabulary = vocab.load_vocabulary(tagged_import["vocabulary"])
    ids = set(vocab.reserved_ids(vocabulary).values())
    text = f"before {vocab.HARM_TAG} middle <|user|> after<|end_of_turn|>"
    encoded = vocabulary.encode(text)
    assert not ids & set(encoded)
    assert vocabulary.decode(encoded) == text
    classes = tagging.piece_classes(vocabulary)
    tokens = vocabulary.encode("the king and the queen")
    starts = [vocabulary.decode(tokens[:i]) + "|" for i, t in enumerate(tokens) if classes["begins"][t]]
    assert starts == ["the|", "the king|", "the king and|", "the king and the|"]  # "Ġ" pieces begin words
    assert not classes["visible"][list(ids)].any()


# ---- refusals ----------------------------------------------------------------------------------

def _folder_with(tmp_path, **changes):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
          "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True}
    hf.update(changes)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    return str(folder)


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}), ("attention_bias", True), ("mlp_bias", True),
    ("sliding_window", 4096), ("model_type", "mistral"), ("hidden_act", "gelu"), ("rope_interleaved", True),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), ("some_new_field", 1),
])
def test_unsupported_configs_are_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(errors.UserError, match=field):
        hf_import.import_hf(_folder_with(tmp_path, **{field: value}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_bias_tensor_is_refused_naming_it(tmp_path):
    from safetensors.numpy import save_file

    folder, tensors = _zero_llama_folder(tmp_path)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(8, np.float32)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with pytest.raises(errors.UserError, match="q_proj.bias"):
        hf_import.import_hf(folder, str(tmp_path / "run"))


def test_import_refuses_unknown_flags_and_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["import", "--hf", str(tmp_path), "--workdir", str(tmp_path / "run"), "--add_harm_tags"])
    assert e.value.code == 2
    assert cli.main(["import", "--hf", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "run")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_a_tokenizer_whose_text_encodes_to_a_reserved_id_is_refused(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models

    pieces = {"<pad>": 0, "</s>": 1, vocab.HARM_TAG: 2}  # whole texts are words: the tag's text is its id
    tok = Tokenizer(models.WordLevel(pieces, unk_token="<pad>"))
    tok.add_special_tokens([AddedToken(vocab.HARM_TAG, special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    vocabulary = vocab.load_vocabulary(str(tmp_path / "tokenizer.json"))
    with pytest.raises(errors.UserError, match="forge"):
        vocab.reserved_ids(vocabulary, (vocab.HARM_TAG,))



# ---- SmolLM2's layout: the eos at id 0, the tokenizer's own harm tag and role markers -----------

SMOL_SPECIALS = ("<|endoftext|>", "<|harm|>", "<|u|>", "<|a|>", "<|e|>")
SMOL_NAMED = ["--harm_tag", "<|harm|>", "--role_markers", "<|u|>", "<|a|>", "<|e|>"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """A tied tiny Llama whose tokenizer has the eos <|endoftext|> at id 0 (as SmolLM2's has) and
    its own special tokens, imported naming them: (folder, HF model, workdir)."""
    root = tmp_path_factory.mktemp("smol")
    folder, workdir = str(root / "hf"), str(root / "run")
    os.makedirs(folder)
    tok = _byte_level_tokenizer(folder, SMOL_SPECIALS, "<|endoftext|>")
    model = _save_tiny_llama(folder, tok.get_vocab_size(), tie_word_embeddings=True, bos_token_id=0,
                             eos_token_id=0, pad_token_id=None)
    assert cli.main(["import", "--hf", folder, "--workdir", workdir, *SMOL_NAMED]) == 0
    return folder, model, workdir


@pytest.mark.slow
def test_named_special_tokens_are_the_reserved_ids_for_tagger_sampler_and_chat(smol):
    from safejax.inference.generate import Generator

    _, _, workdir = smol
    loaded = _load(workdir)
    assert loaded.reserved == dict(zip(vocab.RESERVED_TOKENS, (1, 2, 3, 4)))
    vocabulary = loaded.vocabulary
    assert vocab.harm_tag_id(vocabulary) == 1 == Generator(loaded).tag_id
    assert not {1, 2, 3, 4} & set(vocabulary.encode("a <|harm|> b<|u|><|e|>"))  # raw text cannot forge them
    ids = dialogue.encode_dialogue(vocabulary, [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo"}])
    assert ids[0] == 2 and ids.count(4) == 2 and 3 in ids
    assert not tagging.piece_classes(vocabulary)["visible"][[1, 2, 3, 4]].any()


@pytest.mark.slow
def test_an_eos_at_id_0_moves_to_a_new_last_id_with_transformers_logits(smol):
    import seqio
    import tensorflow as tf

    _, model, workdir = smol
    n = model.config.vocab_size
    loaded = _load(workdir)
    vocabulary = loaded.vocabulary
    assert vocabulary.eos_id == n == vocabulary.id_0_moved_to == vocabulary.vocab_size - 1
    assert loaded.config.vocab_size == n + 1
    assert checkpoint.read_record(workdir).vocabulary["eos_id"] == n
    texts = [*PROMPTS, "a<|endoftext|>b", "line\n\nbreak"]
    for text in texts:  # our 0 is padding: no text encodes to it, and the text comes back
        assert 0 not in vocabulary.encode(text) and vocabulary.decode(vocabulary.encode(text)) == text
    prompts = _prompt_ids(vocabulary)
    theirs = _hf_logits(model, [[0 if i == n else i for i in p] for p in prompts], "right")
    hf_order = [n, *range(1, n)]  # our logits in the HF model's id order
    diff = _max_diff([o[:, hf_order] for o in _our_logits(loaded, prompts)], theirs)
    print(f"moved id 0 import parity: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    docs = [vocabulary.encode(t) + [vocabulary.eos_id] for t in texts[:3]]
    ds = tf.data.Dataset.from_generator(lambda: ({"targets": d} for d in docs),
                                        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    [packed] = seqio.DecoderFeatureConverter(pack=True)(ds, {"targets": 64}).as_numpy_iterator()
    targets, weights = packed["decoder_target_tokens"], packed["decoder_loss_weights"]
    assert targets[weights == 1].tolist() == sum(docs, [])  # every token, eos included, packed and learned

    from safejax.data import pipeline

    config.parse([os.path.join(workdir, "config.gin")], FAST + ["DataConfig.eval_batches = 0"])
    batch = next(pipeline.train_batches(pipeline.DataConfig()))  # the training data, as `safejax train` reads it
    real = batch["segment_ids"] != 0  # (documents longer than a row are cut, so rows need not hold an eos)
    assert real.any() and ((batch["targets"] != 0) == real).all() and (batch["weights"] == real).all()


@pytest.mark.slow
def test_export_of_a_moved_import_gives_the_original_folder_back_and_runs_in_transformers(smol, tmp_path):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model, workdir = smol
    output = str(tmp_path / "hf")
    assert cli.main(["export", "--checkpoint", workdir, "--output", output]) == 0
    original = load_file(os.path.join(folder, "model.safetensors"))
    exported = load_file(os.path.join(output, "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for name in original:
        assert np.array_equal(original[name], exported[name]), name
    assert _json(output, "tokenizer.json") == _json(folder, "tokenizer.json")
    hf = _json(output, "config.json")
    assert hf["vocab_size"] == model.config.vocab_size and hf["eos_token_id"] == 0
    assert hf["safejax"]["harm_tag"] == "<|harm|>" and hf["safejax"]["harm_tag_id"] == 1
    assert _json(output, "special_tokens_map.json")["additional_special_tokens"] == list(SMOL_SPECIALS[1:])

    hf_model, tok = AutoModelForCausalLM.from_pretrained(output).eval(), AutoTokenizer.from_pretrained(output)
    loaded = _load(workdir)
    prompts = [tok(p, add_special_tokens=False, split_special_tokens=True)["input_ids"] for p in PROMPTS]
    n = loaded.vocabulary.id_0_moved_to
    assert prompts == [[0 if i == n else i for i in loaded.vocabulary.encode(p)] for p in PROMPTS]
    assert _max_diff(_hf_logits(model, prompts, "left"), _hf_logits(hf_model, prompts, "left")) == 0
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == dialogue.encode_dialogue(
        loaded.vocabulary, [{"role": "user", "text": "hi"}], generation_prompt=True)

    back = hf_import.import_hf(output, str(tmp_path / "back"))  # the names come back from config.json
    assert back["reserved_ids"] == loaded.reserved and back["id_0_moved_to"] == loaded.vocabulary.id_0_moved_to
    after = jax.tree.leaves(_params(_load(back["workdir"])))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(_params(loaded)), after):
        assert np.array_equal(a, b), path
    settings_path = os.path.join(back["workdir"], "vocab", "tokenizer_config.json")
    settings = json.load(open(settings_path))
    del settings["safejax"]["id_0_moved_to"]
    json.dump(settings, open(settings_path, "w"))
    with pytest.raises(errors.UserError, match="pieces"):  # the same tokenizer.json, other ids: refused
        _load(back["workdir"])


@pytest.mark.slow
def test_export_of_an_imported_tokenizer_json_model_runs_in_transformers(tagged_import, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, output = tagged_import["workdir"], str(tmp_path / "hf")
    assert cli.main(["export", "--checkpoint", workdir, "--output", output]) == 0
    loaded = _load(workdir)
    vocabulary = loaded.vocabulary
    tok = AutoTokenizer.from_pretrained(output)
    for token, token_id in loaded.reserved.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    texts = [*PROMPTS, " ".join(f"{t} word" for t in vocab.RESERVED_TOKENS)]
    for text in texts:
        assert tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == vocabulary.encode(text)
    prompts = _prompt_ids(vocabulary)
    hf_model = AutoModelForCausalLM.from_pretrained(output).eval()
    for side in ("right", "left"):
        diff = _max_diff(_our_logits(loaded, prompts), _hf_logits(hf_model, prompts, side))
        print(f"export of an imported tokenizer.json ({side} padding): max |logit diff| = {diff:.2e}")
        assert diff < TOL


@pytest.mark.slow
def test_an_import_with_a_sentencepiece_tokenizer_model(tmp_path):
    import shutil

    import seqio

    folder = str(tmp_path / "hf")
    os.makedirs(folder)
    shutil.copyfile(vocab.BUNDLED_VOCAB, os.path.join(folder, "tokenizer.model"))
    size = vocab.load_vocabulary(vocab.BUNDLED_VOCAB).vocab_size
    model = _save_tiny_llama(folder, size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             tie_word_embeddings=True, bos_token_id=3, eos_token_id=1, pad_token_id=0)
    summary = hf_import.import_hf(folder, str(tmp_path / "run"))
    assert summary["vocabulary"].endswith("tokenizer.model") and summary["id_0_moved_to"] is None
    loaded = _load(summary["workdir"])
    assert isinstance(loaded.vocabulary, seqio.SentencePieceVocabulary)
    assert loaded.reserved == {t: i for i, t in enumerate(vocab.RESERVED_TOKENS, 4)}
    prompts = _prompt_ids(loaded.vocabulary)
    diff = _max_diff(_our_logits(loaded, prompts), _hf_logits(model, prompts, "right"))
    print(f"tokenizer.model import parity: max |logit diff| = {diff:.2e}")
    assert diff < TOL


def _zero_llama_folder(tmp_path, vocab_size=16):
    """config.json + an all-zero model.safetensors: enough for import's checks."""
    from safetensors.numpy import save_file

    from safejax.models.decoder import Decoder, DecoderConfig

    folder = _folder_with(tmp_path, vocab_size=vocab_size)
    cfg = DecoderConfig(**llama_layout.decoder_fields(json.load(open(os.path.join(folder, "config.json"))), "x"))
    shapes = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
    tensors = llama_layout.to_hf(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes), cfg)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return folder, tensors


@pytest.mark.parametrize("flags, message", [
    (["--harm_tag", "<|nope|>"], r"--harm_tag: the tokenizer has no token '<\|nope\|>'"),
    (["--harm_tag", "a"], r"--harm_tag: 'a' is an ordinary token"),
    (["--harm_tag", "<|harm|>", "--role_markers", "<|harm|>", "<|u|>", "<|e|>"], "more than one reserved token"),
    (["--harm_tag", "<|harm|>"], "add --add_harm_tag"),
])
def test_a_named_token_that_is_missing_or_forgeable_is_refused(tmp_path, capsys, flags, message):
    import re

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    folder, _ = _zero_llama_folder(tmp_path)
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "<|harm|>": 2, "<|u|>": 3, "<|e|>": 4},
                                     unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|harm|>", "<|u|>", "<|e|>")])
    tok.save(os.path.join(folder, "tokenizer.json"))
    json.dump({"eos_token": "<|endoftext|>"}, open(os.path.join(folder, "tokenizer_config.json"), "w"))
    assert cli.main(["import", "--hf", folder, "--workdir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_sentencepiece_tokenizer_whose_id_0_is_text_is_refused(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    folder, _ = _zero_llama_folder(tmp_path)
    model = model_pb2.ModelProto()
    model.ParseFromString(open(vocab.BUNDLED_VOCAB, "rb").read())
    word = next(i for i, p in enumerate(model.pieces) if p.type == p.NORMAL)
    pad, normal = model_pb2.ModelProto.SentencePiece(), model_pb2.ModelProto.SentencePiece()
    pad.CopyFrom(model.pieces[0])
    normal.CopyFrom(model.pieces[word])
    model.pieces[0].CopyFrom(normal)
    model.pieces[word].CopyFrom(pad)
    model.trainer_spec.pad_id = word
    open(os.path.join(folder, "tokenizer.model"), "wb").write(model.SerializeToString())
    with pytest.raises(errors.UserError, match="id 0 is .* seqio takes for padding"):
        hf_import.import_hf(folder, str(tmp_path / "run"))
    with pytest.raises(errors.UserError, match="--harm_tag: naming .* needs a tokenizer.json"):
        hf_import.import_hf(folder, str(tmp_path / "run"), named={vocab.HARM_TAG: "<s>"})
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_imported_model_finetunes_on_chat_data_with_its_own_tokenizer(tagged_import, tmp_path, capsys):
    """The finetuning stages take an imported model like one of ours: the chat data tokenized
    with its tokenizer.json (role markers added by --add_harm_tag), then a chat answer."""
    from safejax import cli
    from safejax.inference.generate import Generator, Request

    source, out = tagged_import["workdir"], str(tmp_path / "gsm8k")
    tokenizer = os.path.join(source, "vocab", "tokenizer.json")
    code = cli.main(["finetune", f"--from={source}", "--gin_file=finetune/gsm8k.gin", f"--workdir={out}",
                     "--gin.TRAIN_STEPS=2", "--gin.SEQ_LEN=64", "--gin.GSM8K_EVAL=0",
                     "--gin.DataConfig.eval_batches=0", f"--gin.chat_task.vocab_path='{tokenizer}'"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    gen = Generator.from_checkpoint(out)
    prompt = gen.encode_chat([{"role": "user", "content": "How many apples?"}])
    [c] = gen.run([Request(prompt, gen.params(strategy="greedy", max_new_tokens=4), chat=True)])
    assert c.tokens
