"""The safety classifier: objective weights, head-only warm-up, a short training run through the
Trainer on the 8-device mesh with resume, the exported scorer, and the evaluation report.

A small random encoder (pretrained=False) with the real MiniLM tokenizer keeps the runs short; the
pretrained encoder itself is checked in test_encoder.py.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from pretrained_files import minilm_dir  # noqa: F401 (fixture)

from safejax import config, errors
from safejax.models import encoder as enc
from safejax.safety.classifier_export import Scorer
from safejax.safety import calibration, documents, labeled
from safejax.safety.scoring import SCORE_DTYPE
from safejax.train import classify
from safejax.train.checkpoint import Checkpointer

PROSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "documents_prose.jsonl")
SMALL = [
    "EncoderConfig.d_model = 32", "EncoderConfig.num_layers = 2", "EncoderConfig.num_heads = 2",
    "EncoderConfig.mlp_dim = 64", "ClassifierConfig.pretrained = False", "SEQ_LEN = 32", "BATCH_SIZE = 8",
    "LabeledDataConfig.sources = ['toxigen', 'openai_moderation']",
    "LabeledDataConfig.max_train_per_source_score = 12",  # 72 training examples: 9 steps an epoch
    "ClassifierTrainConfig.head_epochs = 0.25", "ClassifierTrainConfig.finetune_epochs = 0.5",
    "ClassifierTrainConfig.head_lr = 1e-2", "ClassifierTrainConfig.lr = 1e-3",
    "ClassifierTrainConfig.lr_warmup_steps = 1", "ClassifierTrainConfig.positive_weight = 3.0",
    "ClassifierTrainConfig.eval_examples = 16",
    # 40 generated prose documents stand in for the corpus: 16 clean windows, 16 spliced, 8 threads
    f"DocumentDataConfig.corpus_files = ['{PROSE}']", "DocumentDataConfig.clean_sources = ['documents_prose']",
    "DocumentDataConfig.eval_sources = ['documents_prose']", "DocumentDataConfig.clean_windows_per_source = 16",
    "DocumentDataConfig.spliced_examples = 16", "DocumentDataConfig.thread_examples = 8",
    "DocumentDataConfig.request_train_copies = 0",  # the request sets are evaluated (and calibrated on), not trained on
    "CascadeConfig.exit_layer = 1", "CascadeConfig.max_miss = 0.05",  # the encoder above has 2 layers
    "TrainConfig.checkpoint_every = 2", "TrainConfig.progress_bar = False",
    "TrainConfig.async_checkpoints = False",
]


def parse(*extra):
    config.parse(["classifier/minilm.gin"], SMALL + list(extra))


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_example_weights_combine_class_weights_and_lambda():
    labels = np.array([0, 0, 0, 3, 3, 5])
    weights = classify.class_weights("balanced", labels, 6)
    assert weights == (6 / 9, 1, 1, 1.0, 1, 2.0)  # n / (k n_c) over the 3 classes present
    assert classify.class_weights([1, 2, 3, 4, 5, 6], labels, 6) == (1, 2, 3, 4, 5, 6)
    with pytest.raises(errors.UserError):
        classify.class_weights("inverse", labels, 6)
    obj = classify.ClassifierObjective(classify.ClassifierConfig(), weights, positive_weight=10.0)
    w = np.asarray(obj.example_weights(np.array([0, 3, 5, 5]), np.array([1, 1, 1, 0])))
    np.testing.assert_allclose(w, [6 / 9, 10.0, 20.0, 0.0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm_dir):  # noqa: F811
    """One uninterrupted run (112 examples, 14 steps an epoch: 4 head-only steps, then 7 full
    ones), calibrated and evaluated at the end."""
    workdir = str(tmp_path_factory.mktemp("classifier") / "full")
    parse()
    summary = classify.train(workdir)
    assert summary["step"] == 11 and summary["head_steps"] == 4 and summary["status"] == "completed"
    return workdir


@pytest.mark.slow
def test_resume_across_the_warmup_boundary_and_frozen_encoder(trained, tmp_path):
    resumed = str(tmp_path / "resumed")
    parse("ClassifierTrainConfig.finetune_epochs = 0", "ClassifierTrainConfig.evaluate = False")
    assert classify.train(resumed)["step"] == 4  # stops after the head-only warm-up ...

    trainer = classify.build(labeled.LabeledDataConfig(), documents.DocumentDataConfig(),
                             classify.ClassifierTrainConfig(), classify.ClassifierConfig()).trainer
    checkpointer = Checkpointer(resumed, asynchronous=False)
    warm = traverse_util.flatten_dict(jax.device_get(trainer.load_state(checkpointer, 4)["params"]))
    checkpointer.close()
    init = traverse_util.flatten_dict(jax.device_get(trainer.init_state()["params"]))
    for path, value in warm.items():  # only the head moved; the encoder is exactly as initialised
        assert np.array_equal(value, init[path]) != (path[0] in ("head_w", "head_b")), path

    parse("ClassifierTrainConfig.evaluate = False")  # ... and the full config resumes there
    again = classify.train(resumed)
    assert again["start_step"] == 4 and again["step"] == 11
    a, b = _losses(trained), _losses(resumed)
    assert [a[s] for s in range(1, 12)] == pytest.approx([b[s] for s in range(1, 12)], rel=1e-5)


@pytest.mark.slow
def test_eval_report_schema(trained):
    with open(os.path.join(trained, "eval.json")) as f:
        report = json.load(f)
    systems = [report["model"], report["baselines"]["profanity"], report["baselines"]["tfidf_lr"]]
    for figures in systems:
        assert {"f1", "r_at_1", "r_at_3", "p_at_1", "p_at_3"} <= set(figures)
        assert 0 <= figures["f1"] <= 1 and 0 <= figures["r_at_1"] <= 1
    n = report["split"]["n"]
    assert n == sum(map(sum, report["confusion"]["model"])) == report["model"]["n"] > 100
    assert set(report["per_source"]) == {"toxigen", "openai_moderation"}
    assert sum(s["model"]["n"] for s in report["per_source"].values()) == n
    assert report["paper"]["gte-base-en-v1.5"]["r_at_1"] == 0.775
    assert "| profanity |" in open(os.path.join(trained, "eval.md")).read()


@pytest.mark.slow
def test_training_calibrates_the_export_and_reports_whole_documents(trained):
    record = json.load(open(os.path.join(trained, "model", "classifier.json")))
    assert record["calibration"]["temperature"] > 0 and len(record["calibration"]["bias"]) == 6
    rule = record["document_rule"]
    assert rule["kind"] == "calibrated" and len(rule["coef"]) == 5
    assert rule["thresholds"] == [0.5] * 5 and rule["false_positive_rate"] is None  # the default
    shares = rule["benign_validation_share_at_level"]
    assert set(shares) == {"documents_prose", "xstest_safe"}
    assert all(1 >= s[0] >= s[1] >= s[2] >= s[3] >= s[4] >= 0 for s in shares.values())
    fitted = record["cascade"]
    assert fitted["exit_layer"] == 1 and len(fitted["head"]["weights"]) == 32 and fitted["max_miss"] == 0.05
    missed, harmful = fitted["validation"]["missed"], fitted["validation"]["harmful_windows"]
    assert missed <= 0.05 * harmful
    docs = json.load(open(os.path.join(trained, "eval.json")))["documents"]
    assert set(docs["sources"]) == {"documents_prose", "xstest_safe", "xstest_unsafe"}
    for name, entry in docs["sources"].items():
        for rule in ("default", "max"):
            assert sum(entry[rule]["histogram"]) == entry["n"] > 0, name
    assert entry["n"] == len(documents.load_xstest()["xstest_unsafe"]["test"])
    assert [e["expectation"] for e in docs["sources"]["xstest_safe"]["default"]["expectations"]] == ["<= 10% score >= 3"]
    assert {"recall", "precision"} <= set(docs["xstest"]["default"])
    judge = json.load(open(os.path.join(trained, "eval.json")))["judge"]
    assert judge["threshold"] == 3 and judge["sets"]["gsm8k_answers"]["n"] == 1319
    assert 0 < judge["sets"]["documents_prose_spans"]["n"] <= 300
    text = open(os.path.join(trained, "eval.md")).read()
    assert "## Whole documents" in text and "## As an evaluation judge" in text and "Recall mode" in text
    assert "## Scoring cascade" in text
    report = json.load(open(os.path.join(trained, "eval.json")))
    assert 0 <= report["cascade"]["test_cleared"] <= 1 and {"r_at_1", "f1"} <= set(report["cascade"]["through"])
    for entry in report["documents"]["sources"].values():
        assert sum(entry["cascade"]["histogram_without"]) == entry["n"]
        assert entry["cascade"]["missed"] <= entry["cascade"]["harmful_windows"]
    recall_mode = json.load(open(os.path.join(trained, "eval.json")))["recall_mode"]
    assert recall_mode["k1"]["target_precision_on_calibration"] == 0.85


@pytest.mark.slow
def test_a_false_positive_budget_holds_every_benign_set_to_it(trained, tmp_path):
    """The strict-filter option: per-level thresholds from a budget per benign validation set."""
    model_dir = str(tmp_path / "model")
    shutil.copytree(os.path.join(trained, "model"), model_dir)
    corpus = documents.load_corpus(documents.DocumentDataConfig(corpus_files=[PROSE], clean_sources=["documents_prose"],
                                                                eval_sources=["documents_prose"]))
    clean = {"documents_prose": [d.text for d in corpus["documents_prose"]["validation"]]}
    benign = {"xstest_safe": [d.text for d in documents.load_xstest()["xstest_safe"]["validation"]]}
    texts = [d.text for d in documents.load_xstest()["xstest_unsafe"]["validation"]] + benign["xstest_safe"]
    labels = np.array([4] * (len(texts) - len(benign["xstest_safe"])) + [0] * len(benign["xstest_safe"]))
    record, probs = calibration.calibrate_export(model_dir, texts, labels, clean, 0, 8, 0.05, benign)
    rule = record["document_rule"]
    assert probs.shape[1] == 6 and len(probs) > len(texts)  # the examples, then the clean windows
    np.testing.assert_allclose(probs[:len(texts)], Scorer(model_dir, batch_size=8, cascade=False,
                                                          dtype=SCORE_DTYPE).probs(texts),
                               atol=1e-5)  # what the cascade would otherwise score again, at scoring's precision
    per_set = rule["thresholds_per_benign_set"]
    assert set(per_set) == {"documents_prose", "xstest_safe"}
    assert rule["thresholds"] == list(np.max(list(per_set.values()), axis=0))  # the strictest applies
    for share in rule["benign_validation_share_at_level"].values():
        assert max(share) <= 0.05


@pytest.mark.slow
def test_scorer_buckets_match_full_length(trained):
    scorer = Scorer(os.path.join(trained, "model"), batch_size=8, cascade=False)
    texts = ["a short one", "a somewhat longer sentence about gardening, cooking and the weather", ""]
    probs = scorer.probs(texts)
    assert probs.shape == (3, 6)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    tokens, mask = enc.tokenize(scorer.tokenizer, texts + ["x"] * 5, scorer.cfg.seq_len)
    direct = np.asarray(scorer._probs(scorer.params, tokens, mask))[:3]
    np.testing.assert_allclose(probs, direct, atol=1e-5)
    with pytest.raises(errors.UserError, match="not an exported classifier"):
        Scorer(os.path.dirname(trained))


@pytest.mark.slow
def test_cli_eval_and_its_errors(trained, tmp_path, capsys):
    from safejax import cli

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained, workdir)
    first = json.load(open(os.path.join(workdir, "eval.json")))
    os.remove(os.path.join(workdir, "eval.json"))
    assert cli.main(["classifier-eval", "--workdir", workdir]) == 0
    assert "| tfidf_lr |" in capsys.readouterr().out
    assert json.load(open(os.path.join(workdir, "eval.json")))["model"] == first["model"]

    assert cli.main(["classifier-eval", "--workdir", str(tmp_path / "nothing")]) == 2
    assert "has no config.gin" in capsys.readouterr().err
    bindings = [f"--gin.{b.replace(' = ', '=')}" for b in SMALL]
    assert cli.main(["classifier-train", "--workdir", workdir, *bindings, "--gin.EncoderConfig.mlp_dim=128"]) == 2
    assert "incompatible model" in capsys.readouterr().err


def test_equal_precision_point_is_set_on_calibration_labels_only():
    from safejax.safety import classifier_eval

    rng = np.random.default_rng(0)
    cal_true = np.repeat([0, 3], 100)
    p_unsafe = np.concatenate([np.linspace(0.0, 0.6, 100), np.linspace(0.4, 1.0, 100)])
    cal_probs = np.stack([1 - p_unsafe, *np.zeros((2, 200)), p_unsafe, *np.zeros((2, 200))], -1)
    baseline = np.where(rng.random(200) < 0.5, 3, 0) * (cal_true > 0)  # precision 1.0, recall ~0.5
    point = classifier_eval.equal_precision_point(cal_true, cal_probs, baseline, cal_true[::-1], cal_probs, k=1)
    assert point["baseline_precision_on_calibration"] == 1.0
    assert 0.6 < point["threshold"] <= 0.61  # the lowest threshold above every safe example
    assert point["recall"] == 0.0 and point["precision"] == 0.0  # scored against the other labels
    never = classifier_eval.equal_precision_point(cal_true, cal_probs[::-1], baseline, cal_true, cal_probs, k=3)
    assert never["threshold"] is None and "recall" not in never
