"""An OpenAI-compatible chat endpoint on 127.0.0.1 whose replies a Python function writes.

The stand-in for a model behind `safejax label`, `synth` and the LLM judge, in `safejax bench
synth` and in the tests: the figures and assertions are then about our client, not a model.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (HTTP status, JSON body, extra headers, seconds to wait before answering)
Response = tuple[int, dict, dict, float]
Answer = Callable[[dict, "str | None"], Response]


def completion(content: str, finish_reason: str = "stop", **fields) -> dict:
    """A chat.completion body with one choice."""
    return {"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}], **fields}


class LocalChatServer:
    """Serves `answer(body, authorization_header)` on many threads; counts requests in flight.

    `max_active` is the most requests in flight at once. A request stops counting before its
    answer is written: a client may send its next request the moment it has this one.
    """

    def __init__(self, answer: Answer):
        self.answer, self.lock = answer, threading.Lock()
        self.active = self.max_active = 0
        self.auth: set[str | None] = set()  # Authorization headers seen
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.chat = self
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _reply(self, body: dict, auth: str | None) -> Response:
        with self.lock:
            self.auth.add(auth)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            reply = self.answer(body, auth)
            time.sleep(reply[3])
            return reply
        finally:
            with self.lock:
                self.active -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog, for 32+ clients at once: read in the constructor


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, payload, headers, _ = self.server.chat._reply(body, self.headers.get("Authorization"))
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped waiting (a timeout under test)
