"""The OpenAI-compatible request and response bodies of `safejax serve`.

Requests are typed pydantic models: a field of the wrong type or an unknown field is a 400
naming it. OpenAI clients send null for fields they leave unset; those keep the gin defaults.
Values (ranges, choices) are checked once, by SamplingParams.validate, for the server, the CLI
and the Python API alike. Steering fields carry the names of SamplingParams fields.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from safejax import errors
from safejax.inference.generate import Completion, Generator, Request
from safejax.inference.scheduler import ApiError

FINISH = {"stop": "stop", "length": "length", "tag": "content_filter"}
RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}
SAMPLING = ("temperature", "top_p", "seed", "stop", "min_tokens", "strategy", "top_k", "num_beams",
            "length_penalty", "expansions", "drop_fraction", "drop_mode", "short_circuit", "tag_filter",
            "tag_threshold", "tag_candidates", "allow_tag")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # OpenAI fields read here
    stream: bool | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    # OpenAI fields accepted and ignored (a client library may send them)
    model: str | None = None
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # steering: SamplingParams fields
    min_tokens: int | None = None
    strategy: str | None = None
    top_k: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    expansions: int | None = None
    drop_fraction: float | None = None
    drop_mode: str | None = None
    short_circuit: bool | None = None
    tag_filter: str | None = None
    tag_threshold: float | None = None
    tag_candidates: int | None = None
    allow_tag: bool | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


class ChatBody(_Body):
    messages: list[dict[str, Any]] | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def validation_error(e: pydantic.ValidationError) -> ApiError:
    """The first problem of a request body as one line naming the field."""
    problem = e.errors()[0]
    loc = [str(part) for part in problem["loc"]]
    field = loc[0] + "".join(f"[{part}]" for part in loc[1:]) if loc else None
    if problem["type"] == "extra_forbidden":
        unknown = sorted({str(p["loc"][0]) for p in e.errors() if p["type"] == "extra_forbidden"})
        return ApiError(400, f"unknown request field(s): {', '.join(unknown)}", unknown[0])
    if problem["type"] == "model_type":
        return ApiError(400, "request body must be a JSON object")
    got = repr(problem["input"])
    got = got if len(got) <= 60 else got[:57] + "..."
    return ApiError(400, f"{field}: {problem['msg'][0].lower()}{problem['msg'][1:]} (got {got})", field)


def parse(generator: Generator, chat: bool, body: Any) -> tuple[list[Request], bool]:
    """Validated requests (one per prompt) and whether to stream; ApiError(400) otherwise."""
    try:
        req = (ChatBody if chat else CompletionBody).model_validate(body)
    except pydantic.ValidationError as e:
        raise validation_error(e) from None
    if (req.n or 1) != 1 or (getattr(req, "best_of", None) or 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "n")
    fields = req.model_dump(exclude_none=True)
    overrides = {RENAMED.get(k, k): v for k, v in fields.items() if k in RENAMED or k in SAMPLING}
    if "strategy" not in overrides and "temperature" in overrides:
        overrides["strategy"] = "greedy" if overrides["temperature"] == 0 else "sample"
    stream = bool(req.stream)
    try:
        params = generator.params(**overrides)
        if chat:
            if not req.messages:
                raise ApiError(400, "messages must be a non-empty list", "messages")
            prompts = [generator.encode_chat(req.messages)]
        else:
            prompt = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if not prompt:
                raise ApiError(400, "prompt must be a string or a non-empty list of strings", "prompt")
            if stream and len(prompt) > 1:
                raise ApiError(400, "streaming takes one prompt", "prompt")
            prompts = [generator.encode(p) for p in prompt]
        return [generator.check(Request(p, params.replace(seed=params.seed + i), chat))
                for i, p in enumerate(prompts)], stream
    except errors.UserError as e:
        raise ApiError(400, str(e)) from e


class Responses:
    """Response bodies and stream chunks of one request."""

    def __init__(self, model_name: str, chat: bool, stream: bool):
        self.chat = chat
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        self.envelope = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
                         "created": int(time.time()), "model": model_name}

    def whole(self, completions: list[Completion]) -> dict:
        choices = []
        for i, c in enumerate(completions):
            choice = {"index": i, "message": {"role": "assistant", "content": c.text}} if self.chat else \
                {"index": i, "text": c.text, "logprobs": None}
            choices.append({**choice, "finish_reason": FINISH[c.finish_reason], "tag_probability": c.tag_probability})
        prompt_tokens = sum(c.prompt_tokens for c in completions)
        new_tokens = sum(len(c.tokens) for c in completions)
        return {**self.envelope, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                          "total_tokens": prompt_tokens + new_tokens}}

    def chunk(self, delta: str | None, finish: Completion | None = None, role: bool = False) -> dict:
        """A stream chunk: text `delta`, or the last one with the finish reason (and tag probabilities)."""
        if self.chat:
            content = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": content}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None}
        choice["finish_reason"] = None if finish is None else FINISH[finish.finish_reason]
        if finish is not None:
            choice["tag_probability"] = finish.tag_probability
        return {**self.envelope, "created": int(time.time()), "choices": [choice]}
