"""`safejax score`: windows over long documents, max over windows, valid score shards the data
pipeline reads, resumption by shard, and the same shards from the Beam pipeline.

A small random classifier with the real MiniLM tokenizer keeps it fast; the scores it gives are
meaningless, the plumbing is what is tested.
"""

import gzip
import json
import os
import random

import numpy as np
import pytest
from flax import nnx
from pretrained_files import minilm_dir  # noqa: F401 (fixture)

from safejax import cli, config, errors
from safejax.data import scores
from safejax.models.classifier import ClassifierConfig, SafetyClassifier, export
from safejax.safety import scoring, scoring_beam

WORDS = "apple river window stone quiet music paper garden yellow bridge".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_dir):  # noqa: F811
    from safejax.train import classify  # noqa: F401 (registers the classifier's configurables)

    config.parse(["classifier/minilm.gin"], [
        "EncoderConfig.d_model = 32", "EncoderConfig.num_layers = 1", "EncoderConfig.num_heads = 2",
        "EncoderConfig.mlp_dim = 64", "ClassifierConfig.pretrained = False", "ClassifierConfig.seq_len = 32"])
    cfg = ClassifierConfig()
    state = nnx.state(SafetyClassifier(cfg, rngs=nnx.Rngs(0))).to_pure_dict()
    return export(state, cfg, str(tmp_path_factory.mktemp("classifier") / "model"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    paths = []
    for k in range(2):
        path = root / f"part{k}.jsonl"
        with open(path, "w") as f:
            for i in range(25):
                words = rng.randint(3, 120)  # some documents need several windows
                f.write(json.dumps({"id": f"d{k}-{i}", "text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
            if k == 1:
                f.write("{broken\n")
        paths.append(str(path))
    return paths


def test_windows_cover_the_text_with_the_requested_overlap(model_dir):
    scorer = scoring.DocumentScorer(model_dir, batch_size=8, overlap=5)
    text = " ".join(f"w{i}" for i in range(200))
    windows = scoring.window_texts(scorer._tokenizer, text, 30, 5)  # noqa: SLF001
    assert len(windows) > 1 and windows[0].startswith("w0 ") and windows[-1].endswith("w199")
    tokens = [scorer._tokenizer.encode(w, add_special_tokens=False).ids for w in windows]  # noqa: SLF001
    assert all(len(t) <= 30 for t in tokens)
    words = [w.split() for w in windows]
    assert sorted({x for w in words for x in w}) == sorted(text.split())  # whole words, all of them
    for a, b in zip(words, words[1:]):
        shared = a[a.index(b[0]):]  # consecutive windows share a run of at least `overlap` tokens
        assert b[:len(shared)] == shared
        assert len(scorer._tokenizer.encode(" ".join(shared), add_special_tokens=False).ids) >= 5  # noqa: SLF001
    assert scoring.window_texts(scorer._tokenizer, "short text", 30, 5) == ["short text"]  # noqa: SLF001


def test_a_document_scores_the_maximum_over_its_windows(model_dir):
    scorer = scoring.DocumentScorer(model_dir, batch_size=8, overlap=0)

    def probs(windows):  # a stand-in classifier: windows mentioning "alarm" are score 4
        out = np.full((len(windows), 6), 0.02, np.float32)
        out[:, 0] = 0.9
        for i, w in enumerate(windows):
            if "alarm" in w:
                out[i] = [0.05, 0.05, 0.05, 0.05, 0.75, 0.05]
        return out

    scorer.scorer.probs = probs
    long_text = " ".join(["calm"] * 100 + ["alarm"] + ["calm"] * 100)
    (safe, _, n1), (unsafe, p, n2) = scorer.score(["calm calm", long_text])
    assert (safe, n1) == (0, 1)
    assert unsafe == 4 and n2 > 3 and p[4] == pytest.approx(0.75)


def _shards(directory):
    return sorted(f for f in os.listdir(directory) if f.startswith("scores-"))


def test_score_shards_are_valid_and_a_rerun_skips_finished_shards(model_dir, corpus, tmp_path):
    out = str(tmp_path / "scores")
    first = scoring.score_corpus(model_dir, corpus, out, batch_size=8, overlap=8, progress_bar=False)
    assert first["quarantined"] == {"bad_json": 1}
    assert json.loads(open(os.path.join(out, "quarantine-0.jsonl")).readline())["line"] == 26
    assert first["documents"] == 50 and _shards(out) == [scoring.shard_name(i, p) for i, p in enumerate(corpus)]
    table = scores.read_scores([os.path.join(out, f) for f in _shards(out)])
    assert set(table) == {f"d{k}-{i}" for k in range(2) for i in range(25)}
    with gzip.open(os.path.join(out, _shards(out)[0]), "rt") as f:
        record = json.loads(f.readline())
    assert record["score"] == int(np.argmax(record["probs"])) and record["windows"] >= 1

    again = scoring.score_corpus(model_dir, corpus, out, batch_size=8, overlap=8, progress_bar=False)
    assert again["documents"] == 0 and again["shards_already_done"] == 2
    os.remove(os.path.join(out, _shards(out)[1]))  # as if killed while writing the second shard
    resumed = scoring.score_corpus(model_dir, corpus, out, batch_size=8, overlap=8, progress_bar=False)
    assert resumed["documents"] == 25
    with pytest.raises(errors.UserError, match="another model or input list"):
        scoring.score_corpus(model_dir, corpus[:1], out, overlap=8, progress_bar=False)


def test_beam_pipeline_writes_the_same_shards(model_dir, corpus, tmp_path):
    local, beam = str(tmp_path / "local"), str(tmp_path / "beam")
    scoring.score_corpus(model_dir, corpus, local, batch_size=8, overlap=8, progress_bar=False)
    scoring_beam.score_corpus(model_dir, corpus, beam, [], batch_size=8, overlap=8)
    assert _shards(beam) == _shards(local)
    for name in _shards(local):
        a = scores.read_scores([os.path.join(local, name)])
        b = scores.read_scores([os.path.join(beam, name)])
        assert a == b


def test_score_command_prints_a_summary(model_dir, corpus, tmp_path, capsys):
    assert cli.main(["score", "--checkpoint", model_dir, "--input", corpus[0], "--output",
                     str(tmp_path / "s"), "--batch_size", "8", "--overlap", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 25 and summary["shards"] == 1
    assert cli.main(["score", "--checkpoint", str(tmp_path), "--input", corpus[0], "--output",
                     str(tmp_path / "t")]) == 2
    assert "not an exported classifier" in capsys.readouterr().err
