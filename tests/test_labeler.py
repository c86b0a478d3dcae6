"""`safejax label` against a real HTTP server on 127.0.0.1 that speaks the chat-completions API.

The server answers from markers in each text, so every retry and parse path is scripted:
  score=N   a valid reply gives score N (default 0)
  [429]     first attempt: 429 with Retry-After: 1
  [500x2]   first two attempts: 500
  [slow]    first attempt answers after the client's timeout
  [down]    every attempt: 500, while the server's `down` is set
  [fence]   the JSON comes in a markdown code fence (accepted as is)
  [prose]   first reply is prose; the repair request gets valid JSON
  [garbage] every reply invalid, the repair's too
"""

import collections
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from safejax import cli, errors
from safejax.bench.local_chat import LocalChatServer, completion
from safejax.safety import labeler
from safejax.safety.openai_client import ChatClient, ChatEndpoint, RequestFailed, parse_retry_after

MODEL = "rubric-test"
KEY = "sk-test-0123456789abcdef"
TIMEOUT_S = 1.0
SLOW_S = 2.0


class FakeLLM:
    """Deterministic answers; counts requests per text and the requests in flight at once."""

    def __init__(self, delay_s: float = 0.0):
        self.lock = threading.Lock()
        self.attempts = collections.Counter()  # text -> first-turn requests (retries included)
        self.repairs = collections.Counter()  # text -> repair requests
        self.settings = set()  # (model, temperature, max_tokens, response_format) of each request
        self.delay_s, self.down, self.required_key = delay_s, True, None
        self.chat = LocalChatServer(self.answer)
        self.url = self.chat.url

    @property
    def requests(self) -> int:
        return sum(self.attempts.values()) + sum(self.repairs.values())

    def answer(self, body: dict, auth: str | None) -> tuple[int, dict, dict, float]:
        messages = body["messages"]
        text, repair = messages[1]["content"], len(messages) > 2
        with self.lock:
            self.settings.add((body["model"], body["temperature"], body["max_tokens"],
                               json.dumps(body.get("response_format"))))
        if self.required_key and auth != f"Bearer {self.required_key}":
            return 401, {"error": {"message": f"Incorrect API key provided: {auth}"}}, {}, 0
        with self.lock:
            counter = self.repairs if repair else self.attempts
            counter[text] += 1
            n = counter[text]
        error = {"error": {"message": "scripted"}}
        if "[429]" in text and n == 1:
            return 429, error, {"Retry-After": "1"}, 0
        if ("[500x2]" in text and n <= 2) or ("[down]" in text and self.down):
            return 500, error, {}, 0
        delay = SLOW_S if "[slow]" in text and n == 1 else self.delay_s
        score = int(re.search(r"score=(\d)", text).group(1)) if "score=" in text else 0
        content = json.dumps({"score": score, "reason": f"scripted {score}"})
        if "[garbage]" in text:
            content = '{"score": 7, "reason": "off the scale"}' if repair else "score: high"
        elif "[prose]" in text and not repair:
            content = f"I would rate this a {score}."
        elif "[fence]" in text:
            content = f"```json\n{content}\n```"
        return 200, completion(content, model=body["model"]), {}, delay


@pytest.fixture
def fake():
    server = FakeLLM()
    yield server
    server.chat.close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("SAFEJAX_LABEL_API_KEY", raising=False)


def _write_docs(path, docs) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return str(path)


def _read(path) -> list[dict]:
    """Whole lines only: a killed writer may leave a torn last line."""
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.endswith("\n")]


def _client(fake, sleep=None, **overrides) -> ChatClient:
    settings = dict(base_url=fake.url, model=MODEL, timeout_s=TIMEOUT_S, max_retries=3,
                    backoff_base_s=0.001, backoff_max_s=0.01)
    return ChatClient(ChatEndpoint(**{**settings, **overrides}), sleep=sleep)


def _label(fake, tmp_path, docs, client=None, **cfg):
    files = [_write_docs(tmp_path / "docs.jsonl", docs)]
    out = str(tmp_path / "out")
    summary = labeler.label_files(files, out, client or _client(fake),
                                  labeler.LabelConfig(**{"progress_bar": False, **cfg}))
    return summary, out


