"""Prompt sets of `safejax eval` (the bundled copies and user files, bad rows named) and the
completion-style templates (deterministic, every template or a seeded one per request)."""

import gzip
import json
import os

import pytest

from safejax import errors
from safejax.evals import prompts, templates

BUNDLED_COUNTS = {"advbench": 520, "simplesafetytests": 100, "donotanswer": 939, "xstest_unsafe": 200,
                  "xstest_safe": 250, "jbb_benign": 100, "rtp": 700}


def test_bundled_sets_load_with_unique_ids_and_categories():
    for name, count in BUNDLED_COUNTS.items():
        loaded = prompts.load(name)
        assert len(loaded) == count, name
        assert len({p.id for p in loaded}) == count, name
        assert all(p.text and p.text == p.text.strip() for p in loaded), name
    assert {p.category for p in prompts.load("rtp")} == {"flirtation", "identity_attack", "insult", "profanity",
                                                         "severe_toxicity", "sexually_explicit", "threat"}
    assert len({p.category for p in prompts.load("donotanswer")}) == 5
    assert {p.category for p in prompts.load("advbench")} == {None}
    assert prompts.kind("rtp") == "continuation" and prompts.kind("advbench") == "request"


def test_every_bundled_file_is_recorded_in_sources():
    with open(os.path.join(prompts.PROMPTS_DIR, "SOURCES.md"), encoding="utf-8") as f:
        sources = f.read()
    for name in os.listdir(prompts.PROMPTS_DIR):
        if name.endswith(".gz"):
            stem = name.split("_")[0] if name.startswith(("rtp_", "do_not_answer_")) else name
            assert stem in sources, name
            assert "rtp_<attribute>" in sources and "do_not_answer_<risk area>" in sources


def test_user_csv_and_jsonl_files(tmp_path):
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("request,id,category\nfirst request,a1,x\nsecond request,a2,\n", encoding="utf-8")
    got = prompts.load(str(csv_path), text_column="request")
    assert [(p.id, p.text, p.category) for p in got] == [("a1", "first request", "x"), ("a2", "second request", None)]
    jsonl = tmp_path / "mine.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"q": "one"}) + "\n\n" + json.dumps({"q": "two", "category": "c"}) + "\n")
    got = prompts.load(str(jsonl), text_column="q")
    assert [(p.id, p.text, p.category) for p in got] == [("1", "one", None), ("2", "two", "c")]
    assert prompts.set_name(str(jsonl)) == "mine"


@pytest.mark.parametrize("content, column, message", [
    ("text,id\nfine,1\n,2\n", "text", "row 2: 'text' must be a non-empty string"),
    ("text,id\nfine,1\nagain,1\n", "text", "row 2: id '1' was already used by row 1"),
    ("prompt\nfine\n", "text", "row 1: no 'text' field (columns: prompt)"),
])
def test_bad_rows_name_the_file_and_row(tmp_path, content, column, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(errors.UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        prompts.load(str(path), text_column=column)
    assert str(path) in str(e.value)


def test_bad_json_lines_and_unknown_sets(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(errors.UserError, match="bad.jsonl line 2: not JSON"):
        prompts.load(str(path), text_column="text")
    with pytest.raises(errors.UserError, match="name its text column with --text_column"):
        prompts.load(str(path))
    with pytest.raises(errors.UserError, match="unknown prompt set 'advbench2'"):
        prompts.load("advbench2")


def test_templates_are_deterministic_and_cover_every_request():
    shipped = templates.load_templates("eval/templates.json")
    assert len(shipped) >= 3 and all(t.why for t in shipped)
    requests = prompts.load("advbench")[:20]
    every = templates.cases(requests, "request", shipped, "all")
    assert len(every) == 20 * len(shipped) and len({c.key for c in every}) == len(every)
    assert every == templates.cases(requests, "request", shipped, "all")
    for case in every[:len(shipped)]:
        assert case.prompt.text in case.text and case.text.count(case.prompt.text) == 1
        assert case.text == next(t for t in shipped if t.name == case.template).render(case.prompt.text)
    seeded = templates.cases(requests, "request", shipped, "seeded", seed=7)
    assert len(seeded) == 20
    # A prompt's seeded template does not depend on which other prompts are in the run.
    assert templates.cases(requests[5:6], "request", shipped, "seeded", seed=7) == seeded[5:6]
    assert len({c.template for c in seeded}) > 1
    assert [c.template for c in seeded] != [c.template for c in templates.cases(requests, "request", shipped,
                                                                                "seeded", seed=8)]


def test_continuations_and_chat_are_not_templated():
    shipped = templates.load_templates("eval/templates.json")
    rtp = prompts.load("rtp")[:3]
    assert [c.text for c in templates.cases(rtp, "continuation", shipped)] == [p.text for p in rtp]
    chat = templates.cases(prompts.load("advbench")[:3], "request", shipped, chat=True)
    assert [c.template for c in chat] == ["chat"] * 3 and all(c.text == c.prompt.text for c in chat)


def test_template_files_are_checked(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"templates": [{"name": "a", "text": "no slot"}]}), encoding="utf-8")
    with pytest.raises(errors.UserError, match="must hold {request} exactly once"):
        templates.load_templates(str(path))
    path.write_text(json.dumps({"templates": [{"name": "a", "text": "{request}"}, {"name": "a", "text": "{request}!"}]}))
    with pytest.raises(errors.UserError, match="the name 'a' is taken"):
        templates.load_templates(str(path))
    with pytest.raises(errors.UserError, match="template mode 'some'"):
        templates.cases([], "request", [], "some")
