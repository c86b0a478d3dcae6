"""Decoding settings: one gin-configurable record, validated with errors that name the field.

Defaults live in configs/sample/default.gin; the CLI and the server override single fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import gin

from safejax import errors

STRATEGIES = ("greedy", "sample", "beam", "safebeam")
TAG_FILTERS = ("none", "reject", "reweight")
DROP_MODES = ("tag", "random")
SEED_LIMIT = 1 << 32  # the sampler's per-row key is made from a uint32


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to decode. Fields used by one strategy are ignored by the others.

    greedy / sample: `temperature`, `top_k` (0: off), `top_p` (1: off) compose in that order;
      `tag_filter` makes them tag-aware: the `tag_candidates` most likely tokens are looked ahead
      one step and those whose next-token harm-tag probability exceeds `tag_threshold` are
      rejected (`reject`), or every candidate's probability is multiplied by 1 - p_tag
      (`reweight`).
    beam / safebeam: `num_beams` (k), `length_penalty` (score = log-prob / length**penalty);
      safebeam adds `expansions` (N per beam), `drop_fraction` of the candidates dropped by
      highest lookahead tag probability (`drop_mode = 'random'`: a random fraction, the control),
      and `short_circuit` (stop once the tag is the best beam's most likely next token).
    The harm tag is never emitted unless `allow_tag`. `min_tokens`: the stop tokens (end of text,
    and end of turn in chat) are banned until that many new tokens are out (= max_new_tokens:
    never end early); stop strings still end a text.
    """

    strategy: str = "greedy"
    max_new_tokens: int = 64
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_beams: int = 4
    length_penalty: float = 1.0
    expansions: int = 8
    drop_fraction: float = 0.5
    drop_mode: str = "tag"
    short_circuit: bool = False
    tag_filter: str = "none"
    tag_threshold: float = 0.5
    tag_candidates: int = 8
    allow_tag: bool = False
    stop: tuple[str, ...] = ()

    def replace(self, **changes) -> SamplingParams:
        """A copy with some fields changed; unknown names are a UserError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise errors.UserError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        if isinstance(changes.get("stop"), (list, str)):
            changes["stop"] = (changes["stop"],) if isinstance(changes["stop"], str) else tuple(changes["stop"])
        return dataclasses.replace(self, **changes)

    def validate(self, vocab_size: int, has_tag: bool) -> SamplingParams:
        """Raises UserError naming the first bad field; returns self."""
        def need(ok, field, rule):
            if not ok:
                raise errors.UserError(f"sampling parameter {field}={getattr(self, field)!r}: {rule}")

        need(self.strategy in STRATEGIES, "strategy", f"choose from {', '.join(STRATEGIES)}")
        need(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "must be an integer >= 1")
        need(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_new_tokens, "min_tokens",
             f"must be an integer in 0..max_new_tokens ({self.max_new_tokens})")
        need(_is_num(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        need(self.strategy != "sample" or self.temperature > 0, "temperature",
             "must be > 0 for strategy 'sample' (0 means greedy)")
        need(_is_int(self.top_k) and 0 <= self.top_k <= vocab_size, "top_k", f"must be in 0..{vocab_size}")
        need(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT, "seed",
             "must be an integer in [0, 2**32) (a sampling key holds 32 bits: larger seeds would collide)")
        need(_is_int(self.num_beams) and 1 <= self.num_beams <= 64, "num_beams", "must be in 1..64")
        need(_is_num(self.length_penalty) and -4 <= self.length_penalty <= 4, "length_penalty", "must be in [-4, 4]")
        need(_is_int(self.expansions) and 1 <= self.expansions <= min(64, vocab_size), "expansions",
             f"must be in 1..{min(64, vocab_size)}")
        need(_is_num(self.drop_fraction) and 0 <= self.drop_fraction < 1, "drop_fraction", "must be in [0, 1)")
        need(self.drop_mode in DROP_MODES, "drop_mode", f"choose from {', '.join(DROP_MODES)}")
        need(self.tag_filter in TAG_FILTERS, "tag_filter", f"choose from {', '.join(TAG_FILTERS)}")
        need(self.tag_filter == "none" or self.strategy in ("greedy", "sample"), "tag_filter",
             "applies to greedy and sample; safebeam steers beams")
        need(_is_num(self.tag_threshold) and 0 <= self.tag_threshold <= 1, "tag_threshold", "must be in [0, 1]")
        need(_is_int(self.tag_candidates) and 1 <= self.tag_candidates <= min(64, vocab_size), "tag_candidates",
             f"must be in 1..{min(64, vocab_size)}")
        need(isinstance(self.short_circuit, bool), "short_circuit", "must be true or false")
        need(isinstance(self.allow_tag, bool), "allow_tag", "must be true or false")
        need(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 8, "stop",
             "must be at most 8 non-empty strings")
        if not has_tag and (self.strategy == "safebeam" or self.tag_filter != "none"):
            raise errors.UserError(f"strategy {self.strategy!r}{' with tag_filter' if self.tag_filter != 'none' else ''} "
                                   "needs the harm tag, but the checkpoint's vocabulary has no "
                                   "<potentially unsafe content> token")
        return self


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def add_arguments(parser) -> None:
    """One command-line flag per SamplingParams field; unset flags keep the gin-bound value."""
    for f in dataclasses.fields(SamplingParams):
        if f.name == "stop":
            parser.add_argument("--stop", action="append", help="stop string (repeatable)")
        elif f.type == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            choices = {"strategy": STRATEGIES, "drop_mode": DROP_MODES, "tag_filter": TAG_FILTERS}.get(f.name)
            parser.add_argument(f"--{f.name}", type=kind, choices=choices,
                                help=f"default: the gin binding (configs/sample/default.gin: {f.default!r})")


def overrides(args) -> dict:
    """The SamplingParams fields set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams)
            if getattr(args, f.name, None) is not None}
