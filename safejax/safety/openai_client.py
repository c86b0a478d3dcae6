"""A client for OpenAI-compatible chat endpoints (POST {base_url}/chat/completions), on httpx.

One POST with retries is all the labeler, the synthesis step and the LLM judge need, so no SDK:
the same code talks to OpenAI, vLLM, SGLang, llama.cpp or `safejax serve`. One httpx.Client (a
connection pool, thread-safe) serves every worker thread; HTTP(S) proxies come from the usual
environment variables.

What is retried, with exponential backoff and jitter: 429 (waiting what Retry-After asks when
the server sends it), 408, 409, 5xx, timeouts and dropped connections. What stops the whole run at
once (EndpointError, a UserError), because every request would hit it: a refused key (401, 403),
an unknown model or path (404), a host still unreachable after the retries. Anything else fails
only the request at hand (RequestFailed), e.g. a 400 for a text longer than the model's context.

The API key is read from the environment variable named by `api_key_env` and goes only into the
Authorization header: never into logs, errors or files.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable

import gin
import httpx

from safejax import errors

RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({401, 403, 404})
ERROR_BODY_CHARS = 300  # of a server's error reply, kept in messages to say what went wrong


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ChatEndpoint:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = gin.REQUIRED
    api_key_env: str = "SAFEJAX_LABEL_API_KEY"  # a variable of its own, so no key leaks to a wrong host
    temperature: float = 0.0
    max_tokens: int = 256
    json_mode: bool = False  # send response_format json_object (OpenAI, vLLM); some servers refuse it
    timeout_s: float = 120.0  # per socket operation: connecting, then waiting for each read
    max_retries: int = 6
    backoff_base_s: float = 1.0  # the n-th retry waits about base * 2**n, jittered, capped below
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0  # a longer Retry-After is cut to this

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise errors.UserError(f"ChatEndpoint.base_url must start with http:// or https://, "
                                   f"got {self.base_url!r}")
        if not isinstance(self.model, str) or not self.model:
            raise errors.UserError(f"ChatEndpoint.model must be a non-empty string, got {self.model!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise errors.UserError(f"ChatEndpoint.max_retries must be an integer >= 0, got {self.max_retries!r}")
        for name in ("timeout_s", "backoff_base_s", "backoff_max_s", "retry_after_max_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise errors.UserError(f"ChatEndpoint.{name} must be a positive number, got {value!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclasses.dataclass(frozen=True)
class Reply:
    content: str
    finish_reason: str = ""  # "stop", or "length" for a reply cut by max_tokens; "" when not sent
    prompt_tokens: int = 0  # the server's `usage`, 0 when it sends none
    completion_tokens: int = 0


class EndpointError(errors.UserError):
    """The endpoint cannot serve any request (bad key, unknown model, host down): stop the run."""


class RequestFailed(Exception):
    """This one request failed (after its retries, if retryable); others may still succeed."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None, unreachable: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay in seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ChatClient:
    """Thread-safe: one client serves every worker thread. `sleep` and `rng` are for tests."""

    def __init__(self, endpoint: ChatEndpoint, sleep: Callable[[float], object] | None = None,
                 rng: random.Random | None = None):
        self.endpoint = endpoint
        self._api_key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
        self._stopped = threading.Event()
        self._sleep = sleep or self._stopped.wait  # waiting on the event lets stop() cut a backoff short
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=endpoint.timeout_s, trust_env=True,
                                  limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.requests = 0  # HTTP requests sent, retries included

    def stop(self) -> None:
        """Ends every pending and later retry at once (a run that is stopping waits for no backoff)."""
        self._stopped.set()

    def close(self) -> None:
        """Closes the pooled connections (a client that is dropped closes them when collected)."""
        self._http.close()

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply to `messages` ("" when the server sends no content)."""
        return self.chat(messages).content

    def chat(self, messages: list[dict]) -> Reply:
        """The reply to `messages` with why it ended and the tokens it took."""
        ep = self.endpoint
        body = {"model": ep.model, "messages": messages, "temperature": ep.temperature,
                "max_tokens": ep.max_tokens}
        if ep.json_mode:
            body["response_format"] = {"type": "json_object"}
        payload = json.dumps(body).encode()
        attempt = 0
        while True:
            try:
                return self._post(payload)
            except _Retryable as e:
                if attempt == ep.max_retries:
                    if e.unreachable:
                        raise EndpointError(f"cannot reach {ep.url} after {attempt + 1} attempts: {e}") from None
                    raise RequestFailed(f"{e} (gave up after {attempt + 1} attempts)") from None
                delay = self._delay(attempt, e.retry_after)
                attempt += 1
                logging.warning("%s from %s; retry %d/%d in %.2fs", e, ep.url, attempt, ep.max_retries, delay)
                self._sleep(delay)
                if self._stopped.is_set():
                    raise RequestFailed(f"{e} (stopped before retry {attempt})") from None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        ep = self.endpoint
        if retry_after is not None:
            return min(retry_after, ep.retry_after_max_s)
        ceiling = min(ep.backoff_max_s, ep.backoff_base_s * 2 ** attempt)
        with self._lock:  # "equal jitter": at least half the ceiling, so retries always back off
            return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _post(self, payload: bytes) -> Reply:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        with self._lock:
            self.requests += 1
        try:
            response = self._http.post(self.endpoint.url, content=payload, headers=headers)
        except httpx.InvalidURL as e:
            raise EndpointError(f"ChatEndpoint.base_url {self.endpoint.base_url!r} is not a valid URL: {e}") from None
        except httpx.TimeoutException:
            raise _Retryable(f"timed out after {self.endpoint.timeout_s}s") from None
        except httpx.ConnectError as e:
            raise _Retryable(_root_cause(e), unreachable=True) from None
        except (httpx.TransportError, httpx.DecodingError) as e:  # dropped or garbled connection
            raise _Retryable(f"connection broken: {_root_cause(e)}") from None
        if response.status_code >= 400:
            raise self._status_error(response) from None
        return _reply_content(response.content)

    def _status_error(self, response: httpx.Response) -> Exception:
        detail = response.content[:ERROR_BODY_CHARS].decode("utf-8", errors="replace")
        if self._api_key:  # some servers quote the key they refused
            detail = detail.replace(self._api_key, "***")
        code = response.status_code
        message = f"HTTP {code}" + (f": {' '.join(detail.split())}" if detail else "")
        if code in RETRYABLE_STATUS or code >= 500:
            return _Retryable(message, retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if code in FATAL_STATUS:
            return EndpointError(f"{self.endpoint.url} refused model {self.endpoint.model!r}: {message}"
                                 + (f" (is ${self.endpoint.api_key_env} set?)" if code in (401, 403) else ""))
        return RequestFailed(message)


def _root_cause(e: BaseException) -> str:
    """The innermost cause of an httpx error (e.g. ConnectionRefusedError), named with its type."""
    while (inner := e.__cause__ or e.__context__) is not None:
        e = inner
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _reply_content(raw: bytes) -> Reply:
    try:
        reply = json.loads(raw)
        choice = reply["choices"][0]
        content = choice["message"].get("content")
        usage = reply.get("usage") or {}
        tokens = [usage.get(name) for name in ("prompt_tokens", "completion_tokens")]
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise RequestFailed(f"the endpoint's reply is not a chat completion: {raw[:ERROR_BODY_CHARS]!r}") from None
    return Reply(content if isinstance(content, str) else "", finish if isinstance(finish, str) else "",
                 *(t if isinstance(t, int) and not isinstance(t, bool) else 0 for t in tokens))
