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

from safejax import cli, errors
from safejax.data import scores
from safejax.models.classifier import ClassifierConfig, SafetyClassifier
from safejax.safety.classifier_export import export
from safejax.models.encoder import EncoderConfig
from safejax.safety import scoring, scoring_beam, windows

WORDS = "apple river window stone quiet music paper garden yellow bridge".split()


def small_classifier(directory: str) -> str:
    """A 1-layer random classifier (32 tokens) with the MiniLM tokenizer, exported to DIRECTORY."""
    encoder = EncoderConfig(d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
    cfg = ClassifierConfig(encoder=encoder, seq_len=32, pretrained=False)
    return export(nnx.state(SafetyClassifier(cfg, rngs=nnx.Rngs(0))).to_pure_dict(), cfg, directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_dir):  # noqa: F811
    return small_classifier(str(tmp_path_factory.mktemp("classifier") / "model"))


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
    tokenizer = scorer._tokenizer  # noqa: SLF001
    text = " ".join(f"w{i}" for i in range(200))
    encoding = tokenizer.encode(text, add_special_tokens=False)
    spans = windows.window_spans(encoding.word_ids, 30, 5)
    pieces = [text[encoding.offsets[a][0]:encoding.offsets[b - 1][1]] for a, b in spans]
    assert len(pieces) > 1 and pieces[0].startswith("w0 ") and pieces[-1].endswith("w199")
    assert all(b - a <= 30 for a, b in spans)
    for (a, b), window in zip(spans, pieces):  # a span's ids are the window's own tokens
        assert tokenizer.encode(window, add_special_tokens=False).ids == encoding.ids[a:b]
    words = [w.split() for w in pieces]
    assert sorted({x for w in words for x in w}) == sorted(text.split())  # whole words, all of them
    for (a, b), (c, _) in zip(spans, spans[1:]):
        assert b - c >= 5 and c > a  # consecutive windows share at least `overlap` tokens
    for a, b in zip(words, words[1:]):
        shared = a[a.index(b[0]):]
        assert b[:len(shared)] == shared
    assert windows.window_spans(tokenizer.encode("short text", add_special_tokens=False).word_ids, 30, 5) == [(0, 2)]

    ids, owner = scorer.windows(["short text", text])
    assert owner.tolist() == [0] + [1] * (len(ids) - 1) and len(ids) > 3
    assert ids[0] == tokenizer.encode("short text").ids  # [CLS] short text [SEP]
    assert all(len(w) <= scorer.scorer.cfg.seq_len for w in ids)


def test_a_document_scores_the_maximum_over_its_windows(model_dir):
    scorer = scoring.DocumentScorer(model_dir, batch_size=8, overlap=0)
    alarm = scorer._tokenizer.token_to_id("alarm")  # noqa: SLF001

    def probs_ids(rows):  # a stand-in classifier: windows holding "alarm" are score 4
        out = np.full((len(rows), 6), 0.02, np.float32)
        out[:, 0] = 0.9
        for i, w in enumerate(rows):
            if alarm in w:
                out[i] = [0.05, 0.05, 0.05, 0.05, 0.75, 0.05]
        return out

    scorer.scorer.probs_ids = probs_ids
    long_text = " ".join(["calm"] * 100 + ["alarm"] + ["calm"] * 100)
    safe, unsafe = scorer.score(["calm calm", long_text])
    assert scorer.rule == {"kind": "max"}  # an export without a fitted rule
    assert (safe.score, safe.windows) == (0, 1)
    assert unsafe.score == 4 and unsafe.windows > 3 and unsafe.probs[4] == pytest.approx(0.75)
    assert unsafe.p_at_least.tolist() == pytest.approx([0.95, 0.9, 0.85, 0.8, 0.05])
    assert unsafe.expected_score == pytest.approx(sum([0.95, 0.9, 0.85, 0.8, 0.05]))


def test_windows_score_as_their_texts_do(model_dir):
    scorer = scoring.DocumentScorer(model_dir, batch_size=8, overlap=8)
    texts = [" ".join(random.Random(k).choice(WORDS) for _ in range(n)) for k, n in enumerate([3, 40, 90])]
    ids, owner = scorer.windows(texts)
    as_text = [scorer._tokenizer.decode(w) for w in ids]  # noqa: SLF001
    np.testing.assert_allclose(scorer.scorer.probs_ids(ids), scorer.scorer.probs(as_text), atol=1e-6)
    assert [d.windows for d in scorer.score(texts)] == np.bincount(owner).tolist()


def test_bfloat16_scoring_is_close_to_float32(model_dir):
    texts = [" ".join(random.Random(k).choice(WORDS) for _ in range(n)) for k, n in enumerate([3, 40, 90])]
    exact = scoring.DocumentScorer(model_dir, batch_size=8, overlap=8)
    fast = scoring.DocumentScorer(model_dir, batch_size=8, overlap=8, dtype="bfloat16")
    assert fast.scorer.cfg.encoder.dtype == "bfloat16"
    ids, _ = exact.windows(texts)
    np.testing.assert_allclose(fast.scorer.probs_ids(ids), exact.scorer.probs_ids(ids), atol=0.02)
    with pytest.raises(errors.UserError, match="float32 or bfloat16"):
        scoring.DocumentScorer(model_dir, dtype="float16")


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
    assert record["rule"] == "max" and len(record["p_at_least"]) == 5
    assert record["expected_score"] == pytest.approx(sum(record["p_at_least"]), abs=1e-3)

    again = scoring.score_corpus(model_dir, corpus, out, batch_size=8, overlap=8, progress_bar=False)
    assert again["documents"] == 0 and again["shards_already_done"] == 2
    os.remove(os.path.join(out, _shards(out)[1]))  # as if killed while writing the second shard
    resumed = scoring.score_corpus(model_dir, corpus, out, batch_size=8, overlap=8, progress_bar=False)
    assert resumed["documents"] == 25
    with pytest.raises(errors.UserError, match="holds scores made with"):
        scoring.score_corpus(model_dir, corpus[:1], out, overlap=8, progress_bar=False)
    with pytest.raises(errors.UserError, match="holds scores made with"):  # bf16 shards, not float32 ones
        scoring.score_corpus(model_dir, corpus, out, batch_size=8, overlap=8, progress_bar=False, dtype="float32")


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
    assert summary["dtype"] == "bfloat16"  # the default: bf16 matmuls, float32 accumulation
    assert cli.main(["score", "--checkpoint", str(tmp_path), "--input", corpus[0], "--output",
                     str(tmp_path / "t")]) == 2
    assert "not an exported classifier" in capsys.readouterr().err
    # the mistyped checkpoint claimed nothing: the corrected command runs in the same folder
    assert cli.main(["score", "--checkpoint", model_dir, "--input", corpus[0], "--output",
                     str(tmp_path / "t"), "--batch_size", "8", "--overlap", "8"]) == 0
    capsys.readouterr()
    assert cli.main(["score", "--checkpoint", model_dir, "--input", corpus[0], "--output",
                     str(tmp_path / "u"), "--overlap", "8", "--rule", "calibrated"]) == 2
    assert "no fitted document rule" in capsys.readouterr().err
