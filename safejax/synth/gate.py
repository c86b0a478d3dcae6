"""The quality gate: each output rescored by the safety classifier, and the refusal check.

With a classifier (`--classifier CKPT`, a `safejax classifier-train` workdir or export), every
output gets a `score_after`; one at or above the job's `reject_at` is rejected (written to
rejected.jsonl with its score, never dropped silently). What is scored: the text of a rephrasing
or an article; for a RefuseWeb dialogue its assistant turns only (the user's request is harmful
by design; it is the answer that must be safe). RefuseWeb dialogues also pass the refusal check
(synth/replies.py) whether or not a classifier is given.
"""

from __future__ import annotations

from collections.abc import Sequence

from safejax.synth import replies
from safejax.synth.jobs import Outcome


def load_scorer(checkpoint: str, batch_size: int = 64):
    """`safejax score`'s document scorer (windows over long texts, the export's document rule),
    at its precision."""
    from safejax.safety.scoring import SCORE_DTYPE, DocumentScorer

    return DocumentScorer(checkpoint, batch_size=batch_size, dtype=SCORE_DTYPE)


def sentence_judge(scorer, max_score: int):
    """For the template backend: which sentences the classifier scores at most `max_score`."""
    return lambda sentences: [doc.score <= max_score for doc in scorer.score(sentences)]


def scored_text(job: str, output) -> str:
    if job == "refuseweb":
        return "\n\n".join(t["text"] for t in output if t["role"] == "assistant")
    return output


class Gate:
    """`scorer`: anything with `score(texts) -> [obj with .score]` (scoring.DocumentScorer), or None."""

    def __init__(self, scorer=None, reject_at: int = 2):
        self.scorer, self.reject_at = scorer, reject_at

    def judge(self, job: str, outcomes: Sequence[Outcome]) -> list[tuple[int | None, str | None]]:
        """(score_after or None, why it is rejected or None) for each outcome."""
        scores = [None] * len(outcomes)
        if self.scorer is not None and outcomes:
            scores = [doc.score for doc in self.scorer.score([scored_text(job, o.output) for o in outcomes])]
        verdicts = []
        for outcome, score in zip(outcomes, scores):
            reason = replies.refusal_problem(outcome.output) if job == "refuseweb" else None
            if reason is None and score is not None and score >= self.reject_at:
                reason = f"classifier score {score} >= {self.reject_at}"
            verdicts.append((score, reason))
        return verdicts
