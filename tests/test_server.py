"""Sampling and serving a real checkpoint (the tiny LM trained for two steps, on the 8-device
mesh): the Python API, `safejax sample`, and the OpenAI-compatible server over HTTP on
127.0.0.1 with streaming, bad requests and concurrent clients."""

import dataclasses
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from conftest import FAST, TINY

from safejax import cli, config, errors
from safejax.inference.generate import Generator, Request
from safejax.inference.server import Server, ServerConfig


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from safejax.train import pretrain

    path = tmp_path_factory.mktemp("tiny_lm")
    config.parse([TINY], FAST + ["TRAIN_STEPS = 2", "TrainConfig.async_checkpoints = False"])
    pretrain.train(str(path))
    return str(path)


@pytest.fixture(scope="module")
def generator(workdir):
    return Generator.from_checkpoint(workdir)


@pytest.fixture(scope="module")
def server(generator):
    server = Server(generator, ServerConfig(port=0, batch_wait_ms=300), model_name="tiny").start()
    yield server
    server.shutdown()


def _post(server, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stream(server, path, body):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events = [line[len("data: "):] for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completions_match_the_python_api(server, generator):
    status, body = _post(server, "/v1/completions", {"model": "tiny", "prompt": "The king said", "max_tokens": 6,
                                                     "temperature": 0, "stop": None, "n": None, "top_p": None})
    [expected] = generator.generate(["The king said"], generator.params(strategy="greedy", max_new_tokens=6))
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["completion_tokens"] == len(expected.tokens)
    streamed = _stream(server, "/v1/completions", {"prompt": "The king said", "max_tokens": 6, "temperature": 0})
    assert "".join(e["choices"][0]["text"] for e in streamed) == expected.text
    assert streamed[-1]["choices"][0]["finish_reason"] == expected.finish_reason


def test_chat_completions_with_streaming_and_steering(server):
    messages = [{"role": "user", "content": "Tell me a story"}]
    status, body = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0})
    assert status == 200 and body["object"] == "chat.completion"
    text = body["choices"][0]["message"]["content"]
    streamed = _stream(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0})
    assert streamed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed) == text
    assert all(e["object"] == "chat.completion.chunk" for e in streamed)
    status, body = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "strategy": "safebeam",
                                                          "num_beams": 2, "expansions": 3, "drop_fraction": 0.5})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length", "content_filter")


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, "must be a JSON object"),
    ("/v1/completions", {"prompt": "hi", "beams": 3}, 400, "unknown request field(s): beams"),
    ("/v1/completions", {"prompt": "hi", "strategy": "nucleus"}, 400, "strategy='nucleus'"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature=-1"),
    ("/v1/completions", {"prompt": "hi", "top_p": "most"}, 400, "top_p: input should be a valid number (got 'most')"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens=9"),
    ("/v1/chat/completions", {"messages": [1]}, 400, "messages[0]: input should be a valid dictionary (got 1)"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages: input should be a valid list"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, 400, "exceeds the model's context of 64"),
    ("/v1/completions", {"prompt": "word " * 80, "max_tokens": 1}, 400, "exceeds the model's context"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt must be a string"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "only n = 1"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/embeddings", {"input": "hi"}, 404, "no such endpoint"),
])
def test_bad_requests_get_4xx_json_errors(server, path, body, status, message):
    raw = body if isinstance(body, bytes) else None
    code, reply = _post(server, path, body, raw)
    assert code == status
    assert message in reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"


def test_safebeam_on_a_vocabulary_without_the_tag_is_refused(generator):
    loaded = dataclasses.replace(generator.loaded, reserved={k: v for k, v in generator.loaded.reserved.items()
                                                             if k != "<potentially unsafe content>"})
    untagged = Server(Generator(loaded), ServerConfig(port=0)).start()
    try:
        code, reply = _post(untagged, "/v1/completions", {"prompt": "hi", "strategy": "safebeam"})
        assert code == 400 and "has no <potentially unsafe content> token" in reply["error"]["message"]
        code, _ = _post(untagged, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert code == 200
    finally:
        untagged.shutdown()


def test_stop_strings_end_the_text_before_them(generator):
    params = generator.params(strategy="greedy", max_new_tokens=12)
    [free] = generator.generate(["The king said"], params)
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip(), free.text
    streamed = []
    [cut] = generator.run([Request(generator.encode("The king said"), params.replace(stop=(stop,)))],
                          lambda i, delta: streamed.append(delta))
    assert cut.text == free.text[:free.text.index(stop)] and cut.finish_reason == "stop"
    assert "".join(streamed) == cut.text


def test_concurrent_clients_are_batched_and_get_their_own_answers(server, generator):
    prompts = ["Once", "The people of", "In the year", "A", "We the", "It was a dark"]
    expected = [c.text for c in generator.generate(prompts, generator.params(strategy="greedy", max_new_tokens=5))]
    before = dict(server.stats)
    results = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def client(i):
        barrier.wait()
        results[i] = _post(server, "/v1/completions", {"prompt": prompts[i], "max_tokens": 5, "temperature": 0})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200] * len(prompts)
    assert [r[1]["choices"][0]["text"] for r in results] == expected
    assert server.stats["requests"] - before["requests"] == len(prompts)
    assert server.stats["batches"] - before["batches"] < len(prompts)
    with urllib.request.urlopen(server.url + "/health", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_cli_sample(capsys, workdir, tmp_path):
    code = cli.main(["sample", f"--checkpoint={workdir}", "--prompt", "Hello", "--prompt", "The",
                     "--strategy", "beam", "--num_beams", "2", "--max_new_tokens", "3"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert code == 0 and [x["prompt"] for x in lines] == ["Hello", "The"]
    assert all(x["new_tokens"] <= 3 and x["score"] is not None for x in lines)
    for args, message in [(["--prompt", "Hi", "--top_p", "3"], "top_p=3.0"),
                          (["--prompt", "Hi", "--gin.SamplingParams.max_new_tokens=90"], "exceeds the model's context"),
                          ([], "needs --prompt")]:
        assert cli.main(["sample", f"--checkpoint={workdir}", *args]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["sample", f"--checkpoint={tmp_path}", "--prompt", "Hi"]) == 2
    assert "no config.gin" in capsys.readouterr().err
    with pytest.raises(errors.UserError, match="the prompt is empty"):
        Generator.check(None, type("R", (), {"prompt": []})())


@pytest.mark.slow
def test_cli_serve_as_users_run_it(workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"}
    proc = subprocess.Popen([sys.executable, "-m", "safejax.cli", "serve", f"--checkpoint={workdir}", "--port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready, "the server did not start"
        started = json.loads(proc.stdout.readline())
        assert started["url"].startswith("http://127.0.0.1:") and started["model"] == os.path.basename(workdir)
        request = urllib.request.Request(started["url"] + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"prompt": "Hello", "max_tokens": 3}).encode())
        with urllib.request.urlopen(request, timeout=300) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=240) == 130  # a loaded 2-core machine may still be compiling


def test_a_continuation_keeps_its_leading_space(generator):
    """prompt + text reads as the model wrote it: the text of a continuation whose first piece
    starts a word begins with its space."""
    prompts = ["The river and the", "Once upon a time there", "A quiet morning in the market"]
    requests = [Request(generator.encode(p), generator.params(strategy="sample", seed=s, max_new_tokens=6))
                for p in prompts for s in range(4)]
    completions = generator.run(requests)
    word_starts = 0
    for request, c in zip(requests, completions):
        assert generator.vocabulary.decode(request.prompt) + c.text == generator.vocabulary.decode(request.prompt + c.tokens)
        word_starts += generator.vocabulary.tokenizer.id_to_piece(c.tokens[0]).startswith("\u2581")
    assert word_starts  # the case that used to glue words


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_openai_client_completes_chats_and_streams(openai_client, generator):
    """The official client against the server: completions (one prompt and a list), chat
    completions, both streamed, steering fields through extra_body, and an error it raises."""
    import openai

    params = generator.params(strategy="greedy", max_new_tokens=6)
    [expected] = generator.generate(["The king said"], params)
    reply = openai_client.completions.create(model="tiny", prompt="The king said", max_tokens=6, temperature=0)
    assert reply.choices[0].text == expected.text and reply.usage.completion_tokens == len(expected.tokens)
    assert reply.choices[0].tag_probability == pytest.approx(expected.tag_probability)
    stream = openai_client.completions.create(model="tiny", prompt="The king said", max_tokens=6, temperature=0,
                                              stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected.text
    both = openai_client.completions.create(model="tiny", prompt=["Once", "The people of"], max_tokens=3, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    chat = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    chunks = list(openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    long = openai_client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8,
                                                 extra_body={"min_tokens": 8, "strategy": "safebeam", "num_beams": 2,
                                                             "expansions": 3})
    assert long.usage.completion_tokens == 8 and long.choices[0].finish_reason == "length"
    assert len(long.choices[0].tag_probability) == 8
    with pytest.raises(openai.BadRequestError, match="unknown request field"):
        openai_client.completions.create(model="tiny", prompt="hi", extra_body={"beams": 3})
    assert [m.id for m in openai_client.models.list()] == ["tiny"]
