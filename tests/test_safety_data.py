"""The safety data pipeline: sources and quarantine, score joins and filters, tags by score range,
RefuseWeb dialogues, ablation mixtures, the loss-on-tag switch and `safejax data`."""

import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

import safety_fixtures as fx
from safejax import cli, config, errors, vocab
from safejax.data import dialogue, mixing, pipeline, scores, sources, split, stats, tasks
from safejax.data.quarantine import QUARANTINE

VOCAB = vocab.load_vocabulary(vocab.BUNDLED_VOCAB)
RESERVED = vocab.reserved_ids(VOCAB)
TAG = RESERVED[vocab.HARM_TAG]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    return fx.make(str(tmp_path_factory.mktemp("safety")), documents=240, unscored=0)


@pytest.fixture
def safety(data_files):
    """Parses configs/data/safety.gin over the fixture files; returns a function to rebind."""

    def parse(*extra, files=data_files):
        QUARANTINE.reset()
        QUARANTINE.write_to(None)
        config.parse(["data/safety.gin"], fx.bindings(files) + list(extra))
        return tasks.safety_data()

    parse()
    return parse


@pytest.fixture(scope="module")
def split_dir(data_files, tmp_path_factory):
    """The fixture corpus written into score folders by `safejax data split`."""
    out = str(tmp_path_factory.mktemp("split"))
    QUARANTINE.reset()
    args = ["data", "split", "--output", out] + ["--gin." + b.replace(" = ", "=") for b in fx.bindings(data_files)]
    assert cli.main(args) == 0
    QUARANTINE.write_to(None)
    return out


def _folder_ids(root):
    """{score: [ids]} of every record in the score folders."""
    out = {}
    for score in range(scores.NUM_SCORES):
        for path in sorted(tf.io.gfile.glob(os.path.join(root, f"score_{score}", "*.jsonl.gz"))):
            out.setdefault(score, []).extend(r["id"] for r in sources.iter_records([path]))
    return out


def _documents(name):
    task = seqio.get_mixture_or_task(name)
    return list(stats.documents(task, "train", 0, None).as_numpy_iterator())


def _all_ids(name, split="train"):
    return {x["id"].decode() for x in
            seqio.get_mixture_or_task(name).source.get_dataset(split, shuffle=False).as_numpy_iterator()}


def test_malformed_records_are_quarantined_with_file_and_line(data_files, tmp_path):
    QUARANTINE.reset()
    path = str(tmp_path / "quarantine.jsonl")
    QUARANTINE.write_to(path)
    source = sources.JsonlDataSource([data_files["corpus"]], validation_permille=0)
    ids = [x["id"].decode() for x in source.get_dataset("train", shuffle=False).as_numpy_iterator()]
    assert ids == [f"doc-{i}" for i in range(240)]  # every valid record, in order
    entries = [json.loads(line) for line in open(path)]
    assert sorted(e["reason"] for e in entries) == sorted(fx.BAD_LINES.values())
    with open(data_files["corpus"], "rb") as f:
        lines = f.read().split(b"\n")
    for entry in entries:
        assert entry["file"] == data_files["corpus"]
        assert fx.BAD_LINES[lines[entry["line"] - 1]] == entry["reason"]
    # A second epoch, or a resumed run reopening the file, records nothing twice.
    list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
    QUARANTINE.reset()
    QUARANTINE.write_to(path)
    assert QUARANTINE.total() == len(fx.BAD_LINES)
    list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
    assert len(open(path).readlines()) == len(fx.BAD_LINES)
    QUARANTINE.write_to(None)


