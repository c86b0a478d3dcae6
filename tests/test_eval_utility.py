"""Utility metrics of `safejax eval`: perplexity against a direct numpy computation (a bigram
model whose every probability is known, and the tiny LM's full forward pass document by document),
the harm tag's mass removed and renormalised, clean texts from score folders and files, and
multiple choice on tests/fixtures/mc_sample.jsonl with its bad rows."""

import dataclasses
import functools
import gzip
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import FAST, TINY
from toy_lm import TAG, log_softmax, random_table

from safejax import config, errors
from safejax import vocab as vocab_lib
from safejax.evals import utility
from safejax.inference.generate import Generator

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mc_sample.jsonl")
TEXTS = ["A short line about the weather.", "Two friends walked to the market and bought bread, cheese and "
         "apples for the long trip north, then sat by the river until the light was gone and the air was cold "
         "enough that they had to go home again.", "Numbers: 1, 2, 3."]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from safejax.train import pretrain

    path = str(tmp_path_factory.mktemp("tiny_lm"))
    config.parse([TINY], FAST + ["TRAIN_STEPS = 2", "TrainConfig.async_checkpoints = False"])
    pretrain.train(path)
    return Generator.from_checkpoint(path)


def _untagged(generator):
    reserved = {k: v for k, v in generator.loaded.reserved.items() if k != vocab_lib.HARM_TAG}
    return Generator(dataclasses.replace(generator.loaded, reserved=reserved))


def _bigram_scorer(table, tag_id=TAG, context=32, batch_size=4):
    return utility.TokenScorer(lambda params, tokens, positions, segments: params[tokens],
                               np.asarray(table, np.float32), tag_id, context, batch_size)


def _direct_bigram(table, documents, tag_id=TAG):
    logp = log_softmax(table)
    lp = np.concatenate([logp[d[:-1], d[1:]] for d in documents])
    p_tag = np.concatenate([np.exp(logp[d[:-1], tag_id]) for d in documents])
    return np.exp(-lp.mean()), np.exp(-(lp - np.log1p(-p_tag)).mean())


# ---- perplexity ----

def test_perplexity_of_a_bigram_model_equals_the_direct_computation():
    """Ragged documents cut into windows of 8, batches padded: the same as summing log p by hand."""
    table = random_table(24, seed=0)
    rng = np.random.default_rng(1)
    documents = [list(rng.integers(5, 24, size=n)) for n in (2, 9, 17, 30, 5)]
    out = utility.token_perplexity(_bigram_scorer(table), documents, chunk_tokens=8, max_tokens=10_000)
    plain, removed = _direct_bigram(table, documents)
    assert out["tokens"] == sum(len(d) - 1 for d in documents) and out["documents"] == 5 and not out["truncated"]
    assert out["perplexity"] == pytest.approx(plain, rel=1e-5)
    assert out["perplexity_tag_removed"] == pytest.approx(removed, rel=1e-5)
    assert out["perplexity_tag_removed"] < out["perplexity"]  # the tag's mass went to the tokens that occur


def test_max_tokens_cuts_the_last_document():
    table = random_table(24, seed=2)
    documents = [list(range(5, 20)), list(range(6, 21)), list(range(7, 22))]
    out = utility.token_perplexity(_bigram_scorer(table), documents, chunk_tokens=8, max_tokens=20)
    assert out["tokens"] == 20 and out["documents"] == 2 and out["truncated"]
    plain, _ = _direct_bigram(table, [documents[0], documents[1][:7]])  # 14 + 6 predicted tokens
    assert out["perplexity"] == pytest.approx(plain, rel=1e-5)


