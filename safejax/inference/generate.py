"""The Python API for text generation, used by `safejax sample`, the server and the evaluations.

    gen = Generator.from_checkpoint("runs/tiny")
    [c] = gen.generate(["Once upon a time"], gen.params(strategy="safebeam", max_new_tokens=32))
    c.text, c.finish_reason

Requests with different settings may be passed together: they are grouped by what changes the
compiled program (strategy family, beam count, modes) and each group decodes as one batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import gin

from safejax import errors
from safejax import vocab as vocab_lib
from safejax.data import conversations, dialogue
from safejax.inference import checkpoint
from safejax.inference import lm as lm_lib
from safejax.inference.params import SamplingParams
from safejax.inference.safebeam import BeamSearcher
from safejax.inference.sampler import Output, TokenSampler

USER, ASSISTANT, END_OF_TURN = vocab_lib.ROLE_MARKERS


@dataclasses.dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    chat: bool = False  # a chat turn also stops at the end-of-turn marker


@dataclasses.dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # stop | length | tag
    prompt_tokens: int
    score: float | None = None
    # p(harm tag) at each new token's position, aligned with `tokens` (None: no tag in the vocabulary)
    tag_probability: list[float] | None = None

    @property
    def mean_tag_probability(self) -> float | None:
        if not self.tag_probability:
            return None
        return sum(self.tag_probability) / len(self.tag_probability)


@gin.configurable
class Generator:
    """A loaded model plus its vocabulary: text (or chat messages) in, completions out."""

    def __init__(self, loaded: checkpoint.Loaded, chunk_steps: int = 16):
        self.loaded = loaded
        self.vocabulary = loaded.vocabulary
        self.tag_id = loaded.reserved.get(vocab_lib.HARM_TAG)
        lm = lm_lib.decoder_lm(loaded.model, loaded.context, loaded.mesh, loaded.rules)
        self.sampler = TokenSampler(lm, self.tag_id, chunk_steps)
        self.searcher = BeamSearcher(lm, self.tag_id)

    @classmethod
    def from_checkpoint(cls, workdir: str, step: int | None = None, gin_files=(), bindings=(),
                        vocab_path: str | None = None) -> Generator:
        checkpoint.parse_config(workdir, gin_files, bindings)
        return cls(checkpoint.load(workdir, step, vocab_path))

    def params(self, **overrides) -> SamplingParams:
        """The gin-bound defaults (configs/sample/default.gin) with some fields changed, validated."""
        return SamplingParams().replace(**overrides).validate(self.loaded.config.vocab_size, self.tag_id is not None)

    # ---- prompts ----

    def encode(self, text: str) -> list[int]:
        return list(self.vocabulary.encode(text))

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """The dialogue template the model was trained on (data/dialogue.py), ending where the
        assistant speaks next: <|user|> User: text <|end_of_turn|> ... <|assistant|> Assistant:

        Messages are read as finetuning reads them (data/conversations.py: a system message goes
        before the next user turn's text).
        """
        if "<|user|>" not in self.loaded.reserved:
            raise errors.UserError("chat needs the role markers, but the checkpoint's vocabulary has none")
        try:
            turns = conversations.to_turns({"messages": list(messages)})
        except conversations.NotAConversation as e:
            raise errors.UserError(f"messages: {e.detail or e.reason} (each needs a role system|user|assistant "
                                   "and a non-empty string content)") from None
        return dialogue.encode_dialogue(self.vocabulary, turns, generation_prompt=True)

    def check(self, request: Request) -> Request:
        """Raises UserError when the request cannot run on this model."""
        if not request.prompt:
            raise errors.UserError("the prompt is empty")
        need = len(request.prompt) + request.params.max_new_tokens
        if need > self.loaded.context:
            raise errors.UserError(f"the prompt ({len(request.prompt)} tokens) plus max_new_tokens "
                                   f"({request.params.max_new_tokens}) exceeds the model's context of "
                                   f"{self.loaded.context} tokens")
        return request

    # ---- generation ----

    def generate(self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Prompt i of the call samples with seed + i, so that equal prompts give different samples."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        return self.run([Request(self.encode(p), q.replace(seed=q.seed + i))
                         for i, (p, q) in enumerate(zip(prompts, params))])

    def run(self, requests: Sequence[Request], on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Decodes the requests, grouped into batches; on_text(i, delta) streams text as it comes
        (token strategies by chunks, beam strategies once at the end)."""
        for r in requests:
            self.check(r)
        results: list[Completion | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(_group_key(r), []).append(i)
        for indices in groups.values():
            for i, c in zip(indices, self._run_group([requests[i] for i in indices], indices, on_text)):
                results[i] = c
        return results

    def _run_group(self, group: list[Request], indices: list[int], on_text) -> list[Completion]:
        eos = self.vocabulary.eos_id  # 1 in our vocabularies; an imported tokenizer names its own
        stop_ids = (eos, self.loaded.reserved[END_OF_TURN]) if group[0].chat else (eos,)
        prompts, params = [r.prompt for r in group], [r.params for r in group]
        texts = _Texts(self.vocabulary, params, indices, on_text, prompts)
        if group[0].params.strategy in ("greedy", "sample"):
            outputs = self.sampler.run(prompts, params, stop_ids, texts.update)
        else:
            outputs = self.searcher.run(prompts, params, stop_ids)
        return [texts.finish(j, out, len(r.prompt)) for j, (r, out) in enumerate(zip(group, outputs))]


class _Texts:
    """Decoded text per row while decoding runs: stop strings end a row, and only text that no
    stop string can still claim is streamed.

    A continuation is decoded after the end of its prompt and the prompt's text removed, so that
    it keeps the space its first piece starts with (decoded alone, a SentencePiece "▁word" loses
    it, and prompt + text would glue two words).
    """

    ANCHOR_TOKENS = 4  # prompt tokens decoded before the continuation

    def __init__(self, vocabulary, params, indices, on_text, prompts):
        self.vocabulary, self.params, self.indices, self.on_text = vocabulary, params, indices, on_text
        self.sent = [0] * len(params)
        self.anchors = [list(p[-self.ANCHOR_TOKENS:]) for p in prompts]
        self.anchor_texts = [vocabulary.decode(a) for a in self.anchors]

    def decode(self, j: int, ids: list[int]) -> str:
        whole = self.vocabulary.decode(self.anchors[j] + list(ids))
        if self.anchor_texts[j] and whole.startswith(self.anchor_texts[j]):
            return whole[len(self.anchor_texts[j]):]
        return self.vocabulary.decode(ids)

    def update(self, tokens: list[list[int]], done: list[bool]) -> list[int]:
        stop_rows = []
        for j, ids in enumerate(tokens):
            text, cut = _cut(self.decode(j, ids), self.params[j].stop)
            if cut:
                stop_rows.append(j)
            if not (cut or done[j]):  # hold back what a stop string or a split UTF-8 character may claim
                text = text.rstrip("\ufffd")
                text = text[:len(text) - max((len(s) - 1 for s in self.params[j].stop), default=0)]
            self._send(j, text)
        return stop_rows

    def finish(self, j: int, out: Output, prompt_tokens: int) -> Completion:
        text, cut = _cut(self.decode(j, out.tokens), self.params[j].stop)
        self._send(j, text)
        return Completion(text, out.tokens, "stop" if cut else out.finish_reason, prompt_tokens, out.score,
                          out.tag_probability)

    def _send(self, j, text):
        upto = len(text)
        if self.on_text is not None and upto > self.sent[j]:
            self.on_text(self.indices[j], text[self.sent[j]:upto])
            self.sent[j] = upto


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one occurred."""
    positions = [p for p in (text.find(s) for s in stops) if p >= 0]
    return (text[:min(positions)], True) if positions else (text, False)


def _group_key(r: Request) -> tuple:
    p = r.params
    if p.strategy in ("greedy", "sample"):
        return ("token", p.tag_filter, p.tag_candidates if p.tag_filter != "none" else 0, p.allow_tag, r.chat)
    return (p.strategy, p.num_beams, p.expansions if p.strategy == "safebeam" else 0, p.drop_mode,
            p.short_circuit, p.allow_tag, r.chat)
