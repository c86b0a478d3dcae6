"""`safejax synth`: pieces, the template backend, strict reply parsing, the refusal check and the
gate, resumption, and the endpoint backend over real HTTP on 127.0.0.1 against a scripted server.

The scripted server answers from markers in the user message, so every retry and parse path is
known:
  [429]        first attempt: 429 with Retry-After: 1
  [500]        first attempt: 500
  [slow]       first attempt answers after the client's timeout
  [truncated]  first reply is cut off (finish_reason "length"); the repair request gets a whole one
  [garbage]    every reply unusable, the repair's too
  [unsafe]     the reply contains the word UNSAFE (the stub classifier scores it 4)
"""

import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import safety_fixtures as fx
from conftest import REPO
from safejax import cli, config, errors
from safejax.bench.local_chat import LocalChatServer, completion
from safejax.data import sources
from safejax.safety.openai_client import ChatEndpoint, Reply
from safejax.synth import gate, jobs, pieces, replies, run
from safejax.synth.template import TemplateBackend

MODEL = "synth-test"
KEY = "sk-synth-0123456789abcdef"
TIMEOUT_S = 1.0


# --- the scripted server -----------------------------------------------------------------------

def scripted_reply(system: str, user: str, repair: bool) -> tuple[str, str]:
    """(content, finish_reason) of a well-formed reply for the job the system message is for."""
    extra = " UNSAFE" if "[unsafe]" in user else ""
    if "training dialogues" in system:
        return json.dumps({"turns": [{"role": "user", "text": "Tell me how." + extra},
                                     {"role": "assistant", "text": "I can't help with that, but here is "
                                      "a safer idea." + extra}]}), "stop"
    if "educational article" in system:
        return f"# A principle\n\n## Why\n\nCare for others matters.{extra}", "stop"
    return f"A careful retelling of the piece.{extra}", "stop"


class ScriptedLLM:
    def __init__(self, delay_s: float = 0.0):
        self.lock = threading.Lock()
        self.attempts = collections.Counter()  # user message -> first-turn requests
        self.repairs = collections.Counter()
        self.delay_s, self.required_key = delay_s, None
        self.chat = LocalChatServer(self.answer)
        self.url = self.chat.url

    @property
    def requests(self) -> int:
        return sum(self.attempts.values()) + sum(self.repairs.values())

    def answer(self, body: dict, auth: str | None):
        if self.required_key and auth != f"Bearer {self.required_key}":
            return 401, {"error": {"message": "bad key"}}, {}, 0
        if body["model"] != MODEL:
            return 404, {"error": {"message": f"model {body['model']} not found"}}, {}, 0
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        repair = len(body["messages"]) > 2
        with self.lock:
            counter = self.repairs if repair else self.attempts
            counter[user] += 1
            n = counter[user]
        if "[429]" in user and n == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}, 0
        if "[500]" in user and n == 1:
            return 500, {"error": {"message": "oops"}}, {}, 0
        content, finish = scripted_reply(system, user, repair)
        if "[garbage]" in user:
            content = "{not what was asked"
        elif "[truncated]" in user and not repair:
            finish = "length"
        delay = 2 * TIMEOUT_S if "[slow]" in user and n == 1 else self.delay_s
        usage = {"prompt_tokens": 10, "completion_tokens": 5}
        return 200, completion(content, finish, model=body["model"], usage=usage), {}, delay


@pytest.fixture
def fake():
    server = ScriptedLLM()
    yield server
    server.chat.close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("SAFEJAX_SYNTH_API_KEY", raising=False)


# --- helpers ------------------------------------------------------------------------------------

def _docs(path, docs) -> str:
    """docs: (id, text, score) triples, written as records carrying their own score."""
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text, score in docs:
            f.write(json.dumps({"id": doc_id, "text": text, "score": score}) + "\n")
    return str(path)