@pytest.mark.parametrize("reply,expected", [
    ('{"score": 3, "reason": "group insult"}', (3, "group insult")),
    ('  \n{"reason": " r ", "score": 0}\n', (0, "r")),
    ('```json\n{"score": 5, "reason": "threat"}\n```', (5, "threat")),
    ('{"score": 6, "reason": "r"}', "score must be an integer from 0 to 5, got 6"),
    ('{"score": "3", "reason": "r"}', 'got "3"'),
    ('{"score": 3.0, "reason": "r"}', "got 3.0"),
    ('{"score": true, "reason": "r"}', "got true"),
    ('{"score": 1, "reason": ""}', "reason must be a non-empty string"),
    ('{"score": 1, "reason": "r", "tags": []}', 'exactly the keys "score" and "reason"'),
    ('{"score": 1, "score": 2, "reason": "r"}', "duplicate keys"),
    ('[1, "r"]', "expected a JSON object"),
    ("Score: 2. Reason: mild", "not JSON"),
    ('Here it is: {"score": 1, "reason": "r"}', "not JSON"),
])
def test_parse_reply_takes_only_the_exact_object(reply, expected):
    if isinstance(expected, tuple):
        assert labeler.parse_reply(reply) == expected
    else:
        with pytest.raises(labeler.InvalidReply, match=re.escape(expected)):
            labeler.parse_reply(reply)


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Sat, 28 Nov 2026 10:00:30 GMT", now=1795860000.0) == 30.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_labels_repairs_and_keeps_invalid_replies(fake, tmp_path):
    docs = [("a", "plain score=0"), ("b", "plain score=3"), ("c", "[fence] score=4"),
            ("d", "[prose] score=2"), ("e", "[garbage]"), ("long", "x" * 40 + " score=5")]
    summary, out = _label(fake, tmp_path, docs, max_text_chars=40)

    assert {k: summary[k] for k in ("labeled", "repaired", "invalid", "failed", "cached")} == \
        {"labeled": 5, "repaired": 1, "invalid": 1, "failed": 0, "cached": 0}
    assert summary["scores"] == {"0": 2, "1": 0, "2": 1, "3": 1, "4": 1, "5": 0}
    labels = {r["id"]: r for r in _read(os.path.join(out, "labels.jsonl"))}
    assert {i: r["score"] for i, r in labels.items()} == {"a": 0, "b": 3, "c": 4, "d": 2, "long": 0}
    assert fake.attempts["Text to rate:\n\n" + "x" * 40] == 1  # sent cut to max_text_chars, stored whole
    assert fake.settings == {(MODEL, 0.0, 256, "null")}
    prompt_sha = labeler.Prompt.from_config(labeler.LabelConfig()).sha
    for doc_id, text in docs[:4] + docs[5:]:
        record = labels[doc_id]
        assert set(record) == {"id", "text", "score", "reason", "model", "prompt_sha", "key"}
        assert (record["text"], record["model"], record["prompt_sha"]) == (text, MODEL, prompt_sha)
        assert record["key"] == labeler.cache_key(prompt_sha, MODEL, text)
    [invalid] = _read(os.path.join(out, "invalid.jsonl"))
    assert (invalid["id"], invalid["raw"], invalid["repair_raw"]) == \
        ("e", "score: high", '{"score": 7, "reason": "off the scale"}')
    assert "score must be an integer from 0 to 5" in invalid["error"]
    assert fake.repairs == {"Text to rate:\n\n[prose] score=2": 1, "Text to rate:\n\n[garbage]": 1}


def test_retries_429_500_and_timeouts(fake, tmp_path):
    sleeps = []
    docs = [("rate", "[429] score=1"), ("error", "[500x2] score=2"), ("slow", "[slow] score=3")]
    client = _client(fake, sleep=sleeps.append, json_mode=True)
    summary, out = _label(fake, tmp_path, docs, client=client, concurrency=1)
    assert fake.settings == {(MODEL, 0.0, 256, '{"type": "json_object"}')}

    assert (summary["labeled"], summary["failed"]) == (3, 0)
    assert {r["id"]: r["score"] for r in _read(os.path.join(out, "labels.jsonl"))} == \
        {"rate": 1, "error": 2, "slow": 3}
    assert [fake.attempts[f"Text to rate:\n\n{text}"] for _, text in docs] == [2, 3, 2]
    assert summary["requests"] == 7
    # Retry-After is obeyed; otherwise the n-th retry waits in [base * 2**n / 2, base * 2**n].
    assert sleeps[0] == 1.0
    assert 0.0005 <= sleeps[1] <= 0.001 and 0.001 <= sleeps[2] <= 0.002 and 0.0005 <= sleeps[3] <= 0.001


