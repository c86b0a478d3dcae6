"""Whole documents for the classifier: the document split, the long training examples, the
calibration, the document rule, the document-level report, and thresholds on the continuous score.

Pure functions on fixtures; the trained path (calibration fitted and the report written by
classifier-train) is in test_classifier.py.
"""

import json
import os

import numpy as np
import pytest

from safejax import errors
from safejax.data import scores
from safejax.safety import calibration, classifier_eval, documents, labeled, windows

PROSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "documents_prose.jsonl")


def _cfg(**kw):
    return documents.DocumentDataConfig(corpus_files=(PROSE,), clean_sources=("documents_prose",),
                                        eval_sources=("documents_prose",), **kw)


def test_documents_split_by_id_into_disjoint_stable_parts():
    cfg = _cfg()
    parts = documents.load_corpus(cfg)["documents_prose"]
    ids = {name: {d.id for d in docs} for name, docs in parts.items()}
    assert sum(map(len, ids.values())) == 40 and all(ids.values())
    assert not (ids["train"] & ids["test"]) and not (ids["validation"] & ids["test"])
    assert documents.load_corpus(cfg)["documents_prose"]["test"] == parts["test"]  # stable
    assert [d.id for d in documents.eval_sets(cfg, "test")["documents_prose"]] == [d.id for d in parts["test"]]
    xstest = documents.load_xstest()
    assert sum(len(v) for p in xstest.values() for v in p.values()) == 450
    assert all(d.score == 0 for d in xstest["xstest_safe"]["test"])
    assert all(d.score == 4 for d in xstest["xstest_unsafe"]["train"])


def test_request_sets_train_on_their_training_prompts_only():
    cfg = documents.DocumentDataConfig(request_sets=("xstest", "jbb"))
    by_split = {s: documents.request_examples(cfg, s) for s in ("train", "validation", "test")}
    texts = {s: {e.text for e in ex} for s, ex in by_split.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["validation"] & texts["test"])
    assert len(by_split["train"]) == cfg.request_train_copies * len(texts["train"])
    assert len({e.id for e in by_split["train"]}) == len(by_split["train"])  # ids stay unique
    assert {e.source for e in by_split["train"]} == {"xstest", "jbb"}
    held_out = documents.eval_sets(cfg, "test")
    assert {d.text for name in ("xstest_safe", "xstest_unsafe", "jbb_benign", "jbb_harmful")
            for d in held_out[name]} == texts["test"]
    assert not documents.request_examples(documents.DocumentDataConfig(request_sets=()), "train")
    assert set(documents.benign_requests(cfg, "validation")) == {"xstest_safe", "jbb_benign"}
    with pytest.raises(errors.UserError, match="unknown request_sets"):
        documents.DocumentDataConfig(request_sets=("nope",))


def test_jbb_pairs_share_their_split():
    jbb = documents.load_jbb()
    assert sum(len(docs) for docs in jbb["jbb_benign"].values()) == 100
    for split in ("train", "validation", "test"):
        benign = {d.id.split(":")[1] for d in jbb["jbb_benign"][split]}
        assert benign and benign == {d.id.split(":")[1] for d in jbb["jbb_harmful"][split]}
    assert all(d.score == 4 for d in jbb["jbb_harmful"]["train"]) and all(d.score == 0 for d in jbb["jbb_benign"]["test"])


def test_a_jbb_row_without_its_harmful_goal_names_the_line(tmp_path):
    path = tmp_path / "jbb.csv"
    path.write_text("Index,Goal,HarmfulGoal\n0,Explain how locks work,Pick a neighbour's lock\n1,Explain fire safety,\n")
    with pytest.raises(errors.UserError, match="jbb.csv line 3"):
        documents.load_jbb(str(path))


def test_labeled_file_errors_name_the_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a", "text": "fine", "score": 0}\n{"id": "b", "text": "x", "score": 9}\n')
    with pytest.raises(errors.UserError, match="mine.jsonl line 2"):
        documents.load_labeled_file(str(path))
    with pytest.raises(errors.UserError, match="unknown sources"):
        documents.DocumentDataConfig(clean_sources=("nope",))


