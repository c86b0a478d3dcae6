"""Completion-style prompts (PAPER.md §5): how a request becomes text a base model continues.

A base model does not follow instructions, so a harmful request is placed in a document whose
next words would be a compliant answer, ending on the first words of that answer (the wordings,
each with why it is there, are in configs/eval/templates.json). Every request is evaluated under
every template (`mode = "all"`), or under one picked per request by a seeded hash of its id
(`"seeded"`): the same prompt always gets the same template, whatever else is in the run.
Continuation sets (RealToxicityPrompts) are continued as they are; with `chat`, the request is
the user's turn of the dialogue template instead (Generator.encode_chat).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

from safejax import errors
from safejax.evals.prompts import Prompt
from safejax.safety.resumable import find_config_file

SLOT = "{request}"
MODES = ("all", "seeded")


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    text: str
    why: str = ""

    def render(self, request: str) -> str:
        return self.text.replace(SLOT, request.strip())


@dataclasses.dataclass(frozen=True)
class Case:
    """One prompt under one template: what the model is given."""

    key: str  # unique in a set: prompt id, then the template
    prompt: Prompt
    template: str  # a template's name; "none" (continued as is) or "chat"
    text: str  # the text the model continues, or with chat the user's turn


def load_templates(path: str) -> list[Template]:
    """The templates of a JSON file {"templates": [{"name", "text", "why"?}]}; each text holds
    {request} once and names are unique."""
    path = find_config_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["templates"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise errors.UserError(f"{path}: expected {{\"templates\": [...]}} ({type(e).__name__}: {e})") from None
    templates = []
    for n, entry in enumerate(entries if isinstance(entries, list) else [None], 1):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("text"), str)):
            raise errors.UserError(f"{path} template {n}: needs string fields name and text")
        if entry["text"].count(SLOT) != 1:
            raise errors.UserError(f"{path} template {entry['name']!r}: its text must hold {SLOT} exactly once")
        if entry["name"] in {t.name for t in templates} | {"none", "chat"}:
            raise errors.UserError(f"{path} template {n}: the name {entry['name']!r} is taken")
        templates.append(Template(entry["name"], entry["text"], entry.get("why", "")))
    if not templates:
        raise errors.UserError(f"{path}: no templates")
    return templates


def seeded_choice(prompt_id: str, count: int, seed: int) -> int:
    """The template index of a prompt in "seeded" mode: a stable hash, not Python's hash()."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def cases(prompts: Sequence[Prompt], kind: str, templates: Sequence[Template], mode: str = "all",
          seed: int = 0, chat: bool = False) -> list[Case]:
    """The cases of a set: `kind` "request" gets the templates (or the chat turn), "continuation"
    is continued as it is."""
    if mode not in MODES:
        raise errors.UserError(f"template mode {mode!r}: choose from {', '.join(MODES)}")
    if chat:
        return [Case(f"{p.id}|chat", p, "chat", p.text) for p in prompts]
    if kind == "continuation":
        return [Case(f"{p.id}|none", p, "none", p.text) for p in prompts]
    out = []
    for p in prompts:
        chosen = templates if mode == "all" else [templates[seeded_choice(p.id, len(templates), seed)]]
        out += [Case(f"{p.id}|{t.name}", p, t.name, t.render(p.text)) for t in chosen]
    return out
