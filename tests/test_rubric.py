"""Label schemes -> the 0-5 rubric, the loaders of each format, and the deterministic split.

The files written here are tiny made-up stand-ins in each set's real format; the bundled data is
checked by counts only (its text is offensive and never printed).
"""

import gzip
import json

import gin
import pytest

from safejax import errors
from safejax.safety import labeled, rubric


def test_havoc_mapping_takes_the_highest_harm():
    none = ["none"] * 5
    assert rubric.havoc_score(none) == 0
    assert rubric.havoc_score(["none", "topical", "none", "none", "none"]) == 2   # ideological mention
    assert rubric.havoc_score(["topical", "none", "none", "none", "none"]) == 3   # hate/violence topic
    assert rubric.havoc_score(["none", "none", "intent", "none", "none"]) == 4    # explicit sexual
    assert rubric.havoc_score(["intent", "none", "topical", "none", "none"]) == 5
    for bad in ([], ["none"] * 4, ["none", "none", "maybe", "none", "none"]):
        with pytest.raises(rubric.LabelError):
            rubric.havoc_score(bad)


def test_openai_moderation_mapping():
    all_zero = {k: 0 for k in rubric.OPENAI_SCORES}
    assert rubric.openai_moderation_score(all_zero) == 0
    assert rubric.openai_moderation_score({**all_zero, "HR": 1}) == 3
    assert rubric.openai_moderation_score({**all_zero, "H": 1, "H2": 1}) == 5
    assert rubric.openai_moderation_score({"S": 1, "S3": 0}) == 4  # a positive label needs no others
    with pytest.raises(rubric.LabelError, match="not every category"):
        rubric.openai_moderation_score({"S": 0, "S3": 0})  # unknown whether hateful: not a 0
    with pytest.raises(rubric.LabelError, match="unknown"):
        rubric.openai_moderation_score({"X": 1})


def test_davidson_toxigen_and_llm_mappings():
    assert [rubric.davidson_score(c) for c in "012"] == [4, 3, 0]
    assert rubric.toxigen_score("hate") == 3 and rubric.toxigen_score("neutral") == 0
    assert [rubric.llm_score(s) for s in range(6)] == list(range(6))
    for bad in (6, -1, 2.0, "3", True, None):
        with pytest.raises(rubric.LabelError):
            rubric.llm_score(bad)
    with pytest.raises(rubric.LabelError):
        rubric.davidson_score("3")


def _write(path, text):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def test_loaders_read_each_format_and_set_aside_bad_records(tmp_path):
    havoc = _write(tmp_path / "havoc.tsv.gz",
                   "Prefix\tSuffix\tPrefixLab\n"
                   "A \"quoted\" garden tip\tmore\t['none', 'none', 'none', 'none', 'none']\n"
                   "A history of a war\tmore\t['topical', 'none', 'none', 'none', 'none']\n"
                   "no labels\tmore\t[]\n"
                   "   \tmore\t['none', 'none', 'none', 'none', 'none']\n")
    result = labeled.load_havoc(havoc)
    assert [(e.id, e.score) for e in result.examples] == [("havoc:1", 0), ("havoc:2", 3)]
    assert result.examples[0].text == 'A "quoted" garden tip'  # literal quotes, no CSV quoting
    assert [i for i, _ in result.set_aside] == ["havoc:3", "havoc:4"]

    moderation = _write(tmp_path / "m.jsonl", "\n".join([
        json.dumps({"prompt": "a cake recipe", **{k: 0 for k in rubric.OPENAI_SCORES}}),
        json.dumps({"prompt": "some text", "S": 0, "S3": 0}),
        "{not json"]) + "\n")
    result = labeled.load_openai_moderation(moderation)
    assert [(e.id, e.score) for e in result.examples] == [("openai_moderation:1", 0)]
    assert [i for i, _ in result.set_aside] == ["openai_moderation:2", "openai_moderation:3"]

    davidson = _write(tmp_path / "d.csv", ",count,hate_speech,offensive_language,neither,class,tweet\n"
                                          "7,3,0,0,3,2,a sunny day\n8,3,0,3,0,5,odd class\n")
    result = labeled.load_davidson(davidson)
    assert [(e.id, e.score) for e in result.examples] == [("davidson:7", 0)] and len(result.set_aside) == 1

    dna = _write(tmp_path / "dna.jsonl", "\n".join([
        json.dumps({"prompt": "a request", "intents": [], "risk_area": "malicious_uses"}),
        json.dumps({"prompt": "a question", "intents": [], "risk_area": "misinformation_harms"}), "{"]) + "\n")
    result = labeled.load_do_not_answer(dna)
    assert [(e.id, e.score) for e in result.examples] == [("do_not_answer:1", 4)]
    assert [reason for _, reason in result.set_aside] == ["unknown risk area 'misinformation_harms'", "invalid JSON"]

    toxigen = _write(tmp_path / "t.csv", "text,label,target_group\n\"a, fine\",neutral,women\n")
    assert [(e.id, e.text, e.score) for e in labeled.load_toxigen(toxigen).examples] == [("toxigen:2", "a, fine", 0)]

    llm = _write(tmp_path / "labels.jsonl", "\n".join([
        json.dumps({"id": "doc-1", "text": "a poem", "score": 1, "reason": "mild"}),
        json.dumps({"id": "doc-2", "text": "a story", "score": 7, "reason": "?"}),
        json.dumps(["not", "an", "object"]), '{"id": "torn']) + "\n")
    result = labeled.load_llm_labels(llm)
    assert [(e.id, e.score) for e in result.examples] == [("llm:doc-1", 1)]
    assert len(result.set_aside) == 3


