"""Token-by-token decoding with a KV cache: greedy, temperature, top-k, top-p, tag-aware.

One compiled loop serves every row setting: greedy rows are rows with temperature 0, and
temperature, top-k, top-p, seed and length are per-row arrays, so requests with different
settings share a batch (the server relies on this). The loop runs on the device (`while_loop`)
for `chunk_steps` tokens at a time; between chunks the host checks stop strings and streams.

Tag-aware decoding (`tag_filter`): each step looks ahead one token for the M most likely
candidates, all M in one tree-shaped forward call (each candidate sees the prefix and itself).
The tag probability after each candidate decides (reject above a threshold, or reweight by
1 - p_tag), and the chosen candidate's lookahead logits are the next step's logits, so the
lookahead replaces the next step's forward pass instead of adding one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safejax.inference import lm as lm_lib
from safejax.inference.params import SamplingParams

NEG_INF = -jnp.inf


@dataclasses.dataclass
class Output:
    """One row's result: new token ids (without the stop token), why it ended, for beam
    strategies the length-penalised score, and the harm tag's probability at each new token's
    position (before that token was chosen; None for a vocabulary without the tag)."""

    tokens: list[int]
    finish_reason: str  # stop | length | tag (Safe Beam short-circuit)
    score: float | None = None
    tag_probability: list[float] | None = None


def bucket(n: int, multiple: int) -> int:
    """Rounds shapes up so that a few compiled programs serve all request sizes."""
    return max(multiple, -(-n // multiple) * multiple)


def batch_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def mask_tag(logits: jax.Array, tag_id: int | None) -> jax.Array:
    """Makes the harm tag impossible to emit."""
    return logits if tag_id is None else logits.at[..., tag_id].set(NEG_INF)


def ban_stops(logits: jax.Array, early: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    """(b, V) logits with the stop tokens impossible in rows where `early` (min_tokens not reached)."""
    stops = jnp.asarray(stop_ids)
    return logits.at[:, stops].set(jnp.where(early[:, None], NEG_INF, logits[:, stops]))


def tag_probability_or_zero(logits: jax.Array, tag_id: int | None) -> jax.Array:
    return jnp.zeros(logits.shape[:-1], jnp.float32) if tag_id is None else tag_probability(logits, tag_id)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature, then top-k (0: off), then top-p (nucleus) on (b, V) logits, per row.

    The kept tokens are a prefix of the sorted logits, so one threshold per row applies both
    filters; tokens below it become -inf.
    """
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    desc = -jnp.sort(-scaled, axis=-1)
    rank = jnp.arange(v)[None, :]
    in_top_k = rank < jnp.where(top_k > 0, top_k, v)[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, desc, NEG_INF), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & ((mass_before < top_p[:, None]) | (rank == 0))
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, NEG_INF)


def _categorical(keys, logits):
    return jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, logits)


def split_keys(keys):
    """Splits every row's PRNG key: (next keys, keys to use now)."""
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


@dataclasses.dataclass(frozen=True)
class _Static:
    """What changes the compiled program (everything else is a per-row array)."""

    tag_id: int | None  # masked from the output unless allow_tag
    lookahead_tag: int | None  # the tag id when tag-aware, else None
    tag_filter: str
    candidates: int
    stop_ids: tuple[int, ...]


