"""The checkpoint record: what a checkpoint says it is, and readers that trust it over gin.

A safety-mixture run trained with its own vocabulary (bound as `safety_data.vocab_path`, not the
plain LM task's binding) must be sampled with that vocabulary; a different file at the recorded
path is refused; a model smaller than its vocabulary is refused before training.
"""

import hashlib
import itertools
import os
import shutil

import pytest
from conftest import FAST, TINY

from safejax import config, errors, vocab
from safejax.data import sources
from safejax.inference import checkpoint as inference_checkpoint
from safejax.inference.generate import Generator
from safejax.train import checkpoint, pretrain

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "safejax", "assets",
                      "corpus", "wikitext2.jsonl.gz")


def _own_vocabulary(path: str) -> str:
    texts = [r["text"] for r in itertools.islice(sources.iter_records([CORPUS]), 200)]
    return vocab.train_sentencepiece(texts, path, vocab_size=600)


def _parse(own: str, *extra):
    config.parse([TINY, "data/safety.gin"], FAST + [
        "MIXTURE = 'ablation_raw'", f"CORPUS = ['{CORPUS}']", f"safety_data.vocab_path = '{own}'",
        "DecoderConfig.vocab_size = 640", "TRAIN_STEPS = 2", "CHECKPOINT_EVERY = 2", "DataConfig.eval_batches = 0",
        *extra])


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    own = _own_vocabulary(str(root / "own.model"))
    workdir = str(root / "run")
    _parse(own)
    pretrain.train(workdir)
    return workdir, own


def test_the_record_says_what_the_checkpoint_is(own_run):
    workdir, own = own_run
    record = checkpoint.read_record(workdir)
    assert record.step == 2 and record.data_position == 2 and record.objective == "lm"
    assert record.seq_len == 64 and record.model_config["vocab_size"] == 640
    assert record.fingerprint["vocab_size"] == 640
    assert record.vocabulary["path"] == os.path.abspath(own) and record.vocabulary["pieces"] == 600
    assert record.vocabulary["sha256"] == hashlib.sha256(open(own, "rb").read()).hexdigest()
    assert record.vocabulary["reserved_ids"][vocab.HARM_TAG] == vocab.harm_tag_id(vocab.load_vocabulary(own))


def test_a_safety_mixture_run_samples_with_its_own_vocabulary(own_run):
    workdir, own = own_run
    generator = Generator.from_checkpoint(workdir)  # config.gin binds safety_data.vocab_path, not the LM task's
    assert generator.loaded.vocabulary.sentencepiece_model_file == os.path.abspath(own)
    assert generator.loaded.vocabulary.vocab_size == 600 and generator.loaded.context == 64


def test_a_vocabulary_with_other_content_is_refused(own_run, tmp_path):
    workdir, own = own_run
    with pytest.raises(errors.UserError, match="is not the one the checkpoint was trained with"):
        inference_checkpoint.load(workdir, vocab_path=vocab.BUNDLED_VOCAB)
    copy = str(tmp_path / "copy.model")
    shutil.copy(own, copy)  # the same content elsewhere is fine
    assert inference_checkpoint.load(workdir, vocab_path=copy).vocabulary.vocab_size == 600


def test_a_model_smaller_than_its_vocabulary_is_refused_before_training(tmp_path):
    config.parse([TINY], FAST + ["DecoderConfig.vocab_size = 100", "TRAIN_STEPS = 2"])
    with pytest.raises(errors.UserError, match="has 8192 pieces but DecoderConfig.vocab_size is 100"):
        pretrain.train(str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_reading_a_workdir_without_checkpoints_is_one_line(tmp_path):
    with pytest.raises(errors.UserError, match="has no checkpoints/ directory"):
        checkpoint.read_record(str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))  # a reader creates nothing
