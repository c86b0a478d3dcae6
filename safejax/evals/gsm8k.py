"""GSM8K accuracy: the utility check of benign finetuning (PAPER.md §5 reports GSM8K among its
standard benchmarks). Greedy answers to the first N test questions, asked as a chat turn in the
dialogue template the finetune trained on; an answer is right when its final number equals the
reference's (the number after "####", else the last number written), commas and a trailing
".0" ignored.
"""

from __future__ import annotations

import re

import gin

from safejax.data import sources

TEST_FILE = sources.BUNDLED_PREFIX + "finetune/gsm8k/test.jsonl.gz"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer's final number, normalised ("1,200.0" -> "1200"), or None when it has none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    number = numbers[0] if "####" in text else numbers[-1]
    number = number.replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def questions(count: int, path: str = TEST_FILE) -> list[dict]:
    """The first `count` records {"question", "answer"} of the test split, in file order."""
    out = []
    for record in sources.iter_records(sources.expand_files(path), kind="dialogue"):
        out.append(record)
        if len(out) == count:
            break
    return out


def score(generator, records: list[dict], max_new_tokens: int = 256) -> dict:
    """Accuracy of the generator's greedy chat answers to `records`. A question whose prompt
    leaves no room in the model's context is counted wrong, and counted (`too_long`)."""
    from safejax.inference.generate import Request

    requests, answered = [], []
    for record in records:
        prompt = generator.encode_chat([{"role": "user", "content": record["question"]}])
        room = min(max_new_tokens, generator.loaded.context - len(prompt))
        if room > 0:
            requests.append(Request(prompt, generator.params(strategy="greedy", max_new_tokens=room), chat=True))
            answered.append(record)
    completions = generator.run(requests) if requests else []
    correct = sum(final_number(c.text) == final_number(r["answer"]) for c, r in zip(completions, answered))
    return {"examples": len(records), "correct": correct, "accuracy": correct / max(len(records), 1),
            "too_long": len(records) - len(answered)}


@gin.configurable
def gsm8k_accuracy(workdir: str, examples: int = 0, max_new_tokens: int = 256) -> dict | None:
    """The accuracy of WORKDIR's latest checkpoint on the first `examples` test questions (None
    when `examples` is 0: the stage has no utility check)."""
    if examples <= 0:
        return None
    from safejax.inference.generate import Generator

    return score(Generator.from_checkpoint(workdir), questions(examples), max_new_tokens)