class TokenSampler:
    """Greedy and sampled decoding of a batch of token-id prompts on a CachedLM."""

    def __init__(self, lm: lm_lib.CachedLM, tag_id: int | None, chunk_steps: int = 16):
        self.lm, self.tag_id, self.chunk_steps = lm, tag_id, chunk_steps
        self._start = jax.jit(self._start_fn, static_argnames=("static", "cache_length", "capacity"))
        self._advance = jax.jit(self._advance_fn, static_argnames=("static",), donate_argnums=(1,))

    def run(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
            stop_ids: tuple[int, ...], on_chunk: Callable | None = None) -> list[Output]:
        """Decodes each prompt with its own settings (same tag_filter for all).

        on_chunk(tokens_so_far, done) is called after every chunk with per-row lists; it returns
        the rows to stop now (stop strings, a client gone) or None.
        """
        n = len(prompts)
        b = batch_bucket(n)
        first = params[0]
        tag_aware = first.tag_filter != "none"
        static = _Static(None if first.allow_tag else self.tag_id, self.tag_id if tag_aware else None,
                         first.tag_filter, first.tag_candidates if tag_aware else 0, tuple(stop_ids))
        prompt_len = bucket(max(len(p) for p in prompts), 16)
        capacity = bucket(max(p.max_new_tokens for p in params), 16)
        rows = list(prompts) + [[stop_ids[0]]] * (b - n)  # filler rows, done from the start
        tokens, pad = lm_lib.left_pad(rows, prompt_len, 0)
        settings = _row_settings(params, b)
        state = self._start(self.lm.params, tokens, pad, settings, np.arange(b) >= n, static=static,
                            cache_length=prompt_len + capacity + static.candidates, capacity=capacity)
        stopped = np.zeros(b, bool)
        while True:
            state = self._advance(self.lm.params, state, settings, self.chunk_steps, static=static)
            out, done, steps = jax.device_get((state["tokens"], state["done"], state["step"]))
            done = done | stopped
            if on_chunk is not None:
                so_far = [_until_stop(out[i], stop_ids, int(steps)) for i in range(n)]
                for i in on_chunk(so_far, list(done[:n])) or ():
                    stopped[i] = done[i] = True
                if stopped.any():
                    state["done"] = state["done"] | jnp.asarray(stopped)
            if done.all() or steps >= capacity:
                break
        p_tag = jax.device_get(state["p_tag"]) if self.tag_id is not None else [None] * n
        return [_output(out[i], stop_ids, params[i].max_new_tokens, p_tag[i]) for i in range(n)]

    # ---- compiled ----

    def _start_fn(self, params, tokens, pad, settings, done, *, static, cache_length, capacity):
        logits, cache = lm_lib.prefill(self.lm, params, tokens, pad, cache_length)
        b = tokens.shape[0]
        return {"cache": cache, "logits": logits, "pad": pad, "index": jnp.int32(tokens.shape[1]),
                "step": jnp.int32(0), "tokens": jnp.zeros((b, capacity), jnp.int32),
                "p_tag": jnp.zeros((b, capacity), jnp.float32), "done": done, "keys": jax.vmap(jax.random.key)(settings["seed"])}

    def _advance_fn(self, params, state, settings, steps, *, static):
        capacity = state["tokens"].shape[1]

        def cond(carry):
            s, i = carry
            return (i < steps) & (s["step"] < capacity) & ~jnp.all(s["done"])

        def body(carry):
            s, i = carry
            return self._step(params, s, settings, static), i + 1

        state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
        return state

    def _step(self, params, s, settings, static):
        keys, sub = split_keys(s["keys"])
        greedy = settings["temperature"] == 0
        p_tag = tag_probability_or_zero(s["logits"], self.tag_id)
        logits = ban_stops(mask_tag(s["logits"], static.tag_id), s["step"] < settings["min_new"], static.stop_ids)

        def sampled():
            filtered = jnp.where(greedy[:, None], logits, filter_logits(
                logits, settings["temperature"], settings["top_k"], settings["top_p"]))
            return filtered, jnp.where(greedy, jnp.argmax(logits, axis=-1), _categorical(sub, filtered))

        # An all-greedy batch skips the sort and the random draw.
        filtered, token = jax.lax.cond(jnp.all(greedy), lambda: (logits, jnp.argmax(logits, axis=-1)), sampled)
        if static.lookahead_tag is None:
            next_logits, cache = self.lm.forward(
                params, token[:, None], lm_lib.positions(s["pad"], s["index"], 1), s["cache"],
                s["index"], lm_lib.attend_mask(s["pad"], s["index"], 1, cache_length(s)))
            next_logits = next_logits[:, 0]
        else:
            token, next_logits, cache = self._tag_aware(params, s, settings, static, filtered, greedy, sub)
        done = s["done"]
        token = jnp.where(done, 0, token).astype(jnp.int32)
        finished = jnp.isin(token, jnp.asarray(static.stop_ids)) | (s["step"] + 1 >= settings["max_new"])
        return {**s, "cache": cache, "logits": next_logits, "index": s["index"] + 1, "step": s["step"] + 1,
                "tokens": s["tokens"].at[:, s["step"]].set(token), "p_tag": s["p_tag"].at[:, s["step"]].set(p_tag),
                "done": done | finished, "keys": keys}

    def _tag_aware(self, params, s, settings, static, filtered, greedy, sub):
        m = static.candidates
        cand_logit, cand = jax.lax.top_k(filtered, m)
        lookahead, cache = self.lm.forward(
            params, cand, lm_lib.positions(s["pad"], s["index"], m, tree=True), s["cache"], s["index"],
            lm_lib.attend_mask(s["pad"], s["index"], m, cache_length(s), tree=True))
        p_tag = tag_probability(lookahead, static.lookahead_tag)
        cand_logit = tag_adjust(cand_logit, p_tag, settings["tag_threshold"], static.tag_filter)
        choice = jnp.where(greedy, jnp.argmax(cand_logit, axis=-1), _categorical(sub, cand_logit))
        rows = jnp.arange(cand.shape[0])
        return cand[rows, choice], lookahead[rows, choice], lm_lib.commit(cache, s["index"], choice)


