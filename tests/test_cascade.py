"""The scoring cascade (safety/cascade.py): the threshold rule, its fit, and the Scorer's two
stages on a small random classifier with the real MiniLM tokenizer."""

import json
import os

import numpy as np
import pytest
from flax import nnx
from pretrained_files import minilm_dir  # noqa: F401 (fixture)

from safejax.models.classifier import ClassifierConfig, SafetyClassifier
from safejax.models.encoder import EncoderConfig
from safejax.safety import cascade
from safejax.safety.classifier_export import EXPORT_CONFIG, Scorer, export, update_export_record
from safejax.safety.scoring import DocumentScorer

WORDS = "apple river window stone quiet music paper garden yellow bridge".split()


def _probs(harmful: np.ndarray) -> np.ndarray:
    """6-way probabilities: rows marked harmful put 0.8 on score 4, the others 0.9 on score 0."""
    out = np.full((len(harmful), 6), 0.02)
    out[harmful, 4], out[~harmful, 0] = 0.9, 0.9
    return out / out.sum(1, keepdims=True)


def test_threshold_clears_at_most_the_allowed_share_of_harmful_windows():
    rng = np.random.default_rng(0)
    harmful = rng.random(2000) < 0.2
    scores = rng.normal(size=2000) + 2.0 * harmful  # the exit head separates them imperfectly
    probs = _probs(harmful)
    for max_miss in (0.0, 0.01, 0.05):
        threshold = cascade.choose_threshold(scores, probs, max_miss)
        missed = ((scores < threshold) & harmful).sum()
        assert missed <= np.floor(max_miss * harmful.sum())
        assert missed >= np.floor(max_miss * harmful.sum()) - 1  # and uses the budget it has
    assert cascade.choose_threshold(scores[:5], _probs(np.zeros(5, bool)), 0.01) == float("-inf")


def test_fitted_cascade_never_clears_a_harmful_fixture_window_at_zero_miss():
    rng = np.random.default_rng(1)
    centre = 1.5 * rng.normal(size=16)
    train_labels = rng.integers(0, 6, 400)
    train = rng.normal(size=(400, 16)) + np.outer(train_labels >= 1, centre)
    val_harmful = rng.random(300) < 0.3
    val = rng.normal(size=(300, 16)) + np.outer(val_harmful, centre)
    record = cascade.fit(cascade.CascadeConfig(exit_layer=1, max_miss=0.0), train, train_labels, val,
                         _probs(val_harmful), seed=0)
    cleared = cascade.exit_scores(val.astype(np.float32), record["head"]) < record["threshold"]
    assert not (cleared & val_harmful).any()
    assert record["validation"]["missed"] == 0 and record["validation"]["cleared"] > 0.3
    assert np.isclose(sum(record["cleared_probs"]), 1.0) and np.argmax(record["cleared_probs"]) == 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_dir):  # noqa: F811
    encoder = EncoderConfig(d_model=32, num_layers=2, num_heads=2, mlp_dim=64)
    cfg = ClassifierConfig(encoder=encoder, seq_len=32, pretrained=False)
    return export(nnx.state(SafetyClassifier(cfg, rngs=nnx.Rngs(0))).to_pure_dict(), cfg,
                  str(tmp_path_factory.mktemp("classifier") / "model"))


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 60))) for _ in range(n)]


