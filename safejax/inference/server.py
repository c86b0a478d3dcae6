"""`safejax serve`: an OpenAI-compatible HTTP server over a checkpoint (standard library only).

    POST /v1/completions        {"prompt": "...", "max_tokens": 32, "temperature": 0, "stream": true}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /v1/models, GET /health

Steering parameters are extra request fields with the names of SamplingParams (`strategy`,
`num_beams`, `expansions`, `drop_fraction`, `drop_mode`, `short_circuit`, `tag_filter`, ...).
Without `strategy`, temperature 0 means greedy and a positive temperature sampling. A
Safe Beam short-circuit ends with finish_reason "content_filter".

Every request is validated in its own HTTP thread (a bad one gets a 4xx JSON error and never
reaches the model); valid ones queue for one decoding thread that takes up to `max_batch`
requests that arrive within `batch_wait_ms` of each other and decodes them as batches.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import queue
import threading
import time
import uuid

import gin

from safejax import errors
from safejax.inference.generate import Completion, Generator, Request

FINISH = {"stop": "stop", "length": "length", "tag": "content_filter"}
# Request fields that map to SamplingParams fields of another name.
RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}
STEERING = ("strategy", "top_k", "num_beams", "length_penalty", "expansions", "drop_fraction", "drop_mode",
            "short_circuit", "tag_filter", "tag_threshold", "tag_candidates", "allow_tag")
IGNORED = ("model", "user", "n", "logprobs", "echo", "stream_options", "presence_penalty", "frequency_penalty",
           "logit_bias", "suffix", "best_of")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    batch_wait_ms: int = 5
    max_request_bytes: int = 1 << 20


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclasses.dataclass
class _Job:
    requests: list[Request]
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # ("text", i, delta) | ("done", x) | ("error", msg)


class Server:
    def __init__(self, generator: Generator, cfg: ServerConfig | None = None, model_name: str = "safejax"):
        self.generator, self.cfg, self.model_name = generator, cfg or ServerConfig(), model_name
        self.stats = {"requests": 0, "batches": 0}
        self._jobs: queue.Queue = queue.Queue()
        self._http = http.server.ThreadingHTTPServer((self.cfg.host, self.cfg.port), _handler(self))
        self._http.daemon_threads = True
        self._threads = [threading.Thread(target=self._decode_loop, name="decode", daemon=True),
                         threading.Thread(target=self._http.serve_forever, name="http", daemon=True)]

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Server:
        for t in self._threads:
            t.start()
        return self

    def shutdown(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._jobs.put(None)

    # ---- decoding thread ----

    def _decode_loop(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
            while sum(len(j.requests) for j in jobs) < self.cfg.max_batch:
                try:
                    more = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)
                    break
                jobs.append(more)
            self._decode(jobs)

    def _decode(self, jobs: list[_Job]):
        owners = [(job, i) for job in jobs for i in range(len(job.requests))]
        requests = [r for job in jobs for r in job.requests]
        self.stats["batches"] += 1
        self.stats["requests"] += len(requests)

        def on_text(k, delta):
            job, i = owners[k]
            job.events.put(("text", i, delta))

        try:
            completions = self.generator.run(requests, on_text)
        except errors.UserError as e:
            for job in jobs:
                job.events.put(("error", HTTPError(400, str(e))))
            return
        except Exception as e:  # a bug must not take the server down
            logging.exception("decoding failed")
            for job in jobs:
                job.events.put(("error", HTTPError(500, f"internal error: {type(e).__name__}")))
            return
        start = 0
        for job in jobs:
            job.events.put(("done", completions[start:start + len(job.requests)]))
            start += len(job.requests)

    def submit(self, requests: list[Request]) -> _Job:
        job = _Job(requests)
        self._jobs.put(job)
        return job

    # ---- requests ----

    def parse(self, path: str, body: dict) -> tuple[list[Request], bool]:
        """Validated requests (one per prompt) and whether to stream; HTTPError 400 otherwise."""
        chat = path == "/v1/chat/completions"
        known = {"prompt", "messages", "stream", "temperature", "top_p", "seed", "stop", *RENAMED, *STEERING, *IGNORED}
        unknown = sorted(set(body) - known)
        if unknown:
            raise HTTPError(400, f"unknown request field(s): {', '.join(unknown)}", unknown[0])
        if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
            raise HTTPError(400, "only n = 1 is supported", "n")
        # OpenAI clients send null for fields they leave unset: those keep the defaults.
        overrides = {RENAMED.get(k, k): v for k, v in body.items() if v is not None and
                     (k in RENAMED or k in STEERING or k in ("temperature", "top_p", "seed", "stop"))}
        if "strategy" not in overrides and "temperature" in overrides:
            overrides["strategy"] = "greedy" if overrides["temperature"] == 0 else "sample"
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise HTTPError(400, "stream must be true or false", "stream")
        try:
            params = self.generator.params(**overrides)
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise HTTPError(400, "messages must be a non-empty list", "messages")
                prompts = [self.generator.encode_chat(messages)]
            else:
                prompt = body.get("prompt")
                prompt = [prompt] if isinstance(prompt, str) else prompt
                if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
                    raise HTTPError(400, "prompt must be a string or a non-empty list of strings", "prompt")
                if stream and len(prompt) > 1:
                    raise HTTPError(400, "streaming takes one prompt", "prompt")
                prompts = [self.generator.encode(p) for p in prompt]
            return [self.generator.check(Request(p, params.replace(seed=params.seed + i), chat))
                    for i, p in enumerate(prompts)], stream
        except (errors.UserError, TypeError) as e:
            raise HTTPError(400, str(e)) from e

    def response(self, path: str, completions: list[Completion]) -> dict:
        chat = path == "/v1/chat/completions"
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                        "finish_reason": FINISH[c.finish_reason]} for i, c in enumerate(completions)]
        else:
            choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": FINISH[c.finish_reason]}
                       for i, c in enumerate(completions)]
        prompt_tokens = sum(c.prompt_tokens for c in completions)
        new_tokens = sum(len(c.tokens) for c in completions)
        return {**self._envelope(chat, stream=False), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                          "total_tokens": prompt_tokens + new_tokens}}

    def _envelope(self, chat: bool, stream: bool, ident: str | None = None) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {"id": ident or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": self.model_name}


def _handler(server: Server):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "safejax"

        def log_message(self, fmt, *args):  # requests go to the debug log, not stderr
            logging.debug("%s " + fmt, self.address_string(), *args)

        def do_GET(self):
            if self.path == "/health":
                self._json(200, {"status": "ok", **server.stats})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                             "owned_by": "safejax"}]})
            else:
                self._error(HTTPError(404, f"no such endpoint: GET {self.path}"))

        def do_POST(self):
            try:
                if self.path not in ("/v1/completions", "/v1/chat/completions"):
                    raise HTTPError(404, f"no such endpoint: POST {self.path}")
                requests, stream = server.parse(self.path, self._body())
            except HTTPError as e:
                self._error(e)
                return
            job = server.submit(requests)
            if stream:
                self._stream(job)
                return
            while True:
                kind, *rest = job.events.get()
                if kind == "done":
                    self._json(200, server.response(self.path, rest[0]))
                    return
                if kind == "error":
                    self._error(rest[0])
                    return

        def _body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise HTTPError(411, "a Content-Length header is required") from None
            if length > server.cfg.max_request_bytes:
                raise HTTPError(413, f"request body over {server.cfg.max_request_bytes} bytes")
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HTTPError(400, f"request body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "request body must be a JSON object")
            return body

        def _stream(self, job: _Job):
            chat = self.path == "/v1/chat/completions"
            envelope = server._envelope(chat, stream=True)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()

            def chunk(delta: str | None, finish: str | None):
                if chat:
                    choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                self._event({**envelope, "created": int(time.time()), "choices": [choice]})

            try:
                if chat:
                    self._event({**envelope, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "finish_reason": None}]})
                while True:
                    kind, *rest = job.events.get()
                    if kind == "text":
                        chunk(rest[1], None)
                    elif kind == "done":
                        chunk(None, FINISH[rest[0][0].finish_reason])
                        break
                    else:
                        self._event({"error": {"message": str(rest[0]), "type": "server_error"}})
                        break
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                logging.info("client left during a stream")

        def _event(self, payload: dict):
            self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            self.wfile.flush()

        def _json(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: HTTPError):
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            self._json(e.status, {"error": {"message": " ".join(str(e).split()), "type": kind,
                                            "param": e.param, "code": None}})

    return Handler
