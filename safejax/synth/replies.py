"""What counts as a usable synthesis output, and the refusal check.

Strict on purpose: an output is training data as it is, so a reply that is not exactly the kind
asked for is invalid (kept with its raw text, never patched up here).

- Any reply: empty, or cut off by max_tokens (finish_reason "length"), is invalid.
- rephrase: plain text (one surrounding markdown fence is removed).
- moral: markdown with a `# ` title line and at least one `## ` section with text after it.
- refuseweb: exactly the JSON object {"turns": [{"role": "user", "text": ...}, ...]}: roles
  alternate from "user" to "assistant" and it ends on the assistant; every text is non-empty.

The refusal check (documented heuristic, used by the gate on every RefuseWeb dialogue from either
backend): the dialogue's first assistant turn must contain a refusal phrase (REFUSAL: "I can't",
"I won't", "I'm not able to", "not something I can help with", ...) and no assistant turn may look
like compliance (COMPLIANCE: "here's how", "step 1", a numbered list). It catches a model that
answers instead of refusing; it cannot tell a good refusal from a clumsy one.
"""

from __future__ import annotations

import json
import re

from safejax.data import sources
from safejax.safety.openai_client import Reply

_FENCE = re.compile(r"```[a-z]*\s*\n?(.*?)\n?\s*```", re.DOTALL)
REFUSAL = re.compile(
    r"\bi(?:\s+(?:(?:still|really|just|simply)\s+)?(?:can(?:no|')t|won't|will\s+not|must\s+decline|have\s+to\s+decline|am\s+not\s+(?:able|going)"
    r"|don't\s+think\s+i\s+(?:can|should)|would\s+rather\s+not)|'m\s+not\s+(?:able|going)|'d\s+rather\s+not)"
    r"|\bnot\s+something\s+i\s+(?:can|will)\b", re.IGNORECASE)
COMPLIANCE = re.compile(r"(\bhere(?:'s| is) how\b|\bstep\s*1\b|^\s*1[.)]\s)", re.IGNORECASE | re.MULTILINE)


class InvalidOutput(ValueError):
    """The reply is not a usable output of its kind; the message says why."""


def _text(reply: Reply) -> str:
    if reply.finish_reason == "length":
        raise InvalidOutput("the reply was cut off by max_tokens (finish_reason length)")
    text = reply.content.strip()
    if not sources.encodable(text):  # half a UTF-16 pair: no file could hold the output
        raise InvalidOutput("the reply holds a lone surrogate")
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text:
        raise InvalidOutput("the reply is empty")
    return text


def parse_article(reply: Reply) -> str:
    text = _text(reply)
    lines = text.splitlines()
    if not any(re.match(r"#\s+\S", line) for line in lines):
        raise InvalidOutput("the article has no '# ' title line")
    section = next((i for i, line in enumerate(lines) if re.match(r"##\s+\S", line)), None)
    if section is None or not any(line.strip() and not line.startswith("#") for line in lines[section + 1:]):
        raise InvalidOutput("the article has no '## ' section with text under it")
    return text


def check_turns(turns) -> list[dict]:
    """The turns as {"role", "text"} dicts, if they alternate user/assistant and end on the assistant."""
    if not isinstance(turns, list) or len(turns) < 2:
        raise InvalidOutput("expected a list of at least two turns")
    out = []
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or set(turn) != {"role", "text"}:
            raise InvalidOutput(f'turn {i} must be an object with exactly "role" and "text"')
        if turn["role"] != expected:
            raise InvalidOutput(f"turn {i} must be the {expected}'s, got {turn['role']!r}")
        if not isinstance(turn["text"], str) or not turn["text"].strip():
            raise InvalidOutput(f"turn {i} has no text")
        out.append({"role": expected, "text": turn["text"].strip()})
    if out[-1]["role"] != "assistant":
        raise InvalidOutput("the dialogue must end with the assistant")
    return out


def parse_dialogue(reply: Reply) -> list[dict]:
    text = _text(reply)
    try:
        obj = sources.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidOutput(f"not JSON ({e.msg} at character {e.pos})") from None
    except sources.LoneSurrogate as e:
        raise InvalidOutput(str(e)) from None
    if not isinstance(obj, dict) or set(obj) != {"turns"}:
        raise InvalidOutput('expected exactly the object {"turns": [...]}')
    return check_turns(obj["turns"])


PARSERS = {"rephrase": _text, "refuseweb": parse_dialogue, "moral": parse_article}


def refusal_problem(turns: list[dict]) -> str | None:
    """Why the dialogue's assistant does not refuse (see the module docstring), or None."""
    answers = [t["text"].replace("\u2019", "'") for t in turns if t["role"] == "assistant"]
    if not answers or not REFUSAL.search(answers[0]):
        return "the first assistant turn does not refuse"
    if any(COMPLIANCE.search(a) for a in answers):
        return "an assistant turn reads like step-by-step help"
    return None
