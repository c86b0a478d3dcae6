"""LLM labeling (`safejax label`): a 0-5 harmfulness score and a reason for each text (PAPER.md §1),
from a model behind any OpenAI-compatible endpoint; the classifier's training data.

Each text goes to the model with the rubric (configs/label/rubric.md) as the system message. The
reply must be exactly the JSON object {"score": int 0..5, "reason": non-empty str}: surrounding
whitespace and one markdown code fence are tolerated, nothing else (no extra keys, no "3" or 3.0).
An invalid reply gets ONE repair: a follow-up request that shows the model its reply and what was
wrong with it. Asking again, rather than guessing a score out of free text, keeps every label the
model's own answer to the rubric. A reply still invalid is recorded with both raw replies.

The output directory (the classifier's data loader reads labels.jsonl):

  labels.jsonl      one line per labeled input record, appended and flushed as each label arrives:
                      {"id": str, "text": str, "score": int 0..5, "reason": str,
                       "model": str, "prompt_sha": str, "key": str}
                    `text` is the whole input text (not the truncated one sent), so the file is a
                    training set as it is; `key` = sha256(prompt_sha, model, text) is the cache key.
  invalid.jsonl     replies invalid even after the repair, kept across runs:
                      {"id", "key", "error", "raw", "repair_raw", "model", "prompt_sha"}
  failed.jsonl      this run's texts whose request failed after its retries: {"id", "key", "error"}
  quarantine.jsonl  this run's unusable input lines (bad JSON, no text...), in data/quarantine.py's format
  manifest.json     what the labels depend on: model, prompt_sha, temperature, max_text_chars
  summary.json      the counts of the last run (the CLI prints them too)

Input: JSONL(.gz) records with "text" and "id" (default FILE:LINE), read by data/sources.py.

Resuming: a rerun into the same directory uses labels.jsonl as its cache. A text whose key is
there is not sent again (a record with a new id and a known text gets a copy of the label).
Texts in invalid.jsonl are skipped unless `retry_invalid`; failed ones are tried again. A killed
run loses no finished label: each is flushed as it arrives, and a torn last line is cut off on
restart. A directory labeled with another model, prompt or settings is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import time

import gin
import tqdm

from safejax import errors
from safejax.data import sources
from safejax.data.quarantine import QUARANTINE
from safejax.safety import resumable
from safejax.safety.rubric import NUM_SCORES
from safejax.safety.openai_client import ChatClient, ChatEndpoint, EndpointError, RequestFailed

_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)\n?\s*```", re.DOTALL)
# The settings that change what a label is; a directory holds labels of one combination only.
MANIFEST_KEYS = ("model", "prompt_sha", "temperature", "max_text_chars")

# Flags of `safejax label` that override gin bindings, and what they bind.
FLAG_BINDINGS = {
    "base_url": "ChatEndpoint.base_url",
    "model": "ChatEndpoint.model",
    "api_key_env": "ChatEndpoint.api_key_env",
    "timeout_s": "ChatEndpoint.timeout_s",
    "max_retries": "ChatEndpoint.max_retries",
    "concurrency": "LabelConfig.concurrency",
    "prompt_file": "LabelConfig.prompt_file",
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LabelConfig:
    prompt_file: str = "label/rubric.md"  # the system message; relative paths also tried under configs/
    user_template: str = "Text to rate:\n\n{text}"
    repair_message: str = ("Your reply could not be used: {error}. Reply again with only the JSON object "
                           '{"score": <integer 0-5>, "reason": "<one sentence>"}.')
    concurrency: int = 8  # requests in flight at once
    max_text_chars: int = 12000  # longer texts are cut to their start before sending (0: never)
    retry_invalid: bool = False  # resend texts whose reply stayed invalid in an earlier run
    max_consecutive_failures: int = 50  # stop the run when this many texts fail in a row (0: never)
    progress_bar: bool = True

    def __post_init__(self):
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise errors.UserError(f"LabelConfig.concurrency must be an integer >= 1, got {self.concurrency!r}")
        if "{text}" not in self.user_template:
            raise errors.UserError("LabelConfig.user_template must contain {text}")
        if "{error}" not in self.repair_message:
            raise errors.UserError("LabelConfig.repair_message must contain {error}")


# --- the prompt and the reply ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prompt:
    system: str
    user_template: str
    repair_message: str

    @classmethod
    def from_config(cls, cfg: LabelConfig) -> Prompt:
        path = resumable.find_config_file(cfg.prompt_file)
        with open(path, encoding="utf-8") as f:
            system = f.read().strip()
        if not system:
            raise errors.UserError(f"prompt file {path} is empty")
        return cls(system, cfg.user_template, cfg.repair_message)

    @property
    def sha(self) -> str:
        """Names the prompt version: any change to the wording gives new cache keys."""
        parts = json.dumps([self.system, self.user_template, self.repair_message])
        return hashlib.sha256(parts.encode()).hexdigest()[:16]

    def messages(self, text: str) -> list[dict]:
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.user_template.replace("{text}", text)}]

    def repair(self, messages: list[dict], reply: str, error: str) -> list[dict]:
        return messages + [{"role": "assistant", "content": reply},
                           {"role": "user", "content": self.repair_message.replace("{error}", error)}]


class InvalidReply(ValueError):
    """The reply is not exactly {"score": int 0..5, "reason": str}; the message says why."""


def _unique_keys(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise InvalidReply(f"duplicate keys in {keys}")
    return dict(pairs)


def parse_reply(reply: str) -> tuple[int, str]:
    """(score, reason) from a reply, strictly: anything but the exact object raises InvalidReply."""
    text = reply.strip()
    if not sources.encodable(text):  # half a UTF-16 pair: labels.jsonl could not hold it
        raise InvalidReply("the reply holds a lone surrogate")
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise InvalidReply(f"not JSON ({e.msg} at character {e.pos})") from None
    if not sources.encodable(json.dumps(obj, ensure_ascii=False)):
        raise InvalidReply("the reply's JSON holds a lone surrogate escape")
    if not isinstance(obj, dict):
        raise InvalidReply(f"expected a JSON object, got {type(obj).__name__}")
    if set(obj) != {"score", "reason"}:
        raise InvalidReply(f'expected exactly the keys "score" and "reason", got {sorted(obj)}')
    score, reason = obj["score"], obj["reason"]
    if type(score) is not int or score not in range(NUM_SCORES):
        raise InvalidReply(f"score must be an integer from 0 to 5, got {json.dumps(score)}")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidReply("reason must be a non-empty string")
    return score, reason.strip()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one text: a label (score set), an invalid reply, or a failed request."""
    score: int | None = None
    reason: str = ""
    repaired: bool = False
    error: str = ""
    raw: str = ""
    repair_raw: str = ""
    failed: bool = False