def test_tfrecord_source_keeps_extra_features_and_quarantines_bad_records(tmp_path):
    QUARANTINE.reset()
    path = str(tmp_path / "docs.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(5):
            feature = {"body": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"text {i}".encode()])),
                       "year": tf.train.Feature(int64_list=tf.train.Int64List(value=[2000 + i]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        writer.write(b"not a protobuf \xff\xfe")
        writer.write(tf.train.Example().SerializeToString())  # no text at all
    source = sources.TfrecordDataSource([path], validation_permille=0, text_feature="body")
    records = list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
    assert [r["text"].decode() for r in records] == [f"text {i}" for i in range(5)]
    assert records[0]["id"].decode() == "docs.tfrecord:0"
    assert json.loads(records[2]["json"])["year"] == 2002
    assert QUARANTINE.counts() == {"bad_record": 1, "missing_text": 1}


def test_tfds_source_reads_a_built_dataset_with_stable_ids(tmp_path):
    import tensorflow_datasets as tfds

    texts = ["" if i == 7 else f"document number {i}" for i in range(40)]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="safejax_tiny_text", version="1.0.0", data_dir=str(tmp_path),
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        split_datasets={"train": [(i, {"text": t}) for i, t in enumerate(texts)]})
    QUARANTINE.reset()
    source = sources.TfdsTextSource("safejax_tiny_text", data_dir=str(tmp_path), validation_permille=0)
    records = list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
    assert len(records) == 39 and QUARANTINE.counts() == {"empty_text": 1}
    again = list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
    assert [r["id"] for r in records] == [r["id"] for r in again]
    assert len({r["id"] for r in records}) == 39


def test_score_filters_keep_exactly_the_requested_ranges(safety):
    for name, (low, high) in {"score_0": (0, 0), "score_1_3": (1, 3), "score_4_5": (4, 5)}.items():
        got = {x["id"].decode() for x in _documents(name)}
        expected = {i for i in _all_ids("raw") if low <= fx.score_of(int(i[4:])) <= high}
        assert got == expected and got
        assert all(low <= x["score"] <= high for x in _documents(name))


def test_tags_go_only_into_documents_in_the_tag_score_range(safety):
    safety("safety_data.tag_scores = (4, 5)", "safety_data.tag_rate = 0.5")
    for doc in _documents("raw_tagged"):
        has_tags = bool((doc["targets"] == TAG).any())
        assert bool(doc["tagged"]) == (doc["score"] >= 4)
        assert has_tags == bool(doc["tagged"])  # every in-range document is long enough to get one
    assert not any((d["targets"] == TAG).any() for d in _documents("score_1_3_tagged"))
    assert not any((d["targets"] == TAG).any() for d in _documents("rephrased"))


def test_tagged_and_untagged_documents_tokenize_the_same(safety):
    plain = {d["id"]: d["targets"] for d in _documents("score_4_5")}
    tagged = {d["id"]: d["targets"] for d in _documents("score_4_5_tagged")}
    assert plain.keys() == tagged.keys()
    assert sum(int((t == TAG).sum()) for t in tagged.values()) > 0
    for doc_id, tokens in tagged.items():
        np.testing.assert_array_equal(tokens[tokens != TAG], plain[doc_id])


def test_a_document_without_a_score_is_an_error_or_skipped_and_counted(tmp_path, safety):
    files = fx.make(str(tmp_path), documents=60, unscored=3)
    safety("DataConfig.eval_batches = 0", "safety_mixture.name = 'ablation_score0'", "DataConfig.seq_len = 32",
           files=files)
    with pytest.raises(errors.UserError, match="has no score"):
        next(pipeline.train_batches(pipeline.DataConfig()))
    safety("safety_data.on_missing_score = 'skip'", files=files)
    assert len(_documents("score_0")) == len([i for i in range(57) if fx.score_of(i) == 0])
    assert QUARANTINE.counts().get("no_score") == 3


def test_refuseweb_dialogues_use_role_markers_and_record_the_names(safety, data_files):
    docs = {d["id"].decode(): d for d in _documents("refuseweb")}
    assert len(docs) + len(_all_ids("refuseweb", "validation")) == 30
    first = docs["refuse-0"]
    assert first["roles"].decode() == "Pupil/Mentor"  # the record's own names win
    tokens = first["targets"].tolist()
    user, assistant, end = (RESERVED[m] for m in vocab.ROLE_MARKERS)
    assert tokens[0] == user and tokens[-1] == end
    assert tokens.count(assistant) == 1 and tokens.count(end) == 2
    assert VOCAB.decode(tokens[1:tokens.index(end)]).startswith("Pupil: ")
    # The same template as chat prompts at inference (safejax serve / Generator.encode_chat).
    turns = json.loads(open(data_files["refuseweb"]).readline())["turns"]
    assert tokens == dialogue.encode_dialogue(VOCAB, turns, ("Pupil", "Mentor"))
    names = {d["roles"].decode() for d in docs.values()}
    assert len(names) >= 3  # varied by dialogue id


def test_mixture_shares_match_their_rates_within_sampling_error(safety):
    mixture = seqio.get_mixture_or_task("ablation_full")
    samples = 3000
    measured = stats.mixture_shares(mixture, samples, seed=1)
    total = sum(mixture.get_rate(t) for t in mixture.tasks)
    for task in mixture.tasks:
        share = mixture.get_rate(task) / total
        sigma = (share * (1 - share) / samples) ** 0.5
        assert abs(measured.get(task.name, 0.0) - share) < 4 * sigma + 1e-9, task.name


def test_a_mixture_without_its_inputs_is_a_clear_error(safety):
    safety("safety_data.refuseweb = None", "safety_mixture.name = 'ablation_refusal'")
    assert "ablation_refusal" in tasks.unavailable()
    with pytest.raises(errors.UserError, match="needs task refuseweb"):
        tasks.safety_mixture()


def test_loss_on_tag_switch_zeroes_the_weights_of_tag_targets(safety):
    base = ("safety_mixture.name = 'ablation_tags'", "DataConfig.seq_len = 64", "DataConfig.global_batch_size = 8",
            "safety_data.tag_rate = 0.3")
    safety(*base)
    with_loss = next(pipeline.train_batches(pipeline.DataConfig()))
    safety(*base, "DataConfig.loss_on_tag = False")
    without = next(pipeline.train_batches(pipeline.DataConfig()))
    np.testing.assert_array_equal(with_loss["targets"], without["targets"])
    is_tag = with_loss["targets"] == TAG
    assert is_tag.any()
    assert (with_loss["weights"][is_tag] == 1).all() and (without["weights"][is_tag] == 0).all()
    np.testing.assert_array_equal(with_loss["weights"][~is_tag], without["weights"][~is_tag])


def test_two_hosts_get_disjoint_documents_that_cover_the_task(safety):
    """One input file, two hosts: seqio shards by example; each document reaches one host."""
    task = seqio.get_mixture_or_task("score_1_3")

    def documents(shard=None):
        ds = task.get_dataset({"targets": 4096}, "train", shuffle=False, shard_info=shard, num_epochs=1)
        return [tuple(x["targets"]) for x in ds.as_numpy_iterator()]

    hosts = [documents(seqio.ShardInfo(i, 2)) for i in range(2)]
    assert hosts[0] and hosts[1]
    assert sorted(hosts[0] + hosts[1]) == sorted(documents())


@pytest.mark.parametrize("layout", ["join", "score_folders"])
def test_mixture_batches_are_deterministic_and_resume_exactly(safety, split_dir, layout):
    folders = [f"SPLIT_DIR = {split_dir!r}"] if layout == "score_folders" else []
    safety("safety_mixture.name = 'ablation_full'", "DataConfig.seq_len = 64", "DataConfig.global_batch_size = 4",
           *folders)
    cfg = pipeline.DataConfig()
    first = [b for _, b in zip(range(5), pipeline.train_batches(cfg))]
    again = [b for _, b in zip(range(5), pipeline.train_batches(cfg))]
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    resumed = [b for _, b in zip(range(2), pipeline.train_batches(cfg, start=3))]
    for a, b in zip(first[3:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_bad_score_shard_line_names_its_file_and_line(tmp_path):
    path = str(tmp_path / "scores.jsonl")
    with open(path, "w") as f:
        f.write('{"id": "a", "score": 2}\n{"id": "b", "score": 9}\n')
    with pytest.raises(errors.UserError, match=r"scores.jsonl line 2: field 'score'"):
        scores.read_scores([path])


def test_data_cli_lists_and_measures(safety, data_files, capsys):
    args = ["data", "stats", "ablation_tags", "--show", "1"] + [
        "--gin." + b.replace(" = ", "=") for b in fx.bindings(data_files)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    report, end = json.JSONDecoder().raw_decode(out)
    assert json.loads(out[end:].strip().splitlines()[0])["task"] in report["shares"]
    for key in ("documents", "tokens", "tagged_documents", "tag_rate", "quarantined", "shares"):
        assert key in report
    assert report["quarantined"] == len(fx.BAD_LINES)
    assert set(report["shares"]) == {"score_0", "rephrased", "score_1_3_tagged", "score_4_5_tagged"}
    assert cli.main(["data", "stats", "no_such_task"]) == 2
    assert "not registered" in capsys.readouterr().err


def test_beam_cache_job_on_the_direct_runner_gives_the_same_documents(safety, tmp_path):
    import gin

    from safejax.data import beam_cache

    cache = str(tmp_path / "cache")
    summary = beam_cache.run("score_4_5_tagged", cache, gin.config_str())
    assert summary["cached"] == ["score_4_5_tagged"]
    assert summary["quarantined"] == {reason: 1 for reason in fx.BAD_LINES.values()}
    for name in summary["cached"]:
        assert os.path.exists(os.path.join(cache, name, "COMPLETED"))
        seqio.utils.set_global_cache_dirs([cache])
        task = seqio.get_mixture_or_task(name)
        fresh = {d["id"]: d["targets"].tolist() for d in _documents(name)}
        source = task._get_cached_source("train")  # noqa: SLF001 (seqio's reader of its cache format)
        from_cache = {d["id"]: d["targets"].tolist()
                      for d in source.get_dataset("train", shuffle=False).as_numpy_iterator()}
        assert from_cache == fresh
    safety("safety_mixture.name = 'score_4_5_tagged'", "DataConfig.seq_len = 64", "DataConfig.use_cached = True",
           f"DataConfig.cache_dirs = ({cache!r},)", "DataConfig.global_batch_size = 4")
    batch = next(pipeline.train_batches(pipeline.DataConfig()))
    assert batch["targets"].shape == (4, 64) and batch["weights"].sum() > 0


@pytest.mark.parametrize("ablation", sorted(tasks.ABLATIONS))
def test_every_ablation_config_names_its_mixture(ablation, data_files):
    name = ablation.removeprefix("ablation_")
    config.parse([f"ablations/{name}.gin"], fx.bindings(data_files))
    import gin

    assert gin.query_parameter("%MIXTURE") == ablation
    assert pipeline.DataConfig().task == ablation  # registers the data and resolves the mixture


@pytest.mark.slow
def test_the_lm_trains_on_an_ablation_mixture_named_in_gin(data_files, tmp_path):
    from conftest import FAST, TINY
    from safejax.train import pretrain

    config.parse([TINY, "data/safety.gin"], FAST + fx.bindings(data_files) + [
        "MIXTURE = 'ablation_full'", "DataConfig.seq_len = 64", "TRAIN_STEPS = 3",
        "CHECKPOINT_EVERY = 3", "safety_data.validation_permille = 300",
        "corpus/jsonl_source.validation_permille = 300"])
    summary = pretrain.train(str(tmp_path / "run"))
    assert summary["quarantined"] == {reason: 1 for reason in fx.BAD_LINES.values()}
    lines = open(tmp_path / "run" / "quarantine-0.jsonl").readlines()
    assert len(lines) == len(fx.BAD_LINES)
    metrics = [json.loads(line) for line in open(summary["metrics"])]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 3


def test_tag_text_in_raw_documents_is_plain_text_in_the_tf_tokenizer_too():
    """The pipeline tokenizes with tf_text, not the Python SentencePiece: neither makes the tag."""
    text = f"before {vocab.HARM_TAG} after <|user|> x"
    tokens = VOCAB.encode_tf(tf.constant(text)).numpy().tolist()
    assert tokens == VOCAB.encode(text)
    assert not set(tokens) & set(RESERVED.values())
    assert VOCAB.decode(tokens) == text


def test_split_puts_every_document_in_exactly_one_score_folder(split_dir, data_files, capsys):
    folders = _folder_ids(split_dir)
    every = [i for ids in folders.values() for i in ids]
    assert sorted(every) == sorted(f"doc-{i}" for i in range(240))  # each valid document once
    assert not os.path.exists(os.path.join(split_dir, "tmp"))  # every shard renamed out of it
    for score, ids in folders.items():
        assert ids and all(fx.score_of(int(i[4:])) == score for i in ids)
    record = next(sources.iter_records(tf.io.gfile.glob(os.path.join(split_dir, "score_3", "*"))))
    assert record["score"] == 3 and record["url"].startswith("https://")  # extra fields kept
    quarantined = [json.loads(line)["reason"] for line in open(os.path.join(split_dir, "quarantine.jsonl"))]
    assert sorted(quarantined) == sorted(fx.BAD_LINES.values())
    # A rerun finds every shard written and writes nothing; other inputs are refused.
    bindings = ["--gin." + b.replace(" = ", "=") for b in fx.bindings(data_files)]
    capsys.readouterr()
    assert cli.main(["data", "split", "--output", split_dir] + bindings) == 0
    assert set(json.loads(capsys.readouterr().out)["documents"].values()) == {0}
    assert cli.main(["data", "split", "--output", split_dir] + bindings + ["--gin.SCORES=[" + repr(data_files["scores"][0]) + "]"]) == 2
    assert "holds a split made with scores=" in capsys.readouterr().err


def test_split_thresholds_the_continuous_score_when_asked(data_files, tmp_path):
    out = str(tmp_path / "by_expected")
    bindings = ["--gin." + b.replace(" = ", "=") for b in fx.bindings(data_files)]
    shifted = ["--gin.split_by_score.score_field='expected_score'",
               "--gin.split_by_score.cuts=[0.2, 1.2, 2.2, 3.2, 4.2]"]  # expected_score = score + 0.3
    assert cli.main(["data", "split", "--output", out] + bindings + shifted) == 0
    folders = _folder_ids(out)
    assert not folders[0] and sum(map(len, folders.values())) == 240
    for score, ids in folders.items():
        assert all(min(fx.score_of(int(i[4:])) + 1, 5) == score for i in ids)
    assert json.load(open(os.path.join(out, sources.MANIFEST)))["score_field"] == "expected_score"


@pytest.mark.parametrize("split_name", ["train", "validation"])
def test_tasks_over_score_folders_give_the_same_documents_as_the_join(safety, split_dir, split_name):
    safety("corpus/jsonl_source.validation_permille = 200")
    kinds = ("raw_tagged", "score_0", "score_1_3", "score_4_5", "score_1_3_tagged", "score_4_5_tagged")

    def documents(name):
        task = seqio.get_mixture_or_task(name)
        return {d["id"]: (d["targets"].tolist(), int(d["score"]))
                for d in stats.documents(task, split_name, 0, None).as_numpy_iterator()}

    joined = {kind: documents(kind) for kind in kinds}
    safety("corpus/jsonl_source.validation_permille = 200", f"SPLIT_DIR = {split_dir!r}")
    for kind in kinds:
        assert documents(kind) == joined[kind] and joined[kind], kind


def test_split_of_unscored_documents_is_an_error_or_skipped_and_counted(tmp_path, safety):
    files = fx.make(str(tmp_path / "in"), documents=60, unscored=3)
    safety(files=files)
    with pytest.raises(errors.UserError, match="has no score"):
        split.split_by_score(str(tmp_path / "error"))
    safety("ON_MISSING_SCORE = 'skip'", files=files)
    out = str(tmp_path / "skip")
    split.split_by_score(out)
    assert QUARANTINE.counts()["no_score"] == 3
    assert sorted(i for ids in _folder_ids(out).values() for i in ids) == sorted(f"doc-{i}" for i in range(57))


def test_a_split_dir_without_a_manifest_is_a_clear_error(safety, tmp_path):
    with pytest.raises(errors.UserError, match="safejax data split"):
        safety(f"SPLIT_DIR = {str(tmp_path)!r}")


def test_shuffle_buffers_scale_with_the_mixing_rates(safety):
    safety("safety_data.shuffle_buffer_size = 1024")
    sizes = {k: seqio.get_mixture_or_task(k).shuffle_buffer_size
             for k in ("raw", "score_0", "rephrased", "refuseweb", "score_1_3_tagged")}
    assert sizes == {"raw": 1024, "score_0": 1024, "rephrased": 205, "refuseweb": 64, "score_1_3_tagged": 102}


def test_a_config_adds_a_mixture_and_every_mixture_stays_listed(safety, capsys):
    """issue 20 item 16: one binding adds a mixture; the shipped ones (ablation_raw_tagged too) stay."""
    safety("safety_data.extra_ablations = {'ablation_mine': ['score_0', 'raw_tagged']}")
    mixtures = stats.list_data()["mixtures"]
    assert {"ablation_mine", "ablation_raw_tagged", *tasks.ABLATIONS} <= set(mixtures)
    assert [t.name for t in seqio.get_mixture_or_task("ablation_raw_tagged").tasks] == ["raw_tagged"]


def test_mixture_validation_draws_on_the_members_that_have_validation_data(safety, data_files, tmp_path):
    """A member without held-out records (a few rephrasings, 2% validation) must not empty the
    mixture's validation stream: seqio's default mixing stops at its first empty member."""
    few = str(tmp_path / "few_rephrased.jsonl")
    fx.write_jsonl(few, [{"id": "reph-0", "kind": "rephrased", "text": "a calm and neutral sentence"}])
    safety(f"REPHRASED = [{few!r}]", "safety_mixture.name = 'ablation_full'", "DataConfig.seq_len = 64",
           "DataConfig.global_batch_size = 4", "DataConfig.eval_batches = 1")
    assert "rephrased" in mixing.empty_members("ablation_full", "validation", {"targets": 64})
    batches = pipeline.eval_batches(pipeline.DataConfig())
    assert len(batches) == 1 and (batches[0]["segment_ids"] > 0).any()


def test_training_on_a_mixture_with_an_empty_member_names_the_member(safety, tmp_path):
    empty = tmp_path / "refuseweb.jsonl"
    empty.write_text("")
    safety(f"REFUSEWEB = [{str(empty)!r}]", "safety_mixture.name = 'ablation_full'", "DataConfig.seq_len = 64",
           "DataConfig.global_batch_size = 4")
    with pytest.raises(errors.UserError, match="kind 'refuseweb' has no train examples"):
        next(pipeline.train_batches(pipeline.DataConfig()))
