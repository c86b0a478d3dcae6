"""`safejax serve`: an OpenAI-compatible HTTP server over a checkpoint, on FastAPI and uvicorn.

    POST /v1/completions        {"prompt": "...", "max_tokens": 32, "temperature": 0, "stream": true}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /v1/models, GET /health

Steering parameters are extra request fields with the names of SamplingParams (`strategy`,
`num_beams`, `expansions`, `drop_fraction`, `drop_mode`, `short_circuit`, `tag_filter`,
`min_tokens`, ...; api.py). Without `strategy`, temperature 0 means greedy and a positive
temperature sampling. A Safe Beam short-circuit ends with finish_reason "content_filter". Each
choice carries `tag_probability`: the harm tag's probability at each new token's position.

Limits (ServerConfig, configs/sample/default.gin): a request body gets `body_timeout_s` to arrive
and is refused over `max_request_bytes` (413, after it is read); a request costing more than
`max_request_cost` (scheduler.cost) is refused (400); idle connections close after
`keep_alive_s`, request headers get `header_timeout_s`; at most `limit_concurrency` open
connections and a listen backlog of `backlog` (http_guard.py). Every failure is a JSON error of the
OpenAI shape. The event loop only parses and answers: decoding runs on the scheduler's threads
(scheduler.py: a short and a long lane, so a short request does not wait behind a long one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import threading
import time

import fastapi
import gin
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from safejax.inference import api, http_guard
from safejax.inference.generate import Generator
from safejax.inference.scheduler import ApiError, Job, Scheduler, cost

DRAIN_FACTOR = 16  # a body over the limit is read (and dropped) up to this many times the limit


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    batch_wait_ms: int = 5
    max_request_bytes: int = 1 << 20
    max_request_cost: int = 65536  # prompts x max_tokens x beams x expansions (scheduler.cost)
    long_request_cost: int = 1024  # above this a request decodes in the long lane
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_header_bytes: int = 16384
    limit_concurrency: int = 256
    backlog: int = 512


class Server:
    def __init__(self, generator: Generator, cfg: ServerConfig | None = None, model_name: str = "safejax"):
        self.generator, self.cfg, self.model_name = generator, cfg or ServerConfig(), model_name
        self.scheduler = Scheduler(generator, self.cfg.max_batch, self.cfg.batch_wait_ms, self.cfg.long_request_cost)
        self._socket = socket.create_server((self.cfg.host, self.cfg.port), backlog=self.cfg.backlog)
        protocol = http_guard.guarded_protocol(self.cfg.header_timeout_s, self.cfg.max_header_bytes,
                                               self.cfg.limit_concurrency)
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            build_app(self), http=protocol, lifespan="off", log_config=None, access_log=False,
            timeout_keep_alive=self.cfg.keep_alive_s, h11_max_incomplete_event_size=self.cfg.max_header_bytes,
            timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def stats(self) -> dict:
        return self.scheduler.stats

    def start(self) -> Server:
        self.scheduler.start()
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
        self.scheduler.close()

    async def read_json(self, request: fastapi.Request):
        """The request body as JSON, read within body_timeout_s and at most max_request_bytes."""
        limit, timeout = self.cfg.max_request_bytes, self.cfg.body_timeout_s
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit * DRAIN_FACTOR:
            raise ApiError(413, f"request body over {limit} bytes (Content-Length {declared})", close=True)

        async def read() -> tuple[bytes, int]:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > limit * DRAIN_FACTOR:
                    break
            return b"".join(chunks), size

        try:
            body, size = await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise ApiError(408, f"request body not received within {timeout}s (Content-Length {declared})",
                           close=True) from None
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes", close=True)
        try:
            return json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None

    async def complete(self, request: fastapi.Request, chat: bool):
        body = await self.read_json(request)
        # Tokenizing a long prompt takes a while: off the event loop, like decoding.
        requests, stream = await asyncio.to_thread(api.parse, self.generator, chat, body)
        price = cost(requests[0].params, len(requests))
        if price > self.cfg.max_request_cost:
            raise ApiError(400, f"request cost {price} (prompts x max_tokens x beams x expansions) exceeds the "
                                f"server's ceiling of {self.cfg.max_request_cost}", "max_tokens")
        events = asyncio.Queue()
        self.scheduler.submit(Job(requests, price, _emitter(asyncio.get_running_loop(), events)))
        responses = api.Responses(self.model_name, chat, stream)
        if stream:
            return StreamingResponse(_sse(responses, events), headers={"content-type": "text/event-stream",
                                                                       "cache-control": "no-cache"})
        while True:
            kind, *rest = await events.get()
            if kind == "done":
                return JSONResponse(responses.whole(rest[0]))
            if kind == "error":
                raise rest[0]


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    """Hands a decoding thread's events to the request's queue on the event loop."""
    def emit(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop closed (server shut down): nobody is waiting
            pass

    return emit


async def _sse(responses: api.Responses, events: asyncio.Queue):
    def event(payload: dict) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    if responses.chat:
        yield event(responses.chunk(None, role=True))
    while True:
        kind, *rest = await events.get()
        if kind == "text":
            yield event(responses.chunk(rest[1]))
        elif kind == "done":
            yield event(responses.chunk(None, finish=rest[0][0]))
            break
        else:
            yield event({"error": {"message": str(rest[0]), "type": "server_error", "param": None, "code": None}})
            break
    yield b"data: [DONE]\n\n"


def error_response(status: int, message: str, param: str | None = None, close: bool = False,
                   headers: dict | None = None) -> JSONResponse:
    headers = {**(headers or {}), **({"connection": "close"} if close else {})}
    return JSONResponse(json.loads(http_guard.error_body(status, message, param)), status, headers=headers)


def build_app(server: Server) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title="safejax", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "safejax"}]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await server.complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await server.complete(request, chat=True)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e.status, str(e), e.param, e.close)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path} (allowed: {(e.headers or {}).get('Allow')})"
        else:
            message = str(e.detail)
        return error_response(e.status_code, message, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error_response(400, f"invalid request: {e.errors()[0].get('msg', '')}")

    @app.exception_handler(ClientDisconnect)
    async def gone(request, e: ClientDisconnect):
        logging.info("client left before its request body arrived")
        return error_response(400, "client disconnected", close=True)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        logging.exception("request failed")
        return error_response(500, f"internal error: {type(e).__name__}")

    return app