def label_text(client: ChatClient, prompt: Prompt, text: str) -> Outcome:
    """One text through the model, with one repair request if the first reply is invalid."""
    messages = prompt.messages(text)
    try:
        raw = client.complete(messages)
        try:
            return Outcome(*parse_reply(raw))
        except InvalidReply as first:
            repair_raw = client.complete(prompt.repair(messages, raw, str(first)))
        try:
            return Outcome(*parse_reply(repair_raw), repaired=True)
        except InvalidReply as second:
            return Outcome(error=str(second), raw=raw, repair_raw=repair_raw)
    except RequestFailed as e:
        return Outcome(error=str(e), failed=True)


def cache_key(prompt_sha: str, model: str, text: str) -> str:
    return hashlib.sha256(json.dumps([prompt_sha, model, text]).encode()).hexdigest()


# --- the output directory ---------------------------------------------------------------------

class LabelStore(resumable.OutputDir):
    """The output directory: the cache of finished labels, and files appended one flushed line a record."""

    def __init__(self, directory: str, manifest: dict, retry_invalid: bool):
        super().__init__(directory, manifest, "labels", keys=MANIFEST_KEYS,
                         files={"labels.jsonl": "a", "invalid.jsonl": "a", "failed.jsonl": "w"})
        self.labels: dict[str, tuple[int, str]] = {}
        self.done: set[tuple[str, str]] = set()  # (id, key) already in labels.jsonl
        for record in self.cached["labels.jsonl"]:
            self.labels[record["key"]] = (record["score"], record["reason"])
            self.done.add((record["id"], record["key"]))
        self.invalid_keys = set() if retry_invalid else {r["key"] for r in self.cached["invalid.jsonl"]}
        self.cached.clear()


# --- the run ---------------------------------------------------------------------------------