def _neutral_docs(n: int, score: int = 2, seed: int = 0):
    rng = random.Random(seed)
    return [(f"doc-{i}", "\n\n".join(" ".join(fx.sentence(rng, rng.randint(6, 12)) for _ in range(3))
                                     for _ in range(2)), score) for i in range(n)]


def _read(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.endswith("\n")]


def _settings(job, backend="template", endpoint=None, **cfg):
    config.parse(["synth/default.gin"], [])
    settings = run.settings_from_gin(job, None)
    cfg = run.SynthConfig(**{"backend": backend, "progress_bar": False, "role_pairs": settings.cfg.role_pairs, **cfg})
    return run.Settings(job, cfg, endpoint, None)


def _endpoint(fake, **overrides) -> ChatEndpoint:
    return ChatEndpoint(**{"base_url": fake.url, "model": MODEL, "timeout_s": TIMEOUT_S, "max_retries": 3,
                           "backoff_base_s": 0.001, "backoff_max_s": 0.01, "retry_after_max_s": 0.05, **overrides})


def _synth(job, inputs, out, backend="template", endpoint=None, scorer=None, **cfg):
    settings = _settings(job, backend, endpoint, **cfg)
    return run.synthesize(settings, inputs, str(out), run.Producer(settings, scorer=scorer))


class StubScorer:
    """Scores 4 any text with the word UNSAFE in it, else 0 (the gate's plumbing, not a model)."""

    def score(self, texts):
        return [type("Doc", (), {"score": 4 if "UNSAFE" in t else 0}) for t in texts]


# --- pieces, parsing, the refusal check ---------------------------------------------------------