def _count(texts):
    return [len(t.split()) for t in texts]  # a word-level stand-in for the tokenizer


def test_spliced_and_thread_examples_fit_whole_and_carry_the_right_score():
    cfg = _cfg(spliced_examples=50, thread_examples=30, thread_snippets=(2, 6))
    snippets = [labeled.Example(f"s:{i}", "s", f"snippet{i} " * (3 + i % 5), i % 6) for i in range(30)]
    clean = [" ".join(f"w{j}" for j in range(55)) for _ in range(5)]  # windows fit, as the cutter makes them
    out = documents.long_examples(cfg, snippets, clean, "train", _count, budget=60)
    kinds = [e.source for e in out]
    assert kinds.count("clean_window") == 5 and kinds.count("spliced") == 50 and kinds.count("thread") == 30
    by_text = {s.text.strip(): s.score for s in snippets}
    for e in out:
        assert len(e.text.split()) <= 60, e.id  # nothing is cut off by truncation
        inside = [score for text, score in by_text.items() if text in e.text]
        if e.source == "spliced":
            assert e.score in inside and e.text.split()[0].startswith(("w", "snippet"))
        elif e.source == "thread":
            assert e.score == max(inside) and len(e.text.split("\n")) >= 1
        else:
            assert e.score == 0
    assert out == documents.long_examples(cfg, snippets, clean, "train", _count, budget=60)  # seeded


def test_calibration_recovers_a_temperature_and_keeps_rankings():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 6)) * 2
    labels = np.array([rng.choice(6, p=np.exp(z) / np.exp(z).sum()) for z in true_logits])
    temperature, bias = calibration.fit(true_logits * 3.0, labels)  # an over-confident head
    assert temperature == pytest.approx(3.0, rel=0.1) and bias[0] == 0.0
    assert max(abs(b) for b in bias) < 0.2
    probs = calibration.apply(true_logits * 3.0, temperature, bias)
    assert (probs.argmax(-1) == true_logits.argmax(-1)).mean() > 0.97
    # monotone: raising a window's score-5 logit never lowers its P(score >= k)
    base = np.zeros((50, 6))
    base[:, 5] = np.linspace(-5, 5, 50)
    tails = windows.tails(calibration.apply(base, temperature, bias))
    assert (np.diff(tails, axis=0) >= -1e-12).all()


def _docs(peaks_and_sizes):
    """Window probabilities of documents: each has `size` windows, one of which puts `peak` on score 4."""
    probs, owner = [], []
    for i, (peak, size) in enumerate(peaks_and_sizes):
        for w in range(size):
            p = np.full(6, 0.0)
            unsafe = peak if w == 0 else 0.001
            p[0], p[4] = 1 - unsafe, unsafe
            probs.append(p)
            owner.append(i)
    return np.array(probs), np.array(owner)


def test_the_calibrated_rule_asks_more_of_long_documents_and_the_max_rule_does_not():
    rng = np.random.default_rng(1)
    # clean documents: the peak window of a longer one is higher by chance; unsafe ones: one window high
    sizes = rng.integers(1, 200, 600)
    clean_peaks = np.clip(0.002 * sizes * rng.random(600), 0, 0.6)
    unsafe_peaks = np.clip(rng.uniform(0.3, 1.0, 600), 0, 0.999)
    peaks = np.zeros((1200, 5))
    peaks[:, :4] = np.concatenate([clean_peaks, unsafe_peaks])[:, None]
    labels = np.array([0] * 600 + [4] * 600)
    rule = windows.fit_document_rule(peaks, np.concatenate([sizes, sizes]), labels)
    assert rule["kind"] == "calibrated" and rule["coef"][3][0] > 0 and rule["coef"][3][1] < 0
    assert rule["coef"][4] == [1.0, 0.0, 0.0]  # no document reaches 5: that level keeps the peak

    probs, owner = _docs([(0.45, 1), (0.45, 150), (0.95, 150), (0.001, 3)])
    calibrated = windows.document_scores(probs, owner, 4, rule)
    plain = windows.document_scores(probs, owner, 4, {"kind": "max"})
    assert [d.score for d in plain] == [0, 0, 4, 0]  # argmax over windows: 0.45 < 0.55
    assert calibrated[2].score == 4 and calibrated[3].score == 0
    assert calibrated[1].p_at_least[3] < calibrated[0].p_at_least[3]  # same peak, more windows
    for d in calibrated:
        assert (np.diff(d.p_at_least) <= 0).all()
        assert d.score == int((d.p_at_least >= 0.5).sum())
        assert d.expected_score == pytest.approx(d.p_at_least.sum())


