"""The server under bad clients (issue 20 item 6): each probe reproduces one way the old server
could be tied up or answered without a readable JSON error. All on 127.0.0.1, bounded in count
(at most 24 sockets) and time (limits of 1-2 s); the model is the tiny config, randomly
initialised (the probes do not depend on its weights)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import httpx
import pytest

from safejax.bench.serve import random_generator
from safejax.inference.server import Server, ServerConfig

LIMITS = ServerConfig(port=0, max_request_bytes=64 * 1024, max_request_cost=30000, long_request_cost=1024,
                      body_timeout_s=1.0, header_timeout_s=1.0, keep_alive_s=1.0, max_header_bytes=8192,
                      limit_concurrency=16, batch_wait_ms=5)


@pytest.fixture(scope="module")
def server():
    server = Server(random_generator("tiny"), LIMITS, model_name="tiny").start()
    yield server
    server.shutdown()


def _address(server):
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _raw(server, data: bytes, wait_s: float = 5.0) -> tuple[int | None, dict | None, float]:
    """Sends raw bytes, reads until the server closes: (status, JSON body, seconds to the close)."""
    with socket.create_connection(_address(server), timeout=wait_s) as sock:
        start = time.monotonic()
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        elapsed = time.monotonic() - start
    if not reply:
        return None, None, elapsed
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), elapsed


def _assert_error(body, status, words):
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert words in body["error"]["message"]
    assert body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")


def test_idle_connections_are_closed_and_bounded(server):
    """20 connections that send nothing: over the limit of 16 a request gets a JSON 503; each
    idle one is closed after header_timeout_s, and then the server answers again."""
    idle = [socket.create_connection(_address(server), timeout=5) for _ in range(20)]
    try:
        time.sleep(0.2)
        status, body, _ = _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503
        _assert_error(body, 503, "limit of 16 connections")
        start = time.monotonic()
        for sock in idle:
            assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - start < LIMITS.header_timeout_s + 2
    finally:
        for sock in idle:
            sock.close()
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_slow_or_short_requests_time_out_with_json(server):
    # Content-Length larger than the body: 408 after body_timeout_s, not a thread held forever.
    status, body, seconds = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pr")
    assert status == 408 and seconds < LIMITS.body_timeout_s + 2
    _assert_error(body, 408, "not received within")
    # Headers that never end: 408 after header_timeout_s.
    status, body, seconds = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    assert status == 408 and seconds < LIMITS.header_timeout_s + 2
    # A kept-alive connection left idle is closed after keep_alive_s.
    with socket.create_connection(_address(server), timeout=5) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        start, reply = time.monotonic(), b""
        while chunk := sock.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and time.monotonic() - start < LIMITS.keep_alive_s + 2


def test_a_huge_body_gets_a_readable_413(server):
    """urllib sends the whole body before it reads: the reply is readable because the server
    drains the body first. A Content-Length far over the limit is refused at once."""
    request = urllib.request.Request(server.url + "/v1/completions", data=b"x" * (1 << 20),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413
    _assert_error(json.loads(caught.value.read()), 413, f"over {LIMITS.max_request_bytes} bytes")
    status, body, _ = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
    assert status == 413


@pytest.mark.parametrize("data,status,words", [
    (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, "over 8192 bytes"),
    (b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405, "method PUT is not allowed"),
    (b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method BREW is not allowed"),
    (b"GET /v2/everything HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such endpoint: GET /v2/everything"),
])
def test_protocol_errors_get_json(server, data, status, words):
    got, body, _ = _raw(server, data)
    assert got == status
    _assert_error(body, status, words)


@pytest.mark.parametrize("body,words", [
    ({"messages": [1]}, "messages[0]: input should be a valid dictionary"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "hi", "max_tokens": "4"}, "max_tokens: input should be a valid integer"),
    ({"prompt": "hi", "stream": "yes"}, "stream: input should be a valid boolean"),
    ({"prompt": "hi", "strategy": "safebeam", "num_beams": 64, "expansions": 64, "max_tokens": 40},
     "request cost 163840"),
])
def test_bad_bodies_get_400_json(server, body, words):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = httpx.post(server.url + path, json=body, timeout=30)
    assert reply.status_code == 400
    _assert_error(reply.json(), 400, words)


def test_a_short_request_does_not_wait_behind_a_long_one(server):
    """A Safe Beam request over long_request_cost decodes in the long lane (compiling, then ~3 s
    on the test machine); a greedy 4-token request sent while it runs is answered within a few
    seconds and before it, and /health answers at once throughout (the event loop never blocks)."""
    short = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
    assert httpx.post(server.url + "/v1/completions", json=short, timeout=120).status_code == 200  # compiled
    long = {"prompt": "hello there", "strategy": "safebeam", "num_beams": 16, "expansions": 16,
            "max_tokens": 48, "min_tokens": 48}
    finished = {}

    def run_long():
        finished["status"] = httpx.post(server.url + "/v1/completions", json=long, timeout=300).status_code
        finished["at"] = time.monotonic()

    before = server.stats["lanes"]["long"]["batches"]
    thread = threading.Thread(target=run_long)
    thread.start()
    deadline = time.monotonic() + 30
    while server.stats["lanes"]["long"]["batches"] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.stats["lanes"]["long"]["batches"] == before + 1, "the long request did not start"
    start = time.monotonic()
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and time.monotonic() - start < 1.0
    reply = httpx.post(server.url + "/v1/completions", json=short, timeout=120)
    waited = time.monotonic() - start
    assert reply.status_code == 200 and "at" not in finished, "the short request waited for the long one"
    assert waited < 5.0
    thread.join(timeout=300)
    assert finished["status"] == 200 and finished["at"] - start > waited


def test_internal_errors_are_json_500_and_the_server_goes_on(server, monkeypatch):
    """A bug in decoding (on a lane's thread) or in request handling (on the event loop) is a
    JSON 500 naming only the exception type; the next request is served."""
    from safejax.inference import api

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    body = {"prompt": "hello", "max_tokens": 2, "temperature": 0}
    monkeypatch.setattr(server.scheduler.lanes["short"].generator, "run", broken)
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 500 and "secret" not in reply.text
    _assert_error(reply.json(), 500, "internal error: RuntimeError")
    monkeypatch.undo()
    monkeypatch.setattr(api, "parse", broken)
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 500
    _assert_error(reply.json(), 500, "internal error: RuntimeError")
    monkeypatch.undo()
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200


@pytest.mark.slow
def test_bench_serve_answers_every_client(capsys):
    """`safejax bench serve` on the tiny config with a few clients: every request answered."""
    from safejax.bench import serve as bench

    assert bench.main(["--config", "tiny", "--clients", "3", "--rounds", "1", "--max_batch", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["requests"], result["failed"]) == (3, 0) and result["requests_per_sec"] > 0
    assert 0 < result["p50_latency_s"] <= result["p99_latency_s"]