def tag_probability(logits: jax.Array, tag_id: int) -> jax.Array:
    """The harm tag's probability under each row of logits, without a full softmax."""
    return jnp.exp(logits[..., tag_id] - jax.nn.logsumexp(logits, axis=-1))


def tag_adjust(cand_logit: jax.Array, p_tag: jax.Array, threshold: jax.Array, mode: str) -> jax.Array:
    """Candidate logits (b, M) after the tag filter. reject: candidates whose lookahead tag
    probability exceeds the row's threshold are removed (when all are, the least risky one stays);
    reweight: each probability is multiplied by 1 - p_tag."""
    if mode == "reweight":
        return cand_logit + jnp.log1p(-jnp.minimum(p_tag, 1.0 - 1e-7))
    valid = jnp.isfinite(cand_logit)
    ok = valid & (p_tag <= threshold[:, None])
    safest = jnp.argmin(jnp.where(valid, p_tag, jnp.inf), axis=-1)
    ok = ok | (~ok.any(axis=-1, keepdims=True) & (jnp.arange(p_tag.shape[1])[None] == safest[:, None]))
    return jnp.where(ok, cand_logit, NEG_INF)


def cache_length(state) -> int:
    return jax.tree.leaves(state["cache"])[0].shape[2]


def _row_settings(params: Sequence[SamplingParams], b: int) -> dict[str, np.ndarray]:
    """Per-row arrays (host numpy: no device work before the compiled call); filler rows repeat
    the first row's settings."""
    rows = list(params) + [params[0]] * (b - len(params))
    pick = lambda f, dtype: np.asarray([f(p) for p in rows], dtype)  # noqa: E731
    return {"temperature": pick(lambda p: 0.0 if p.strategy == "greedy" else p.temperature, np.float32),
            "top_k": pick(lambda p: p.top_k, np.int32), "top_p": pick(lambda p: p.top_p, np.float32),
            "tag_threshold": pick(lambda p: p.tag_threshold, np.float32),
            "max_new": pick(lambda p: p.max_new_tokens, np.int32), "min_new": pick(lambda p: p.min_tokens, np.int32),
            "seed": pick(lambda p: p.seed % (1 << 32), np.uint32)}


def _until_stop(row: np.ndarray, stop_ids: tuple[int, ...], steps: int) -> list[int]:
    out = []
    for t in row[:steps].tolist():
        if t in stop_ids:
            break
        out.append(t)
    return out


def _output(row: np.ndarray, stop_ids: tuple[int, ...], max_new: int, p_tag: np.ndarray | None) -> Output:
    tokens = _until_stop(row, stop_ids, max_new)
    stopped = len(tokens) < max_new and int(row[len(tokens)]) in stop_ids
    return Output(tokens, "stop" if stopped else "length", None,
                  None if p_tag is None else [float(x) for x in p_tag[:len(tokens)]])