def test_missing_file_and_bad_header_are_user_errors(tmp_path):
    with pytest.raises(errors.UserError, match="not found"):
        labeled.load_havoc(str(tmp_path / "nope.tsv"))
    with pytest.raises(errors.UserError, match="missing columns"):
        labeled.load_toxigen(_write(tmp_path / "t.csv", "sentence,label\nx,neutral\n"))
    with pytest.raises(errors.UserError, match="unknown"):
        labeled.LabeledDataConfig(sources=("havoc", "reddit"))


def test_split_is_deterministic_by_text_and_keeps_duplicates_together():
    examples = [labeled.Example(f"s:{i}", "s", f"sentence number {i % 500}", i % 6) for i in range(2000)]
    a = labeled.split(examples, seed=1, fractions=(0.8, 0.1, 0.1))
    b = labeled.split(list(reversed(examples)), seed=1, fractions=(0.8, 0.1, 0.1))
    assert {k: sorted(e.id for e in v) for k, v in a.items()} == {k: sorted(e.id for e in v) for k, v in b.items()}
    where = {e.text.upper(): name for name, part in a.items() for e in part}
    for name, part in a.items():  # duplicates (same text up to case and spaces) share a split
        assert all(where[e.text.upper()] == name for e in part)
    assert 0.7 < len(a["train"]) / 2000 < 0.9
    c = labeled.split(examples, seed=2, fractions=(0.8, 0.1, 0.1))
    assert {e.id for e in c["test"]} != {e.id for e in a["test"]}
    with pytest.raises(errors.UserError):
        labeled.split(examples, seed=1, fractions=(0.8, 0.3, 0.1))


def test_bundled_data_counts_and_capping():
    gin.clear_config()  # the bundled defaults, not what an earlier test bound
    splits, result = labeled.load(labeled.LabeledDataConfig())
    counts = result.counts()
    assert counts["examples"] == {"havoc": 10370, "openai_moderation": 859, "davidson": 24783, "toxigen": 722,
                                  "do_not_answer": 491}
    assert counts["set_aside"] == {"havoc": 6, "openai_moderation": 821}
    assert sum(len(v) for v in splits.values()) == len(result.examples)
    capped, _ = labeled.load(labeled.LabeledDataConfig(max_train_per_source_score=100))
    groups = {}
    for e in capped["train"]:
        groups[(e.source, e.score)] = groups.get((e.source, e.score), 0) + 1
    assert max(groups.values()) == 100 and capped["test"] == splits["test"]
    assert [e.id for e in capped["train"]] == [e.id for e in labeled.load(
        labeled.LabeledDataConfig(max_train_per_source_score=100))[0]["train"]]
