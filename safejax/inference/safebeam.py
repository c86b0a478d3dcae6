"""Beam search and Safe Beam Search (PAPER.md §4) on a KV cache.

Both keep k alive beams per prompt and the best finished hypothesis; a hypothesis' score is its
log-probability / length**length_penalty. A prompt's search ends at its token limit, or as soon
as no alive beam can still beat the best finished one (an exact bound: log-probabilities only
fall as a beam grows), and returns that best hypothesis.

Beam search: each step scores all k x V one-token extensions; the k best that continue become
the beams, and every beam's stop extension competes for the best finished hypothesis.

Safe Beam Search, per step:
  1. each beam proposes its top-N next tokens: k x N candidates with cumulative log-probs;
  2. one forward call over all candidates (tree-shaped: each sees its beam and itself) gives
     each candidate's next-token distribution, whose harm-tag probability is p_tag;
  3. of the candidates that continue (not the stop token, not impossible), the
     floor(drop_fraction x count) with the highest p_tag are dropped (ties: the later candidate,
     beam-major then token rank, goes first); `drop_mode = 'random'` drops as many chosen at
     random instead, a control with the same search and no tag signal. Candidates that end the
     text are never dropped: ending cannot produce unsafe content;
  4. the top-k survivors by log-prob become the beams. Their lookahead distributions are the
     next step's, so the lookahead costs no extra model call.
  Optional short-circuit: a prompt stops when the tag is its best beam's most likely next token.
The tag itself is never a candidate unless allow_tag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safejax.inference import lm as lm_lib
from safejax.inference.params import SamplingParams
from safejax.inference.sampler import (NEG_INF, Output, ban_stops, batch_bucket, bucket, cache_length, mask_tag,
                                       split_keys, tag_probability, tag_probability_or_zero)

REASONS = ("stop", "length", "tag")


@dataclasses.dataclass(frozen=True)
class _Static:
    beams: int
    expansions: int  # 0: plain beam search
    tag_id: int | None  # the harm tag (looked ahead by Safe Beam)
    allow_tag: bool
    random_drop: bool
    short_circuit: bool
    stop_ids: tuple[int, ...]


class BeamSearcher:
    """Beam search and Safe Beam Search over a batch of token-id prompts on a CachedLM."""

    def __init__(self, lm: lm_lib.CachedLM, tag_id: int | None):
        self.lm, self.tag_id = lm, tag_id
        self._search = jax.jit(self._search_fn, static_argnames=("static", "cache_length", "capacity"))

    def run(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
            stop_ids: tuple[int, ...]) -> list[Output]:
        """Searches every prompt with its own length limit, length penalty and drop fraction;
        beam count, expansions and modes come from the first row's params."""
        n, first = len(prompts), params[0]
        b = batch_bucket(n)
        safe = first.strategy == "safebeam"
        static = _Static(first.num_beams, first.expansions if safe else 0, self.tag_id, first.allow_tag,
                         first.drop_mode == "random", safe and first.short_circuit, tuple(stop_ids))
        prompt_len = bucket(max(len(p) for p in prompts), 16)
        capacity = bucket(max(p.max_new_tokens for p in params), 16)
        tokens, pad = lm_lib.left_pad(list(prompts) + [[stop_ids[0]]] * (b - n), prompt_len, 0)
        rows = list(params) + [params[0]] * (b - n)
        settings = {"max_new": np.asarray([p.max_new_tokens for p in rows], np.int32),
                    "min_new": np.asarray([p.min_tokens for p in rows], np.int32),
                    "length_penalty": np.asarray([p.length_penalty for p in rows], np.float32),
                    "drop_fraction": np.asarray([p.drop_fraction for p in rows], np.float32),
                    "seed": np.asarray([p.seed % (1 << 32) for p in rows], np.uint32)}
        best = jax.device_get(self._search(self.lm.params, tokens, pad, settings, static=static,
                                           cache_length=prompt_len + capacity + static.expansions,
                                           capacity=capacity))
        return [Output([int(t) for t in best["tokens"][i, :best["length"][i]]], REASONS[best["reason"][i]],
                       float(best["score"][i]), None if self.tag_id is None else
                       [float(p) for p in best["tag_probability"][i, :best["length"][i]]]) for i in range(n)]

    def _search_fn(self, params, tokens, pad, settings, *, static, cache_length, capacity):
        b, k = tokens.shape[0], static.beams
        logits, cache = lm_lib.prefill(self.lm, params, tokens, pad, cache_length)
        state = {
            "cache": lm_lib.take_rows(cache, jnp.repeat(jnp.arange(b), k)),
            "logits": jnp.repeat(logits, k, axis=0), "pad": jnp.repeat(pad, k),
            "index": jnp.int32(tokens.shape[1]), "step": jnp.int32(0),
            "alive": jnp.zeros((b, k, capacity), jnp.int32), "alive_p_tag": jnp.zeros((b, k, capacity), jnp.float32),
            "alive_logp": jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1)), (b, 1)),
            "best": {"tokens": jnp.zeros((b, capacity), jnp.int32), "length": jnp.zeros(b, jnp.int32),
                     "tag_probability": jnp.zeros((b, capacity), jnp.float32),
                     "score": jnp.full((b,), NEG_INF), "reason": jnp.zeros(b, jnp.int32)},
            "done": jnp.zeros(b, bool), "keys": jax.vmap(jax.random.key)(settings["seed"]),
        }
        state = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]) & (s["step"] < capacity),
                                   lambda s: self._step(params, s, settings, static), state)
        return state["best"]

    def _step(self, params, s, settings, static):
        b, k, _ = s["alive"].shape
        vocab = s["logits"].shape[-1]
        logp = jax.nn.log_softmax(s["logits"], axis=-1)
        p_tag = tag_probability_or_zero(s["logits"], static.tag_id).reshape(b, k)
        if static.short_circuit:
            s = self._short_circuit(s, logp, settings)
        if not static.allow_tag:
            logp = mask_tag(logp, static.tag_id)
        logp = ban_stops(logp, jnp.repeat(s["step"] < settings["min_new"], k), static.stop_ids)
        if static.expansions == 0:
            vals, parent, token = _beam_candidates(s["alive_logp"], logp.reshape(b, k, vocab), static.stop_ids)
            keep, choice = jnp.isfinite(vals), None
        else:
            s, vals, parent, choice, token, keep, lookahead = self._safe_candidates(params, s, logp, settings, static)
        s, alive_pick = self._select(s, vals, parent, token, keep, p_tag, settings, static)
        # Reorder the caches (and logits) to the new beams, then feed their last token.
        rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(parent, alive_pick, axis=1)).reshape(-1)
        if choice is None:
            cache = lm_lib.take_rows(s["cache"], rows)
            last = jnp.take_along_axis(token, alive_pick, axis=1).reshape(-1, 1)
            logits, cache = self.lm.forward(params, last, lm_lib.positions(s["pad"], s["index"], 1), cache,
                                            s["index"], lm_lib.attend_mask(s["pad"], s["index"], 1, cache_length(s)))
            logits = logits[:, 0]
        else:
            picked = jnp.take_along_axis(choice, alive_pick, axis=1).reshape(-1)
            cache = lm_lib.take_rows(s["cache"], rows, s["index"], picked)
            logits = jnp.take_along_axis(lookahead, alive_pick[..., None], axis=1).reshape(b * k, vocab)
        return {**s, "cache": cache, "logits": logits, "index": s["index"] + 1, "step": s["step"] + 1}

    def _safe_candidates(self, params, s, logp, settings, static):
        """Safe Beam's candidates (b, k * N), their lookahead, and which of them survive the drop."""
        b, k, _ = s["alive"].shape
        n = static.expansions
        top_logp, top_tok = jax.lax.top_k(logp, n)  # (b*k, n)
        lookahead, cache = self.lm.forward(
            params, top_tok, lm_lib.positions(s["pad"], s["index"], n, tree=True), s["cache"], s["index"],
            lm_lib.attend_mask(s["pad"], s["index"], n, cache_length(s), tree=True))
        p_tag = tag_probability(lookahead, static.tag_id).reshape(b, k * n)
        vals = (s["alive_logp"][..., None] + top_logp.reshape(b, k, n)).reshape(b, k * n)
        token = top_tok.reshape(b, k * n)
        keys, sub = split_keys(s["keys"])
        risk = jax.vmap(lambda key: jax.random.uniform(key, (k * n,)))(sub) if static.random_drop else p_tag
        continues = jnp.isfinite(vals) & ~jnp.isin(token, jnp.asarray(static.stop_ids))
        keep = jnp.isfinite(vals) & ~drop_riskiest(risk, continues, settings["drop_fraction"])
        parent = jnp.broadcast_to(jnp.arange(k * n)[None] // n, vals.shape)
        choice = jnp.broadcast_to(jnp.arange(k * n)[None] % n, vals.shape)
        s = {**s, "cache": cache, "keys": keys}
        return s, vals, parent, choice, token, keep, lookahead.reshape(b, k * n, -1)

    def _select(self, s, vals, parent, token, keep, p_tag, settings, static):
        """Candidates (b, c) -> the best finished hypothesis and the k alive beams (p_tag (b, k):
        each beam's tag probability at this position)."""
        b, k, _ = s["alive"].shape
        step, length = s["step"], s["step"] + 1
        active = ~s["done"][:, None]
        seqs = jnp.take_along_axis(s["alive"], parent[..., None], axis=1).at[:, :, step].set(token)
        p_tags = jnp.take_along_axis(s["alive_p_tag"], parent[..., None], axis=1).at[:, :, step].set(
            jnp.take_along_axis(p_tag, parent, axis=1))
        ends = jnp.isin(token, jnp.asarray(static.stop_ids))
        at_limit = (length >= settings["max_new"])[:, None]
        penalty = (length.astype(jnp.float32) ** settings["length_penalty"])[:, None]
        # Finished now: the stop token (not counted in the text) or the row's token limit.
        finishing = keep & active & (ends | at_limit)
        fin_score = jnp.where(finishing, vals / penalty, NEG_INF)
        top = jnp.argmax(fin_score, axis=1)
        top_score = jnp.take_along_axis(fin_score, top[:, None], axis=1)[:, 0]
        better = top_score > s["best"]["score"]
        top_ends = jnp.take_along_axis(ends, top[:, None], axis=1)[:, 0]
        candidate = {"tokens": seqs[jnp.arange(b), top], "length": jnp.where(top_ends, step, length),
                     "tag_probability": p_tags[jnp.arange(b), top], "score": top_score, "reason": jnp.where(top_ends, 0, 1).astype(jnp.int32)}
        best = jax.tree.map(lambda new, old: jnp.where(better.reshape(-1, *[1] * (old.ndim - 1)), new, old),
                            candidate, s["best"])
        alive_vals, alive_pick = jax.lax.top_k(jnp.where(keep & ~ends, vals, NEG_INF), k)
        # Exact stop: an alive beam's score can at best reach logp / L**penalty for some future
        # length L in (length, max_new]; the extremes bound it since logp <= 0.
        best_alive = alive_vals[:, 0]
        reach = jnp.maximum(best_alive / ((length + 1.0) ** settings["length_penalty"]),
                            best_alive / (settings["max_new"].astype(jnp.float32) ** settings["length_penalty"]))
        done = s["done"] | at_limit[:, 0] | ~jnp.isfinite(best_alive) | (best["score"] >= reach)
        alive = jnp.take_along_axis(seqs, alive_pick[..., None], axis=1)
        alive_p_tag = jnp.take_along_axis(p_tags, alive_pick[..., None], axis=1)
        return {**s, "alive": alive, "alive_p_tag": alive_p_tag, "alive_logp": alive_vals, "best": best,
                "done": done}, alive_pick

    def _short_circuit(self, s, logp, settings):
        """Ends a prompt whose best beam would generate the tag next; its best hypothesis so far
        (the alive beams scored at their length, or an earlier finished one) is returned."""
        b, k, _ = s["alive"].shape
        best_beam = jnp.argmax(s["alive_logp"], axis=1)
        top_token = jnp.argmax(logp.reshape(b, k, -1)[jnp.arange(b), best_beam], axis=-1)
        hit = (top_token == self.tag_id) & ~s["done"]
        score = s["alive_logp"][jnp.arange(b), best_beam] / jnp.maximum(s["step"], 1).astype(jnp.float32) ** settings["length_penalty"]
        take = hit & (score > s["best"]["score"])
        candidate = {"tokens": s["alive"][jnp.arange(b), best_beam], "length": jnp.broadcast_to(s["step"], (b,)),
                     "tag_probability": s["alive_p_tag"][jnp.arange(b), best_beam], "score": score, "reason": jnp.full((b,), 2, jnp.int32)}
        best = jax.tree.map(lambda new, old: jnp.where(take.reshape(-1, *[1] * (old.ndim - 1)), new, old),
                            candidate, s["best"])
        return {**s, "best": best, "done": s["done"] | hit}


def _beam_candidates(alive_logp, logp, stop_ids):
    """Beam search's candidates (b, k + k * stops): the k best continuing extensions of all
    k x V, and every beam's stop extension (so no finished hypothesis is missed)."""
    b, k, vocab = logp.shape
    scores = alive_logp[..., None] + logp
    stops = jnp.asarray(stop_ids)
    cont_vals, idx = jax.lax.top_k(scores.at[..., stops].set(NEG_INF).reshape(b, k * vocab), k)
    vals = jnp.concatenate([cont_vals, scores[..., stops].reshape(b, -1)], axis=1)
    stop_parent = jnp.broadcast_to(jnp.repeat(jnp.arange(k), len(stop_ids))[None], (b, k * len(stop_ids)))
    stop_token = jnp.broadcast_to(jnp.tile(stops, k)[None], (b, k * len(stop_ids)))
    return (vals, jnp.concatenate([idx // vocab, stop_parent], axis=1),
            jnp.concatenate([idx % vocab, stop_token], axis=1))


def drop_riskiest(risk: jax.Array, droppable: jax.Array, fraction: jax.Array) -> jax.Array:
    """(b, c) mask of the floor(fraction x count) droppable candidates with the highest risk.

    Ties break towards the later candidate, so the order is fixed and testable.
    """
    c = risk.shape[1]
    count = jnp.floor(fraction * droppable.sum(axis=1)).astype(jnp.int32)
    # Stable descending order of risk over the droppable candidates (others last).
    order = jnp.lexsort((-jnp.arange(c)[None].repeat(risk.shape[0], 0), -jnp.where(droppable, risk, -jnp.inf)), axis=1)
    rank = jnp.argsort(order, axis=1)
    return droppable & (rank < count[:, None])