def test_tag_removal_changes_nothing_without_tag_mass_or_without_a_tag():
    table = random_table(24, seed=3)
    table[:, TAG] = -1e9  # the model never predicts the tag
    documents = [list(np.random.default_rng(4).integers(5, 24, size=40))]
    out = utility.token_perplexity(_bigram_scorer(table), documents, chunk_tokens=16, max_tokens=1000)
    assert out["perplexity_tag_removed"] == out["perplexity"] and out["mean_tag_probability"] == 0.0
    untagged = utility.token_perplexity(_bigram_scorer(random_table(24, seed=3), tag_id=None), documents, 16, 1000)
    assert untagged["perplexity_tag_removed"] == untagged["perplexity"] and not untagged["tag"]


@functools.cache
def _plain_forward(generator):
    """The model's plain forward pass (no segments, no batching), compiled for one row of its
    context: a shorter sequence is followed by filler tokens, which a causal model's earlier
    positions never see."""
    from flax import nnx

    graphdef, state = nnx.split(generator.loaded.model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))

    def logprobs(ids):
        row = np.full((1, generator.loaded.context), 7, np.int32)
        row[0, :len(ids)] = ids
        logits = np.asarray(forward(state, row), np.float64)[0, :len(ids)]
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

    return logprobs


def _direct_decoder(generator, texts):
    """Each document alone through the model's plain forward pass, in windows of its context."""
    eos, length = generator.vocabulary.eos_id, generator.loaded.context
    lp, p_tag = [], []
    for text in texts:
        ids = [eos, *generator.encode(text), eos]
        for start in range(0, len(ids) - 1, length):
            window = ids[start:start + length + 1]
            logp = _plain_forward(generator)(window[:-1])
            lp.append(logp[np.arange(len(window) - 1), window[1:]])
            p_tag.append(np.exp(logp[:, generator.tag_id]))
    lp, p_tag = np.concatenate(lp), np.concatenate(p_tag)
    return np.exp(-lp.mean()), np.exp(-(lp - np.log1p(-p_tag)).mean()), len(lp)


def test_perplexity_of_the_tiny_lm_equals_its_forward_pass_document_by_document(generator):
    long_text = " ".join(TEXTS * 3)  # longer than the context: several windows
    texts = [*TEXTS, long_text, ""]
    assert len(generator.encode(long_text)) > generator.loaded.context
    out = utility.perplexity(generator, texts, max_tokens=100_000, batch_size=3)
    plain, removed, tokens = _direct_decoder(generator, texts[:-1])
    assert out["tokens"] == tokens and out["documents"] == 4 and out["empty_documents"] == 1
    assert out["perplexity"] == pytest.approx(plain, rel=1e-4)
    assert out["perplexity_tag_removed"] == pytest.approx(removed, rel=1e-4)
    assert out["perplexity_tag_removed"] < out["perplexity"] and out["mean_tag_probability"] > 0
    untagged = utility.perplexity(_untagged(generator), texts, max_tokens=100_000)
    assert untagged["perplexity_tag_removed"] == untagged["perplexity"] == pytest.approx(plain, rel=1e-4)


# ---- clean texts ----

def test_clean_texts_from_a_score_folder_are_its_score_0_validation_documents(tmp_path):
    """The id-hash split of the data pipeline, computed here directly with TF's hash."""
    for score in (0, 1):
        os.makedirs(tmp_path / f"score_{score}")
        with gzip.open(tmp_path / f"score_{score}" / "part-00000-of-00001.jsonl.gz", "wt") as f:
            for i in range(200):
                f.write(json.dumps({"id": f"s{score}-doc{i}", "text": f"document {i} of score {score}",
                                    "score": score}) + "\n")
    (tmp_path / "manifest.json").write_text("{}")
    ids = [f"s0-doc{i}" for i in range(200)]
    held_out = tf.strings.to_hash_bucket_fast(ids, 1000).numpy() < 100
    expected = [f"document {i} of score 0" for i in range(200) if held_out[i]]
    assert 5 < len(expected) < 40
    assert utility.clean_texts(str(tmp_path), validation_permille=100) == expected
    assert utility.clean_texts(str(tmp_path), validation_permille=100, max_documents=3) == expected[:3]