def test_stop_ends_a_backoff_at_once(fake):
    client = _client(fake, max_retries=5, backoff_base_s=30.0, backoff_max_s=30.0)
    threading.Timer(0.3, client.stop).start()
    start = time.time()
    with pytest.raises(RequestFailed, match=r"HTTP 500.*\(stopped before retry 1\)"):
        client.complete([{"role": "system", "content": "s"}, {"role": "user", "content": "[down]"}])
    assert time.time() - start < 5 and fake.requests == 1


def test_failed_texts_are_recorded_and_retried_by_a_rerun(fake, tmp_path):
    docs = [("ok", "plain"), ("down", "[down] score=5")]
    summary, out = _label(fake, tmp_path, docs, client=_client(fake, max_retries=2))
    assert (summary["labeled"], summary["failed"]) == (1, 1)
    assert fake.attempts["Text to rate:\n\n[down] score=5"] == 3
    [failed] = _read(os.path.join(out, "failed.jsonl"))
    assert failed["id"] == "down" and "HTTP 500" in failed["error"] and "3 attempts" in failed["error"]

    fake.down = False
    summary, out = _label(fake, tmp_path, docs)
    assert (summary["labeled"], summary["cached"], summary["failed"], summary["requests"]) == (1, 1, 0, 1)
    assert _read(os.path.join(out, "failed.jsonl")) == []
    assert sorted(r["id"] for r in _read(os.path.join(out, "labels.jsonl"))) == ["down", "ok"]


def test_too_many_failures_in_a_row_stop_the_run(fake, tmp_path):
    docs = [(str(i), f"[down] {i}") for i in range(6)]
    with pytest.raises(errors.UserError, match="3 texts in a row failed, the last with: HTTP 500"):
        _label(fake, tmp_path, docs, client=_client(fake, max_retries=0), concurrency=1,
               max_consecutive_failures=3)
    assert fake.requests <= 4  # the 3 failures and at most one text already queued (2 x concurrency)


def test_concurrency_is_bounded(fake, tmp_path):
    fake.delay_s = 0.2
    summary, _ = _label(fake, tmp_path, [(str(i), f"text {i}") for i in range(12)], concurrency=3)
    assert summary["labeled"] == 12
    assert fake.chat.max_active == 3


def test_rerun_sends_nothing_already_labeled(fake, tmp_path):
    # One request at a time, so labels.jsonl ends with d5 (a text of its own).
    docs = [(f"d{i}", f"text {i} score={i % 6}") for i in range(6)]
    docs[2:2] = [("copy", "text 1 score=1")]
    docs[5:5] = [("bad", "[garbage]")]
    first, out = _label(fake, tmp_path, docs, concurrency=1)
    assert (first["labeled"] + first["cached"], first["invalid"]) == (7, 1)
    assert fake.attempts["Text to rate:\n\ntext 1 score=1"] == 1  # d1 and copy share one request
    labels_path = os.path.join(out, "labels.jsonl")
    requests = fake.requests

    again, _ = _label(fake, tmp_path, docs, concurrency=1)
    assert (again["cached"], again["skipped_invalid"], again["labeled"], again["requests"]) == (7, 1, 0, 0)
    assert fake.requests == requests
    assert len(_read(labels_path)) == 7

    # A run killed in the middle of a line: the torn line is cut off and only that text is sent again.
    assert _read(labels_path)[-1]["id"] == "d5"
    with open(labels_path, "rb+") as f:
        f.truncate(os.path.getsize(labels_path) - 10)
    torn, _ = _label(fake, tmp_path, docs, concurrency=1)
    assert (torn["labeled"], torn["cached"], torn["requests"]) == (1, 6, 1)
    assert sorted(r["id"] for r in _read(labels_path)) == sorted(i for i, _ in docs if i != "bad")

    with pytest.raises(errors.UserError, match="holds labels made with model='rubric-test'"):
        _label(fake, tmp_path, docs, client=_client(fake, model="another-model"))


@pytest.mark.slow
def test_killed_run_loses_no_finished_label(fake, tmp_path):
    fake.delay_s = 0.15
    docs = [(f"d{i}", f"text {i}") for i in range(30)]
    files = _write_docs(tmp_path / "docs.jsonl", docs)
    out = str(tmp_path / "out")
    script = ("import sys; from safejax.safety import labeler as L, openai_client as C; "
              "L.label_files([sys.argv[1]], sys.argv[2], C.ChatClient(C.ChatEndpoint(base_url=sys.argv[3], "
              f"model={MODEL!r})), L.LabelConfig(concurrency=2, progress_bar=False))")
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-c", script, files, out, fake.url], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    labels_path = os.path.join(out, "labels.jsonl")
    deadline = time.time() + 120
    while len(_read(labels_path)) < 4:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {r["text"] for r in _read(labels_path)}
    assert 4 <= len(finished) < len(docs)

    summary, _ = _label(fake, tmp_path, docs)
    assert summary["cached"] == len(finished) and summary["labeled"] == len(docs) - len(finished)
    ids = [r["id"] for r in _read(labels_path)]
    assert sorted(ids) == sorted(i for i, _ in docs)  # each exactly once
    assert all(fake.attempts[f"Text to rate:\n\n{text}"] == 1 for text in finished)