class _Labeling:
    """Streams records through a bounded pool of requests; results are written by the calling
    thread only, so the files need no locks and every line is whole."""

    def __init__(self, client: ChatClient, prompt: Prompt, cfg: LabelConfig, store: LabelStore):
        self.client, self.prompt, self.cfg, self.store = client, prompt, cfg, store
        self.model, self.prompt_sha = client.endpoint.model, prompt.sha
        self.counts: collections.Counter = collections.Counter()
        self.scores: collections.Counter = collections.Counter()
        self.requests = resumable.RequestPool(cfg.concurrency, "label")
        self.failures_in_a_row = 0

    def add(self, record: dict) -> int:
        """Sends the record's text unless its label is known; returns how many records are settled."""
        text = record["text"]
        key = cache_key(self.prompt_sha, self.model, text)
        if key in self.store.labels:
            self.counts["cached"] += 1
            self._write_label(record, key, *self.store.labels[key])
            return 1
        if key in self.store.invalid_keys:
            self.counts["skipped_invalid"] += 1
            return 1
        if self.cfg.max_text_chars:
            text = text[:self.cfg.max_text_chars]
        # The same text in flight shares its answer.
        self.requests.submit(key, record, label_text, self.client, self.prompt, text)
        return 0

    def collect(self, everything: bool = False) -> int:
        """Waits for one request (or all); writes their records; returns how many were settled."""
        settled = 0
        for key, records, outcome in self.requests.collect(everything):  # an EndpointError stops the run here
            self._check_failures(outcome)
            for record in records:
                self._settle(record, key, outcome)
                settled += 1
        return settled

    def progress(self) -> dict[str, int]:
        return {name: self.counts[name] for name in ("labeled", "cached", "invalid", "failed")}

    def _check_failures(self, outcome: Outcome) -> None:
        self.failures_in_a_row = self.failures_in_a_row + 1 if outcome.failed else 0
        limit = self.cfg.max_consecutive_failures
        if limit and self.failures_in_a_row >= limit:
            raise EndpointError(f"{limit} texts in a row failed, the last with: {outcome.error}; finished "
                                "labels are saved and a rerun resumes")

    def _settle(self, record: dict, key: str, outcome: Outcome) -> None:
        if outcome.score is not None:
            self.counts["labeled"] += 1
            self.counts["repaired"] += outcome.repaired
            self.scores[outcome.score] += 1
            self.store.labels[key] = (outcome.score, outcome.reason)
            self._write_label(record, key, outcome.score, outcome.reason)
        elif outcome.failed:
            self.counts["failed"] += 1
            self.store.append("failed.jsonl", {"id": record["id"], "key": key, "error": outcome.error})
        else:
            self.counts["invalid"] += 1
            self.store.invalid_keys.add(key)
            self.store.append("invalid.jsonl", {
                "id": record["id"], "key": key, "error": outcome.error, "raw": outcome.raw,
                "repair_raw": outcome.repair_raw, "model": self.model, "prompt_sha": self.prompt_sha})

    def _write_label(self, record: dict, key: str, score: int, reason: str) -> None:
        if (record["id"], key) in self.store.done:
            return
        self.store.done.add((record["id"], key))
        self.store.append("labels.jsonl", {
            "id": record["id"], "text": record["text"], "score": score, "reason": reason,
            "model": self.model, "prompt_sha": self.prompt_sha, "key": key})


def label_files(inputs: list[str], output_dir: str, client: ChatClient, cfg: LabelConfig,
                prompt: Prompt | None = None) -> dict:
    """Labels every text of the JSONL files `inputs` into `output_dir`; returns the run's counts."""
    start = time.time()
    files = sources.expand_files(inputs)
    prompt = prompt or Prompt.from_config(cfg)
    manifest = {"model": client.endpoint.model, "prompt_sha": prompt.sha,
                "temperature": client.endpoint.temperature, "max_text_chars": cfg.max_text_chars}
    store = LabelStore(output_dir, manifest, cfg.retry_invalid)
    labeling = _Labeling(client, prompt, cfg, store)
    quarantine_path = store.path("quarantine.jsonl")
    if os.path.exists(quarantine_path):
        os.remove(quarantine_path)  # the input is read again in full, so are its bad lines
    QUARANTINE.reset()
    QUARANTINE.write_to(quarantine_path)
    bar = tqdm.tqdm(total=resumable.count_lines(files), unit="doc", desc="label", disable=not cfg.progress_bar)
    inputs_read = bad_seen = 0
    try:
        for record in sources.iter_records(files):
            record = {"id": str(record["id"]), "text": record["text"]}
            inputs_read += 1
            bar.update(labeling.add(record) + QUARANTINE.total() - bad_seen)
            bad_seen = QUARANTINE.total()
            while labeling.requests.full():  # keeps the pool fed, memory bounded
                bar.update(labeling.collect())
            bar.set_postfix(labeling.progress(), refresh=False)
        bar.update(labeling.collect(everything=True) + QUARANTINE.total() - bad_seen)
        bar.set_postfix(labeling.progress(), refresh=False)
    except BaseException:
        client.stop()  # in-flight requests end without further retries; finished labels are saved
        raise
    finally:
        labeling.requests.close()
        bar.close()
        store.close()
        QUARANTINE.write_to(None)
    counts = labeling.counts
    summary = {
        "inputs": inputs_read + QUARANTINE.total(), "labeled": counts["labeled"], "repaired": counts["repaired"],
        "cached": counts["cached"], "invalid": counts["invalid"], "skipped_invalid": counts["skipped_invalid"],
        "failed": counts["failed"], "bad_input": QUARANTINE.total(), "requests": client.requests,
        "scores": {str(s): labeling.scores[s] for s in range(NUM_SCORES)}, "seconds": round(time.time() - start, 3),
        "output": os.path.abspath(output_dir),
    }
    resumable.write_json(store.path("summary.json"), summary)
    return summary


def run(inputs: list[str], output_dir: str) -> dict:
    """`safejax label` with the bound gin config (configs/label/default.gin and overrides)."""
    cfg = LabelConfig()
    return label_files(inputs, output_dir, ChatClient(ChatEndpoint()), cfg)
