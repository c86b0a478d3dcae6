"""Long documents cut into pieces for synthesis, at paragraph or sentence boundaries.

An LLM rewrites a long document worse than a short one (it drops or summarises the middle), and
its reply is bounded by max_tokens, so each piece of at most `max_chars` characters becomes its
own request and its own record. Paragraphs (blank-line separated) are packed greedily; a paragraph
longer than a piece is cut between sentences, a sentence longer than a piece between words, and
only a single word longer than a piece is cut inside it.
"""

from __future__ import annotations

import re

_PARAGRAPH = re.compile(r"\n\s*\n")
# A sentence ends at . ! or ? (and closing quotes or brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def sentences(text: str) -> list[str]:
    """The text's sentences, whitespace inside each collapsed to single spaces."""
    out = []
    for paragraph in _PARAGRAPH.split(text):
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            sentence = " ".join(sentence.split())
            if sentence:
                out.append(sentence)
    return out


def _pack(units: list[str], max_chars: int, joiner: str) -> list[str]:
    """Greedy packing of units (each at most max_chars) into pieces of at most max_chars."""
    pieces, current = [], ""
    for unit in units:
        if current and len(current) + len(joiner) + len(unit) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}{joiner}{unit}" if current else unit
    if current:
        pieces.append(current)
    return pieces


def _fit(text: str, max_chars: int, level: int) -> list[str]:
    """Units of `text` no longer than max_chars, cutting at the coarsest boundary that does."""
    if len(text) <= max_chars:
        return [text]
    if level == 0:
        parts, joiner = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()], "\n\n"
    elif level == 1:
        parts, joiner = [s for s in _SENTENCE_END.split(text) if s.strip()], " "
    elif level == 2:
        parts, joiner = text.split(), " "
    else:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    if len(parts) <= 1 and level < 3:
        return _fit(text, max_chars, level + 1)
    units = [unit for part in parts for unit in _fit(part, max_chars, level + 1)]
    return _pack(units, max_chars, joiner)


def cut(text: str, max_chars: int) -> list[str]:
    """The pieces of `text` (one when it fits, none when it is blank); 0 never cuts."""
    text = text.strip()
    if not text:
        return []
    if max_chars <= 0:
        return [text]
    return _fit(text, max_chars, 0)