def test_clean_texts_from_files(tmp_path):
    jsonl = tmp_path / "clean.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"id": "b", "text": "two"}) + "\n")
    assert utility.clean_texts(str(jsonl)) == ["one", "two"]
    plain = tmp_path / "clean.txt"
    plain.write_text("first paragraph\nstill first\n\n\nsecond\n")
    assert utility.clean_texts(str(plain)) == ["first paragraph\nstill first", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(errors.UserError, match=r"bad.jsonl:2: field 'text'"):
        utility.clean_texts(str(bad))
    with pytest.raises(errors.UserError, match="not found"):
        utility.clean_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(errors.UserError, match="no documents"):
        utility.clean_texts(str(tmp_path / "empty.txt"))


# ---- multiple choice ----

def _direct_choice_scores(generator, item):
    """log p(" " + choice | question) from the plain forward pass, the tag's mass removed."""
    eos, out = generator.vocabulary.eos_id, []
    for choice in item.choices:
        context, whole = generator.encode(item.question), generator.encode(item.question + " " + choice)
        assert whole[:len(context)] == context  # the fixture's questions end at a word boundary
        ids = [eos, *whole]
        logp = _plain_forward(generator)(ids[:-1])
        rows = np.arange(len(context), len(ids) - 1)
        removed = logp[rows, np.asarray(ids)[rows + 1]] - np.log1p(-np.exp(logp[rows, generator.tag_id]))
        out.append(float(np.sum(removed)))
    return out


def test_multiple_choice_on_the_fixture_equals_direct_scoring(generator):
    items = utility.read_multiple_choice(FIXTURE)
    out = utility.multiple_choice(generator, FIXTURE)
    assert out["n"] == 10 and out["truncated"] == 0 and out["tag_removed"]
    assert set(out["per_item"]) == {item.id for item in items} and "mc_sample.jsonl:5" in out["per_item"] and \
        "8" in out["per_item"]
    scorer = utility.TokenScorer.of(generator, 8)
    scores, _, _ = utility.choice_loglikelihoods(scorer, generator.encode, generator.vocabulary.eos_id, items)
    for item, ours in zip(items, scores):
        direct = _direct_choice_scores(generator, item)
        assert ours == pytest.approx(direct, rel=1e-4, abs=1e-3)
        per_byte = np.asarray(direct) / np.asarray([len((" " + c).encode()) for c in item.choices])
        assert out["per_item"][item.id] == float(int(np.argmax(per_byte)) == item.answer)
        assert out["per_item_raw"][item.id] == float(int(np.argmax(direct)) == item.answer)
    assert out["accuracy"] == pytest.approx(np.mean(list(out["per_item"].values())))
    assert out["ci"][0] <= out["accuracy"] <= out["ci"][1]


@pytest.mark.parametrize("line, message", [
    ('{"question": "Q", "choices": ["a", "b"], "answer": 0', "not JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"choices": ["a", "b"], "answer": 0}', "field 'question'"),
    ('{"question": "Q", "choices": ["only one"], "answer": 0}', "field 'choices'"),
    ('{"question": "Q", "choices": ["a", ""], "answer": 0}', "field 'choices'"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": 2}', "field 'answer'"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": true}', "field 'answer'"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": "0"}', "field 'answer'"),
    ('{"id": "dup", "question": "Q", "choices": ["a", "b"], "answer": 0}', "id 'dup' already used on line 1"),
])
def test_bad_multiple_choice_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"id": "dup", "question": "Q", "choices": ["a", "b"], "answer": 1}\n\n' + line + "\n")
    with pytest.raises(errors.UserError, match=rf"mc.jsonl:3: .*{message}"):
        utility.read_multiple_choice(str(path))


def test_empty_or_missing_multiple_choice_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(errors.UserError, match="no multiple-choice items"):
        utility.read_multiple_choice(str(tmp_path / "empty.jsonl"))
    with pytest.raises(errors.UserError, match="not found"):
        utility.read_multiple_choice(str(tmp_path / "none.jsonl"))
