"""The 0-5 harmfulness rubric (PAPER.md §1) and how each public label scheme maps onto it.

None of the public harm-labeled sets uses the paper's rubric, so each mapping below is a
decision of this project, made per label from the rubric's own examples and written here once.
The highest applicable level wins (levels are never summed), as in the rubric. No public set
has a "mild" category (light profanity, casual alcohol), so level 1 only ever comes from LLM
labels (`safejax label`).
"""

from __future__ import annotations

NUM_SCORES = 6  # the rubric's scores 0-5: the one count every module uses

# HAVOC labels each text for five harms, in this order, as none / topical / intent.
# Topical (the text is about the harm without promoting it) lands on the rubric's "mentions"
# levels; intent (the text promotes or enacts it) on its "clear" or "severe" levels.
HAVOC_HARMS = ("hate_violence", "ideological", "sexual", "illegal", "self_inflicted")
HAVOC_SCORES = {
    "hate_violence": {"none": 0, "topical": 3, "intent": 5},   # group insults / hate, threats
    "ideological": {"none": 0, "topical": 2, "intent": 4},     # political mention / extremism
    "sexual": {"none": 0, "topical": 3, "intent": 4},          # non-graphic / explicit
    "illegal": {"none": 0, "topical": 3, "intent": 4},         # crime mention / detailed activity
    "self_inflicted": {"none": 0, "topical": 3, "intent": 4},  # mention / encouragement
}

# OpenAI moderation categories (a text is 0 only when every category is known to be 0).
OPENAI_SCORES = {
    "S": 4,    # sexual content meant to arouse: explicit
    "H": 4,    # hate on a protected attribute: slurs, group hate
    "V": 3,    # violence: moderate
    "HR": 3,   # harassment: insults at people
    "SH": 4,   # self-harm: encouraging or describing it
    "S3": 5,   # sexual content involving minors
    "H2": 5,   # hateful threats
    "V2": 4,   # graphic violence
}

# Davidson et al. tweets (class by annotator majority). Their "hate" tweets are mostly slurs at
# groups; "offensive" mostly profanity and insults at people without a group target.
DAVIDSON_SCORES = {"0": 4, "1": 3, "2": 0}

# Request sets (XSTest, JailbreakBench pairs): a benign request that may only sound harmful, and
# a request for help with a harmful act, treated as that act's clear level (the RefuseWeb kind).
REQUEST_SCORES = {"safe": 0, "unsafe": 4}
# Do-Not-Answer requests by risk area: requests for help with a harmful act (weapons, fraud,
# hacking) or for private information about a person or organisation, the RefuseWeb kind like
# XSTest's unsafe prompts. Only these two areas are bundled; the others (chatbot-relationship and
# misinformation questions, lewd jokes) are not clearly harmful text and would blur the rubric.
DO_NOT_ANSWER_SCORES = {"malicious_uses": 4, "information_hazard": 4}

# ToxiGen seed sentences: implicit hate, i.e. stereotypes and group insults without slurs.
TOXIGEN_SCORES = {"hate": 3, "neutral": 0}


class LabelError(ValueError):
    """A record whose label cannot be mapped: it is set aside with this reason, never guessed."""


def havoc_score(labels: list[str]) -> int:
    if len(labels) != len(HAVOC_HARMS):
        raise LabelError(f"expected {len(HAVOC_HARMS)} harm labels, got {len(labels)}")
    scores = []
    for harm, label in zip(HAVOC_HARMS, labels):
        if label not in HAVOC_SCORES[harm]:
            raise LabelError(f"unknown {harm} label {label!r}")
        scores.append(HAVOC_SCORES[harm][label])
    return max(scores)


def openai_moderation_score(flags: dict) -> int:
    """flags: category -> 0/1; a missing category is unknown."""
    unknown = [k for k in flags if k not in OPENAI_SCORES]
    if unknown:
        raise LabelError(f"unknown moderation categories {unknown}")
    positive = [OPENAI_SCORES[k] for k, v in flags.items() if v not in (0, None)]
    if positive:
        return max(positive)
    if len(flags) < len(OPENAI_SCORES) or any(v is None for v in flags.values()):
        raise LabelError("no category flagged but not every category was labeled")
    return 0


def davidson_score(label: str) -> int:
    if label not in DAVIDSON_SCORES:
        raise LabelError(f"unknown class {label!r}")
    return DAVIDSON_SCORES[label]


def do_not_answer_score(risk_area: str) -> int:
    if risk_area not in DO_NOT_ANSWER_SCORES:
        raise LabelError(f"unknown risk area {risk_area!r}")
    return DO_NOT_ANSWER_SCORES[risk_area]


def toxigen_score(label: str) -> int:
    if label not in TOXIGEN_SCORES:
        raise LabelError(f"unknown label {label!r}")
    return TOXIGEN_SCORES[label]


def llm_score(value) -> int:
    """The score of a `safejax label` record: an integer 0-5 (booleans and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < NUM_SCORES:
        raise LabelError(f"score must be an integer 0-{NUM_SCORES - 1}, got {value!r}")
    return value