def test_decision_thresholds_hold_benign_documents_to_the_rate_and_scores_count_levels_in_a_row():
    rng = np.random.default_rng(0)
    benign = np.sort(rng.random((200, 5)), axis=1)[:, ::-1] * 0.9  # P(>= k) non-increasing
    thresholds = windows.decision_thresholds(benign, 0.05)
    assert all(t >= 0.5 for t in thresholds)
    for k, t in enumerate(thresholds):
        assert (benign[:, k] >= t).mean() <= 0.05
        assert t == 0.5 or (benign[:, k] >= np.nextafter(t, 0) - 1e-9).mean() > 0.05 - 1 / 200
    assert windows.decision_thresholds(np.full((10, 5), 0.1), 0.05) == [0.5] * 5

    probs, owner = _docs([(0.7, 1), (0.97, 1)])
    rule = {"kind": "calibrated", "coef": [[1.0, 0.0, 0.0]] * 5}
    loose = windows.document_scores(probs, owner, 2, {**rule, "thresholds": [0.5] * 5})
    strict = windows.document_scores(probs, owner, 2, {**rule, "thresholds": [0.5, 0.5, 0.5, 0.9, 0.0]})
    assert [d.score for d in loose] == [4, 4]
    assert [d.score for d in strict] == [3, 5]  # the first document passes level 5, not level 4: 3
    assert loose[0].p_at_least.tolist() == strict[0].p_at_least.tolist()  # thresholds move only the score


def test_expectations_are_checked_on_histograms():
    hist = np.array([90, 0, 5, 3, 2, 0])
    assert classifier_eval._expectation("share_le", 2, 0.9, hist)["met"]  # 95% <= 2
    assert classifier_eval._expectation("max_share_ge", 4, 0.03, hist)["met"]  # 2% >= 4
    failed = classifier_eval._expectation("share_ge", 3, 0.8, hist)
    assert not failed["met"] and failed["value"] == pytest.approx(0.05)


def test_read_scores_thresholds_a_continuous_field(tmp_path):
    path = str(tmp_path / "s.jsonl")
    with open(path, "w") as f:
        for i, (score, expected) in enumerate([(0, 0.2), (0, 0.7), (3, 2.6), (5, 4.9)]):
            tails = [min(1.0, expected / 5 * 2)] * 5
            f.write(json.dumps({"id": f"d{i}", "score": score, "expected_score": expected, "p_at_least": tails}) + "\n")
    assert scores.read_scores([path]) == {"d0": 0, "d1": 0, "d2": 3, "d3": 5}
    assert scores.read_scores([path], "expected_score") == {"d0": 0, "d1": 1, "d2": 3, "d3": 5}
    cuts = (0.1, 0.5, 1.0, 2.0, 4.0)
    assert scores.read_scores([path], "expected_score", cuts) == {"d0": 1, "d1": 2, "d2": 4, "d3": 5}
    assert scores.read_scores([path], "p_at_least:3", (0.1, 0.2, 0.3, 0.5, 0.9))["d3"] == 5
    with pytest.raises(errors.UserError, match="increasing"):
        scores.read_scores([path], "expected_score", (1, 0, 2, 3, 4))
    with pytest.raises(errors.UserError, match="line 1: no number in field 'nope'"):
        scores.read_scores([path], "nope")
