"""The synthesis prompts (configs/synth/*.md), one file per job, versioned by content hash.

A prompt file is markdown cut into sections by `## ` headings:

    ## System          the system message
    ## Style: NAME     (rephrase only) what the style asks for, appended to the system message
    ## User            the user message; placeholders {text} {piece} {pieces} {user} {assistant}
                       {dialogue}, whichever the job fills
    ## Repair          the follow-up after an unusable reply; {error} says what was wrong

The prompt version (`sha`) is a hash of the whole file: any change of wording gives new cache
keys, and an output directory made with other prompts is refused (its manifest names the sha).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from safejax import errors
from safejax.safety import resumable

_SECTION = re.compile(r"^## (.+)$", re.MULTILINE)


def content_sha(*parts: str) -> str:
    """16 hex digits naming a version of some texts (prompt files, template wordings and code)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part.encode()).digest())
    return digest.hexdigest()[:16]


def fill(template: str, values: dict[str, str]) -> str:
    """Replaces {name} for the given names only: the rest of the text (JSON examples with braces)
    stays as written."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template


@dataclasses.dataclass(frozen=True)
class Prompt:
    system: str
    user: str
    repair_message: str
    styles: dict[str, str]  # style name -> its instructions (rephrase)
    sha: str
    path: str

    @classmethod
    def load(cls, path: str) -> Prompt:
        path = resumable.find_config_file(path)
        with open(path, encoding="utf-8") as f:
            content = f.read()
        parts = _SECTION.split(content)
        sections, styles = {}, {}
        for title, body in zip(parts[1::2], parts[2::2]):
            title, body = title.strip(), body.strip()
            if title.lower().startswith("style:"):
                styles[title.split(":", 1)[1].strip()] = body
            else:
                sections[title.lower()] = body
        missing = [name for name in ("system", "user", "repair") if not sections.get(name)]
        if missing:
            raise errors.UserError(f"prompt file {path} has no '## {missing[0].title()}' section")
        if "{error}" not in sections["repair"]:
            raise errors.UserError(f"prompt file {path}: the Repair section must contain {{error}}")
        return cls(sections["system"], sections["user"], sections["repair"], styles, content_sha(content), path)

    def check_styles(self, styles: tuple[str, ...]) -> None:
        unknown = [s for s in styles if s not in self.styles]
        if unknown:
            raise errors.UserError(f"style {unknown[0]!r} has no '## Style: {unknown[0]}' section in {self.path}")

    def messages(self, values: dict[str, str], style: str | None = None) -> list[dict]:
        system = self.system if style is None else f"{self.system}\n\n{self.styles[style]}"
        return [{"role": "system", "content": fill(system, values)},
                {"role": "user", "content": fill(self.user, values)}]

    def repair(self, messages: list[dict], reply: str, error: str) -> list[dict]:
        return messages + [{"role": "assistant", "content": reply},
                           {"role": "user", "content": fill(self.repair_message, {"error": error})}]
