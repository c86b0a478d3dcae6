"""Conversations in the common JSONL formats, read into one shape: turns [{"role", "text"}].

Accepted record formats (one per line, extra fields travel along):

    {"turns": [{"role": "user" | "assistant", "text": ...}, ...]}     ours (RefuseWeb, synth)
    {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}   OpenAI
    {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ..."}                   HH-RLHF
    {"question": ..., "answer": ...}                                  question/answer (GSM8K)

The dialogue template (data/dialogue.py) has user and assistant turns only, so a system message
is folded into the next user turn, before its text and a blank line (a template with a third
marker would change the reserved ids of every vocabulary). Each reader is validated here once:
a record that is not a conversation gives the reason it is set aside (data/quarantine.py).
"""

from __future__ import annotations

import re

ROLES = ("user", "assistant")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class NotAConversation(ValueError):
    """The record's problem, a short reason code then a detail (e.g. the role it did not know)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise NotAConversation("bad_turn", f"{where} has no text")
    return value


def _from_turns(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise NotAConversation("missing_turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise NotAConversation("bad_turn", f"turns[{i}] is not an object")
        if turn.get("role") not in ROLES:
            raise NotAConversation("unknown_role", f"turns[{i}] has role {turn.get('role')!r}")
        out.append({"role": turn["role"], "text": _text(turn.get("text"), f"turns[{i}]")})
    return out


def _from_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise NotAConversation("missing_turns")
    turns, system = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise NotAConversation("bad_turn", f"messages[{i}] is not an object")
        role, content = message.get("role"), _text(message.get("content"), f"messages[{i}]")
        if role == "system":
            system.append(content)
        elif role in ROLES:
            if role == "user" and system:
                content = "\n\n".join([*system, content])
                system = []
            turns.append({"role": role, "text": content})
        else:
            raise NotAConversation("unknown_role", f"messages[{i}] has role {role!r}")
    if system:
        raise NotAConversation("bad_turn", "a system message with no user turn after it")
    return turns


def _from_hh(text) -> list[dict]:
    if not isinstance(text, str):
        raise NotAConversation("bad_turn", "`chosen` is not a string")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise NotAConversation("bad_turn", "`chosen` does not start with \\n\\nHuman: or \\n\\nAssistant:")
    return [{"role": _HH_ROLES[speaker], "text": _text(body.strip(), f"`chosen` turn {i}")}
            for i, (speaker, body) in enumerate(zip(parts[1::2], parts[2::2]))]


def to_turns(record: dict) -> list[dict]:
    """The record's turns, from whichever format it is in (checked in the order above)."""
    if "turns" in record:
        return _from_turns(record["turns"])
    if "messages" in record:
        return _from_messages(record["messages"])
    if "chosen" in record:
        return _from_hh(record["chosen"])
    if "question" in record or "answer" in record:
        return [{"role": "user", "text": _text(record.get("question"), "`question`")},
                {"role": "assistant", "text": _text(record.get("answer"), "`answer`")}]
    raise NotAConversation("missing_turns", "no turns, messages, chosen or question/answer field")