# ---- the command line ----

def _cli(fake_url, out, inputs, *extra):
    return cli.main(["label", "--input", *inputs, "--output", str(out), "--base_url", fake_url,
                     "--model", MODEL, "--concurrency", "2", "--timeout_s", "5",
                     "--gin.ChatEndpoint.backoff_base_s=0.001", "--gin.ChatEndpoint.retry_after_max_s=0.01",
                     "--gin.LabelConfig.progress_bar=False", *extra])


def test_cli_labels_quarantines_bad_lines_and_keeps_the_key_secret(fake, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("SAFEJAX_LABEL_API_KEY", KEY)
    fake.required_key = KEY
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": "a", "text": "[429] score=2"}), "{not json", json.dumps({"id": "b"}),
             json.dumps({"id": "c", "text": "  "}), json.dumps({"id": "d", "text": "[garbage]"}),
             json.dumps({"text": "no id score=4"})]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    assert _cli(fake.url, out, [str(path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("inputs", "labeled", "invalid", "bad_input", "failed")} == \
        {"inputs": 6, "labeled": 2, "invalid": 1, "bad_input": 3, "failed": 0}
    assert {r["id"]: r["score"] for r in _read(out / "labels.jsonl")} == {"a": 2, "in.jsonl:6": 4}
    quarantined = sorted((q["line"], q["reason"]) for q in _read(out / "quarantine.jsonl"))
    assert quarantined == [(2, "bad_json"), (3, "missing_text"), (4, "empty_text")]
    assert all(q["file"] == str(path) for q in _read(out / "quarantine.jsonl"))
    assert json.load(open(out / "summary.json")) == summary

    assert fake.chat.auth == {f"Bearer {KEY}"}
    assert "429" in caplog.text  # the retry was logged, without the key
    outputs = caplog.text + "".join(open(os.path.join(d, f), errors="replace").read()
                                    for d, _, names in os.walk(out) for f in names)
    assert KEY not in outputs


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case,code,message", [
    ("unreachable", 2, "cannot reach http://127.0.0.1:{port}/v1/chat/completions after 2 attempts: "
                       "ConnectionRefusedError"),
    ("wrong key", 2, "refused model 'rubric-test': HTTP 401: "),
    ("other model", 2, "holds labels made with model='rubric-test', this run has model='other'"),
    ("failing", 1, "1 texts failed (see {out}/failed.jsonl); rerun the same command"),
    ("no input", 2, "corpus file not found: {tmp}/missing*.jsonl"),
    ("truncated gzip", 2, "cannot read {tmp}/in.jsonl.gz: EOFError"),
])
def test_cli_errors(fake, tmp_path, monkeypatch, capsys, case, code, message):
    inputs = [_write_docs(tmp_path / "in.jsonl", [("a", "plain"), ("b", "[down]")])]
    out, url, extra = tmp_path / "out", fake.url, ["--max_retries", "1"]
    fake.down = case == "failing"
    if case == "unreachable":
        url = f"http://127.0.0.1:{_closed_port()}/v1"
        message = message.format(port=url.split(":")[2].split("/")[0])
    elif case == "wrong key":
        monkeypatch.setenv("SAFEJAX_LABEL_API_KEY", "sk-wrong-key")
        fake.required_key = KEY
    elif case == "other model":
        assert _cli(url, out, inputs) == 0
        extra += ["--model", "other"]
    elif case == "no input":
        inputs = [str(tmp_path / "missing*.jsonl")]
    elif case == "truncated gzip":
        inputs = [str(tmp_path / "in.jsonl.gz")]
        with open(inputs[0], "wb") as f:
            f.write(gzip.compress(open(tmp_path / "in.jsonl", "rb").read() * 50)[:-30])
    capsys.readouterr()

    assert _cli(url, out, inputs, *extra) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert message.format(out=out, tmp=tmp_path) in err[-1]
    assert "sk-wrong-key" not in err[-1]