def test_scorer_runs_the_rest_of_the_encoder_only_on_windows_the_exit_keeps(model_dir):
    texts = _texts(40)
    labels = np.arange(40) % 6
    record = cascade.fit_export(model_dir, cascade.CascadeConfig(exit_layer=1, max_miss=0.5), texts, labels,
                                texts, labels, _texts(5, seed=1), seed=0, batch_size=8)
    assert json.load(open(os.path.join(model_dir, EXPORT_CONFIG)))["cascade"]["exit_layer"] == 1
    full = Scorer(model_dir, batch_size=8, cascade=False)
    assert full.cascade is None
    through = Scorer(model_dir, batch_size=8)
    rows = [e.ids for e in through.tokenizer.encode_batch(texts)]
    probs, cleared = through.cascade_probs_ids(rows)
    pooled = through.pooled_ids(rows, 1)
    np.testing.assert_array_equal(cleared, cascade.exit_scores(pooled, record["head"]) < record["threshold"])
    assert 0 < cleared.sum() < len(rows) and through.windows_cleared == cleared.sum()
    expected = full.probs_ids(rows)
    np.testing.assert_allclose(probs[~cleared], expected[~cleared], atol=1e-6)
    np.testing.assert_allclose(probs[cleared], np.broadcast_to(record["cleared_probs"], probs[cleared].shape), atol=1e-6)
    # the document scorer passes the switch through; off gives the whole encoder's scores
    on, off = DocumentScorer(model_dir, batch_size=8), DocumentScorer(model_dir, batch_size=8, cascade=False)
    assert on.scorer.cascade is not None and off.scorer.cascade is None
    assert [d.expected_score for d in off.score(texts[:6])] == pytest.approx(
        [d.expected_score for d in DocumentScorer(model_dir, batch_size=8, cascade=False).score(texts[:6])])
    update_export_record(model_dir, cascade=None)
    assert Scorer(model_dir, batch_size=8).cascade is None


def test_short_documents_skip_the_first_stage_and_long_ones_go_through_it(model_dir):
    np.testing.assert_array_equal(cascade.in_long_documents(np.array([0, 1, 1, 1, 2, 2]), 2),
                                  [False, True, True, True, True, True])
    texts = _texts(40)
    labels = np.arange(40) % 6
    cascade.fit_export(model_dir, cascade.CascadeConfig(exit_layer=1, max_miss=0.5, min_windows=3), texts, labels,
                       texts, labels, _texts(5, seed=1), seed=0, batch_size=8)
    on, off = DocumentScorer(model_dir, batch_size=8), DocumentScorer(model_dir, batch_size=8, cascade=False)
    assert on.scorer.cascade["min_windows"] == 3
    docs = _texts(8, seed=2) + [" ".join([t for t in _texts(6, seed=3 + i)]) for i in range(4)]
    windows, owner = on.windows(docs)
    sizes = np.bincount(owner)
    assert (sizes[:8] < 3).any() and (sizes[8:] >= 3).all()
    probs, cleared = on.window_probs(windows, owner)
    long = sizes[owner] >= 3
    assert not cleared[~long].any() and cleared[long].any()
    np.testing.assert_allclose(probs[~long], off.window_probs(windows, owner)[0][~long], atol=1e-6)
    short = [i for i in range(len(docs)) if sizes[i] < 3]
    assert [d.score for d in on.score([docs[i] for i in short])] == [d.score for d in off.score([docs[i] for i in short])]
    with pytest.raises(Exception, match="min_windows"):
        cascade.CascadeConfig(min_windows=0)


def test_the_second_stage_resumes_from_hidden_states_padded_to_any_length():
    """What the cascade relies on: layers [k, n) on the first k layers' hidden states, padded
    with zeros to a longer batch, give the logits of the whole classifier on the unpadded row."""
    import jax.numpy as jnp

    cfg = ClassifierConfig(encoder=EncoderConfig(d_model=32, num_layers=3, num_heads=2, mlp_dim=64), seq_len=32,
                           pretrained=False)
    model = SafetyClassifier(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, 1000, (2, 12)), jnp.int32)
    mask = jnp.ones_like(tokens)
    hidden = model.encoder(tokens, mask, 1)
    padded = jnp.zeros((2, 32, 32)).at[:, :12].set(hidden)
    padded_mask = jnp.zeros((2, 32), jnp.int32).at[:, :12].set(1)
    np.testing.assert_allclose(model.resume(padded, padded_mask, 1), model(tokens, mask), atol=1e-5)