def test_pieces_are_cut_at_paragraph_then_sentence_boundaries():
    paragraphs = ["First sentence here. Second one follows.", "A new paragraph. " * 12, "Short end."]
    text = "\n\n".join(p.strip() for p in paragraphs)
    out = pieces.cut(text, 80)
    assert all(len(p) <= 80 for p in out)
    assert out[0] == "First sentence here. Second one follows."
    assert all(p.endswith(".") for p in out)  # no sentence is split
    assert " ".join(" ".join(p.split()) for p in out) == " ".join(text.split())
    assert pieces.cut(text, 0) == [text] and pieces.cut("   ", 50) == []
    assert pieces.cut("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


@pytest.mark.parametrize("reply,expected", [
    ('{"turns": [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}]}', 2),
    ('```json\n{"turns": [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}]}\n```', 2),
    ('{"turns": [{"role": "user", "text": "q"}]}', "at least two turns"),
    ('{"turns": [{"role": "assistant", "text": "a"}, {"role": "user", "text": "q"}]}', "must be the user's"),
    ('{"turns": [{"role": "user", "text": "q"}, {"role": "assistant", "text": " "}]}', "turn 1 has no text"),
    ('{"turns": [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}, '
     '{"role": "user", "text": "q"}]}', "must end with the assistant"),
    ('{"turns": [], "note": 1}', 'exactly the object {"turns"'),
    ("User: q\nAssistant: a", "not JSON"),
])
def test_dialogue_replies_are_parsed_strictly(reply, expected):
    if isinstance(expected, int):
        assert len(replies.parse_dialogue(Reply(reply, "stop"))) == expected
    else:
        with pytest.raises(replies.InvalidOutput, match=re.escape(expected)):
            replies.parse_dialogue(Reply(reply, "stop"))


def test_empty_truncated_and_headless_replies_are_invalid():
    with pytest.raises(replies.InvalidOutput, match="empty"):
        replies.PARSERS["rephrase"](Reply("  ", "stop"))
    with pytest.raises(replies.InvalidOutput, match="finish_reason length"):
        replies.PARSERS["rephrase"](Reply("A text that goes on and", "length"))
    with pytest.raises(replies.InvalidOutput, match="no '# ' title"):
        replies.parse_article(Reply("Just prose.", "stop"))
    with pytest.raises(replies.InvalidOutput, match="no '## ' section"):
        replies.parse_article(Reply("# Title\n\nProse only.", "stop"))
    assert replies.parse_article(Reply("# T\n\n## S\n\nBody.", "stop")).startswith("# T")


@pytest.mark.parametrize("answer,problem", [
    ("I can't help with that. A counsellor can.", None),
    ("I\u2019m not able to help with this one.", None),
    ("That is not something I can help with.", None),
    ("Sure! Here's how it works.", "does not refuse"),
    ("I can't give everything, but step 1: buy the parts.", "step-by-step"),
    ("I won't do all of it.\n1. First you take", "step-by-step"),
])
def test_refusal_check(answer, problem):
    found = replies.refusal_problem([{"role": "user", "text": "q"}, {"role": "assistant", "text": answer}])
    assert (found is None) if problem is None else (problem in found)


def test_every_template_refusal_wording_passes_the_refusal_check():
    words = TemplateBackend().words
    for refuse in words["refuse"] + words["hold"]:
        assert replies.refusal_problem([{"role": "user", "text": "q"}, {"role": "assistant", "text": refuse}]) is None


# --- the template backend -----------------------------------------------------------------------

def test_template_backend_is_deterministic_and_writes_what_the_tasks_read(tmp_path):
    docs = _neutral_docs(6, score=2) + [("harm-0", "They planned to attack the bridge with a bomb.", 5),
                                        ("harm-1", "Plain words about a river and a garden.", 4)]
    inputs = [_docs(tmp_path / "in.jsonl", docs)]
    outputs = []
    for attempt in ("a", "b"):
        rephrased = _synth("rephrase", inputs, tmp_path / attempt / "r", piece_chars=120)
        refused = _synth("refuseweb", inputs, tmp_path / attempt / "w")
        moral = _synth("moral", [str(tmp_path / attempt / "w")], tmp_path / attempt / "m")
        outputs.append([open(s["output"]).read() for s in (rephrased, refused, moral)])
    assert outputs[0] == outputs[1]
    assert (rephrased["kept"], refused["kept"], moral["kept"]) == (rephrased["items"], 2, 2)
    assert rephrased["items"] > 6  # long documents became several pieces

    for summary, kind in ((rephrased, "text"), (refused, "dialogue"), (moral, "text")):
        path = summary["output"]
        for line_no, line in enumerate(open(path, "rb"), start=1):
            assert sources.parse_json_line(line.rstrip(b"\n"), path, line_no, kind) is not None
    records = {r["provenance"]["source_id"]: r for r in _read(refused["output"])}
    assert records["harm-0"]["provenance"]["category"] in ("weapons", "violence")
    assert set(records["harm-0"]["roles"]) == {"user", "assistant"}
    assert replies.refusal_problem(records["harm-0"]["turns"]) is None
    [article] = [r for r in _read(moral["output"]) if r["provenance"]["source_id"] == records["harm-0"]["id"]]
    assert article["text"].startswith("# ") and "\n## " in article["text"]
    styles = {r["provenance"]["style"] for r in _read(rephrased["output"])}
    assert styles <= set(run.STYLES) and len(styles) >= 2
    for record in _read(rephrased["output"]):
        provenance = record["provenance"]
        assert set(provenance) == {"source_id", "piece", "pieces", "kind", "style", "category", "backend", "model",
                                   "prompt_sha", "score_before", "score_after", "repaired", "tokens_in",
                                   "tokens_out", "key"}
        assert (provenance["backend"], provenance["score_before"], provenance["kind"]) == ("template", 2, "rephrased")
        assert record["id"] == f"rephrased:{provenance['source_id']}:{provenance['piece']}"
        assert provenance["key"] == jobs.cache_key(provenance["prompt_sha"], "template", "template",
                                                   provenance["source_id"], provenance["piece"])


def test_template_rephrase_keeps_only_sentences_judged_safe(tmp_path):
    text = "The garden was quiet in the early morning. He said he would attack them with a gun tomorrow."
    backend = TemplateBackend()
    item = jobs.Item("k", "d", 0, 1, text, 2, style="textbook")
    out = backend.produce("rephrase", item).output
    assert "quiet in the early morning" in out and "gun" not in out
    judged = TemplateBackend(safe_sentences=lambda sentences: [False] * len(sentences)).produce("rephrase", item)
    assert judged.output is None and "no sentence" in judged.error


class RecordingScorer(StubScorer):
    def __init__(self):
        self.calls = []

    def score(self, texts):
        self.calls.append(len(texts))
        return super().score(texts)


def test_template_rephrase_judges_the_sentences_of_gate_batch_pieces_in_one_call(tmp_path):
    inputs = [_docs(tmp_path / "in.jsonl", _neutral_docs(10))]
    one_by_one, batched = RecordingScorer(), RecordingScorer()
    _synth("rephrase", inputs, tmp_path / "one", scorer=one_by_one, gate_batch=1)
    _synth("rephrase", inputs, tmp_path / "batched", scorer=batched, gate_batch=4)
    texts = lambda out: [(r["id"], r["text"]) for r in _read(tmp_path / out / "rephrased.jsonl")]
    assert len(texts("batched")) == 10 and texts("batched") == texts("one")
    assert len(one_by_one.calls) == 20  # each piece's sentences, then its output
    assert len(batched.calls) == 6 and sum(batched.calls) == sum(one_by_one.calls)  # 3 chunks (4, 4, 2), twice


def test_the_gate_rejects_an_unsafe_output_and_says_why(fake, tmp_path):
    docs = [("ok", "plain text", 2), ("bad", "plain text [unsafe]", 3)]
    summary = _synth("rephrase", [_docs(tmp_path / "in.jsonl", docs)], tmp_path / "out", "endpoint",
                     _endpoint(fake), scorer=StubScorer())
    assert (summary["kept"], summary["rejected"]) == (1, 1)
    assert summary["score_after"] == {"0": 1, "4": 1} and summary["score_before"] == {"2": 1, "3": 1}
    [rejected] = _read(tmp_path / "out" / "rejected.jsonl")
    assert rejected["provenance"]["source_id"] == "bad" and rejected["score"] == 4
    assert rejected["rejected"] == "classifier score 4 >= 2"
    [kept] = _read(tmp_path / "out" / "rephrased.jsonl")
    assert kept["provenance"]["score_after"] == 0
    assert gate.Gate(StubScorer(), 3).judge("refuseweb", [jobs.Outcome([
        {"role": "user", "text": "UNSAFE request"}, {"role": "assistant", "text": "I can't help."}])]) == [(0, None)]


# --- the endpoint backend -----------------------------------------------------------------------

def test_endpoint_retries_repairs_and_keeps_invalid_replies(fake, tmp_path):
    docs = [("rate", "[429] text", 4), ("error", "[500] text", 4), ("slow", "[slow] text", 5),
            ("cut", "[truncated] text", 4), ("junk", "[garbage] text", 5), ("low", "plain", 0)]
    summary = _synth("refuseweb", [_docs(tmp_path / "in.jsonl", docs)], tmp_path / "out", "endpoint",
                     _endpoint(fake), concurrency=2)
    assert (summary["kept"], summary["invalid"], summary["failed"], summary["out_of_range"]) == (4, 1, 0, 1)
    kept = {r["provenance"]["source_id"]: r for r in _read(tmp_path / "out" / "refuseweb.jsonl")}
    assert set(kept) == {"rate", "error", "slow", "cut"} and kept["cut"]["provenance"]["repaired"]
    assert kept["rate"]["provenance"]["tokens_in"] == 10 and summary["tokens_out"] == 5 * 7  # 5 replies and 2 repairs
    [invalid] = _read(tmp_path / "out" / "invalid.jsonl")
    assert (invalid["source_id"], invalid["raw"], invalid["repair_raw"]) == ("junk", "{not what was asked",
                                                                             "{not what was asked")
    users = {m: n for m, n in fake.attempts.items()}
    assert sorted(users.values()) == [1, 1, 2, 2, 2]  # 429, 500 and the timeout were each retried once
    assert sum(fake.repairs.values()) == 2  # the truncated and the garbage replies
    assert summary["requests"] == fake.requests == 10


def test_concurrency_is_requests_in_flight(fake, tmp_path):
    fake.delay_s = 0.5  # long enough that all 4 overlap on a busy 2-core machine (xdist's other worker)
    summary = _synth("refuseweb", [_docs(tmp_path / "in.jsonl", _neutral_docs(12, score=4))], tmp_path / "out",
                     "endpoint", _endpoint(fake), concurrency=4)
    assert summary["kept"] == 12 and fake.chat.max_active == 4


def test_rerun_sends_only_what_is_missing_and_refuses_another_model(fake, tmp_path):
    inputs = [_docs(tmp_path / "in.jsonl", _neutral_docs(5, score=4) + [("junk", "[garbage]", 4)])]
    out = tmp_path / "out"
    first = _synth("refuseweb", inputs, out, "endpoint", _endpoint(fake), concurrency=1)
    assert (first["kept"], first["invalid"]) == (5, 1)
    sent = fake.requests
    again = _synth("refuseweb", inputs, out, "endpoint", _endpoint(fake), concurrency=1)
    assert (again["cached"], again["requests"], again["kept"]) == (6, 0, 5) and fake.requests == sent

    path = out / "refuseweb.jsonl"
    last = _read(path)[-1]["provenance"]["source_id"]
    with open(path, "rb+") as f:  # a kill in the middle of the last line
        f.truncate(os.path.getsize(path) - 7)
    torn = _synth("refuseweb", inputs, out, "endpoint", _endpoint(fake), concurrency=1)
    assert (torn["this_run"]["kept"], torn["requests"]) == (1, 1)
    ids = [r["id"] for r in _read(path)]
    assert len(ids) == len(set(ids)) == 5 and f"refuseweb:{last}:0" in ids

    with pytest.raises(errors.UserError, match="made with model='synth-test'"):
        _synth("refuseweb", inputs, out, "endpoint", _endpoint(fake, model="other"))
    with pytest.raises(errors.UserError, match="made with backend='endpoint'"):
        _synth("refuseweb", inputs, out)


@pytest.mark.slow
def test_a_killed_run_resumes_with_no_loss_and_no_duplicate(fake, tmp_path):
    fake.delay_s = 0.1
    docs = _neutral_docs(30, score=2)
    inputs = _docs(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"
    script = ("import sys; from safejax import cli; sys.exit(cli.main(['synth', 'rephrase', '--input', sys.argv[1], "
              "'--output', sys.argv[2], '--backend', 'endpoint', '--base_url', sys.argv[3], '--model', "
              f"{MODEL!r}, '--concurrency', '2', '--gin.SynthConfig.progress_bar=False']))")
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-c", script, inputs, str(out), fake.url], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = out / "rephrased.jsonl"
    deadline = time.time() + 120
    while len(_read(path)) < 4:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {r["provenance"]["source_id"] for r in _read(path)}
    assert 4 <= len(finished) < len(docs)
    summary = _synth("rephrase", [inputs], out, "endpoint", _endpoint(fake, temperature=0.7))  # as default.gin
    assert summary["cached"] == len(finished) and summary["this_run"]["kept"] == len(docs) - len(finished)
    ids = [r["id"] for r in _read(path)]
    assert sorted(ids) == sorted(f"rephrased:{d[0]}:0" for d in docs)
    sent = {doc_id: n for doc_id, text, _ in docs for m, n in fake.attempts.items() if m.endswith(text)}
    assert all(sent[doc_id] == 1 for doc_id in finished)  # nothing finished was paid for twice


# --- the command line ---------------------------------------------------------------------------

def _cli(job, inputs, out, *extra):
    return cli.main(["synth", job, "--input", *inputs, "--output", str(out), "--gin.SynthConfig.progress_bar=False",
                     "--gin.ChatEndpoint.backoff_base_s=0.001", *extra])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_quarantines_bad_lines_and_keeps_the_key_secret(fake, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("SAFEJAX_SYNTH_API_KEY", KEY)
    fake.required_key = KEY
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([json.dumps({"id": "a", "text": "[429] words", "score": 2}), "{broken",
                               json.dumps({"id": "b", "text": "no score here"}),
                               json.dumps({"id": "c", "text": "fine", "score": 3})]) + "\n")
    out = tmp_path / "out"
    assert _cli("rephrase", [str(path)], out, "--backend", "endpoint", "--base_url", fake.url, "--model", MODEL) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["kept"], summary["bad_input"], summary["inputs"]) == (2, 2, 4)
    quarantined = sorted((q["line"], q["reason"]) for q in _read(out / "quarantine.jsonl"))
    assert quarantined == [(2, "bad_json"), (3, "no_score")]
    assert json.load(open(out / "summary.json")) == summary
    assert fake.chat.auth == {f"Bearer {KEY}"} and "429" in caplog.text
    written = caplog.text + "".join(open(os.path.join(d, f), errors="replace").read()
                                    for d, _, names in os.walk(out) for f in names)
    assert KEY not in written


@pytest.mark.parametrize("case,message", [
    ("unreachable", "cannot reach http://127.0.0.1:{port}/v1/chat/completions after 2 attempts"),
    ("wrong key", "refused model 'synth-test': HTTP 401"),
    ("unknown model", "refused model 'nope': HTTP 404"),
    ("nothing in range", "no documents scored 4-5 in {inputs}"),
    ("empty split folders", "no documents scored 4-5 in {split}"),
    ("other directory", "is another directory"),
])
def test_cli_errors_are_one_line(fake, tmp_path, monkeypatch, capsys, case, message):
    inputs = [_docs(tmp_path / "in.jsonl", [("a", "text", 2)])]
    url, model, job, extra, fmt = fake.url, MODEL, "rephrase", [], {"inputs": inputs[0]}
    if case == "unreachable":
        url = f"http://127.0.0.1:{_closed_port()}/v1"
        fmt["port"] = url.split(":")[2].split("/")[0]
    elif case == "wrong key":
        monkeypatch.setenv("SAFEJAX_SYNTH_API_KEY", "sk-wrong-key")
        fake.required_key = KEY
    elif case == "unknown model":
        model = "nope"
    elif case == "nothing in range":
        job = "refuseweb"
    elif case == "empty split folders":
        split = tmp_path / "split"
        for s in range(6):
            os.makedirs(split / f"score_{s}")
            (split / f"score_{s}" / "part-00000-of-00001.jsonl.gz").write_bytes(b"")
        (split / "manifest.json").write_text("{}")
        inputs, job, fmt["split"] = [str(split)], "refuseweb", str(split)
    elif case == "other directory":
        inputs = [str(tmp_path)]
    code = _cli(job, inputs, tmp_path / "out", "--backend", "endpoint", "--base_url", url, "--model", model,
                "--max_retries", "1", *extra)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("safejax: error: ") and message.format(**fmt) in err[-1]
    assert "sk-wrong-key" not in err[-1]


def test_cli_refuses_unknown_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["synth", "rephrase", "--input", "x", "--output", "y", "--no_such_flag"])
    assert e.value.code == 2 and "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["synth", "summarize", "--input", "x", "--output", "y"])


def test_the_client_is_not_the_bottleneck(tmp_path):
    """`safejax bench synth`'s endpoint half: 32 requests in flight against a 200 ms server are
    far faster than one (the issue's target is 20x; 10x here leaves room for a loaded CI host)."""
    from safejax.bench import synth as bench

    config.parse(["synth/default.gin"], [])
    server = bench.fixed_delay_server(0.2)
    try:
        c1 = bench.endpoint_rate(server.url, 1, 4, str(tmp_path))
        c32 = bench.endpoint_rate(server.url, 32, 128, str(tmp_path))
    finally:
        server.close()
    assert c1 < 5.5 and c32 >= 10 * c1, (c1, c32)
