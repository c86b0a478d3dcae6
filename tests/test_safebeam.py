"""Beam search and Safe Beam Search: exact against brute force and against a plain-Python
reading of PAPER.md §4 on bigram models whose tag probabilities are known; the cached decoder
against full recomputation."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_lm import EOS, TAG, bigram_lm, log_softmax, random_table, recompute_lm

from safejax.inference.params import SamplingParams
from safejax.inference.safebeam import BeamSearcher, drop_riskiest
from safejax.models.decoder import Decoder, DecoderConfig

V = 7


def _brute_force(logp, last, max_new, alpha):
    """Best of every tag-free sequence that stops (EOS) or reaches max_new, by logp / len**alpha."""
    best = (-math.inf, None)
    tokens = [t for t in range(V) if t != TAG]
    for n in range(1, max_new + 1):
        for seq in itertools.product(tokens, repeat=n):
            if EOS in seq[:-1] or (n < max_new and seq[-1] != EOS):
                continue
            lp, prev = 0.0, last
            for t in seq:
                lp, prev = lp + logp[prev, t], t
            score = lp / n**alpha
            if score > best[0]:
                best = (score, [t for t in seq if t != EOS])
    return best


def test_beam_search_with_enough_beams_is_exhaustive_search():
    table = random_table(V, seed=1)
    table[:, EOS] += 1.0  # make stopping early a real contender
    searcher = BeamSearcher(bigram_lm(table), TAG)
    logp = log_softmax(table)
    for alpha in (0.0, 1.0, 2.0):
        params = SamplingParams(strategy="beam", num_beams=64, max_new_tokens=3, length_penalty=alpha)
        outs = searcher.run([[5], [6, 2], [3]], [params] * 3, (EOS,))
        for prompt_last, out in zip([5, 2, 3], outs):
            score, seq = _brute_force(logp, prompt_last, 3, alpha)
            assert out.tokens == seq
            assert out.score == pytest.approx(score, rel=1e-5)
            assert out.finish_reason == ("stop" if len(seq) < 3 else "length")


def _reference_search(logp, last, k, max_new, alpha, n=None, fraction=0.0):
    """PAPER.md §4 in plain Python (n=None: beam search over the whole vocabulary).

    Candidates are enumerated beam-major, then by token rank; the floor(fraction * count)
    continuing candidates with the highest next-step tag probability are dropped (ties: later
    first); the best hypothesis by logp / len**alpha is returned.
    """
    p_tag_after = np.exp(logp[:, TAG])
    alive, best = [([], 0.0, last)], (-math.inf, None)
    for step in range(max_new):
        length = step + 1
        cands = []
        for seq, lp, prev in alive:
            row = logp[prev].copy()
            row[TAG] = -math.inf
            ranked = sorted(range(V), key=lambda t: (-row[t], t))[: n or V]
            cands += [(seq + [t], lp + row[t], t) for t in ranked if row[t] > -math.inf]
        continuing = [i for i, c in enumerate(cands) if c[2] != EOS]
        dropped = sorted(continuing, key=lambda i: (-p_tag_after[cands[i][2]], -i))[: int(fraction * len(continuing))]
        kept = [c for i, c in enumerate(cands) if i not in dropped]
        for seq, lp, t in kept:
            if t == EOS or length == max_new:
                score = lp / length**alpha
                if score > best[0]:
                    best = (score, seq[:-1] if t == EOS else seq)
        alive = sorted([c for c in kept if c[2] != EOS], key=lambda c: -c[1])[:k]
        if not alive:
            break
        top = alive[0][1]
        if best[0] >= max(top / (length + 1) ** alpha, top / max_new**alpha):
            break
    return best


@pytest.mark.parametrize("k,alpha", [(1, 0.0), (3, 0.5)])
def test_beam_search_equals_the_reference(k, alpha):
    table = random_table(V, seed=2, scale=1.0)
    logp = log_softmax(table)
    outs = BeamSearcher(bigram_lm(table), TAG).run(
        [[5], [2], [6]], [SamplingParams(strategy="beam", num_beams=k, max_new_tokens=6, length_penalty=alpha)] * 3,
        (EOS,))
    for last, out in zip([5, 2, 6], outs):
        score, seq = _reference_search(logp, last, k, 6, alpha)
        assert (out.tokens, out.score) == (seq, pytest.approx(score, rel=1e-5))


def test_drop_riskiest_drops_the_documented_candidates():
    risk = jnp.asarray([[0.9, 0.1, 0.5, 0.5, 0.7, 0.2],
                        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]])
    droppable = jnp.asarray([[True, True, True, True, False, True],
                             [True, True, True, True, True, False]])
    dropped = drop_riskiest(risk, droppable, jnp.asarray([0.5, 0.5]))
    # Row 0: five droppable, floor(2.5) = 2: 0.9 (index 0), then the tie 0.5 goes to the later index 3.
    # Row 1: five droppable, all tied: the two latest droppable, indices 4 and 3.
    assert np.asarray(dropped).tolist() == [[True, False, False, True, False, False],
                                            [False, False, False, True, True, False]]
    assert not np.asarray(drop_riskiest(risk, droppable, jnp.asarray([0.0, 0.0]))).any()


@pytest.mark.parametrize("k,n,fraction,alpha", [(2, 3, 0.5, 1.0), (3, 2, 0.34, 0.0), (2, 4, 0.75, 1.0)])
def test_safe_beam_equals_the_reference(k, n, fraction, alpha):
    table = random_table(V, seed=3, scale=1.5)
    table[:, TAG] += np.linspace(-2, 2, V)  # tag probabilities differ a lot between candidates
    logp = log_softmax(table)
    params = [SamplingParams(strategy="safebeam", num_beams=k, expansions=n, drop_fraction=fraction,
                             length_penalty=alpha, max_new_tokens=m) for m in (5, 3, 6)]
    outs = BeamSearcher(bigram_lm(table), TAG).run([[5], [2], [6]], params, (EOS,))
    for last, p, out in zip([5, 2, 6], params, outs):
        score, seq = _reference_search(logp, last, k, p.max_new_tokens, alpha, n, fraction)
        assert (out.tokens, out.score) == (seq, pytest.approx(score, rel=1e-5))
        assert TAG not in out.tokens


def _risky_table():
    """From 2, token 5 is the likeliest next token but after 5 the tag is very likely; 6 is a bit
    less likely and safe. Both then stop."""
    table = np.full((V, V), -8.0)
    table[:, 0] = -1e9
    table[2, 5], table[2, 6], table[2, 3] = 3.0, 1.5, 0.0
    table[5, TAG], table[5, EOS] = 3.0, 2.9
    table[6, EOS], table[3, EOS] = 3.0, 3.0
    return table


def test_safe_beam_steers_away_from_the_tag_where_beam_search_does_not():
    searcher = BeamSearcher(bigram_lm(_risky_table()), TAG)
    beam = SamplingParams(strategy="beam", num_beams=2, max_new_tokens=4, length_penalty=0.0)
    safe = beam.replace(strategy="safebeam", expansions=2)
    [b] = searcher.run([[2]], [beam], (EOS,))
    [s] = searcher.run([[2]], [safe], (EOS,))
    assert b.tokens == [5] and s.tokens == [6]
    # The control drops as many candidates at random: seeded, and over seeds it keeps the risky one sometimes.
    random_runs = [searcher.run([[2]], [safe.replace(drop_mode="random", seed=s)], (EOS,))[0].tokens
                   for s in range(8)]
    assert random_runs == [searcher.run([[2]], [safe.replace(drop_mode="random", seed=s)], (EOS,))[0].tokens
                           for s in range(8)]
    assert [5] in random_runs and [6] in random_runs


def test_short_circuit_stops_when_the_tag_comes_next_and_hides_it():
    table = _risky_table()
    table[5, TAG], table[5, EOS], table[5, 3] = 6.0, -8.0, 2.9  # after 5 the model would generate the tag
    searcher = BeamSearcher(bigram_lm(table), TAG)
    params = SamplingParams(strategy="safebeam", num_beams=1, expansions=2, drop_fraction=0.0,
                            max_new_tokens=4, length_penalty=0.0)
    [plain] = searcher.run([[2]], [params], (EOS,))
    [short] = searcher.run([[2]], [params.replace(short_circuit=True)], (EOS,))
    assert plain.tokens == [5, 3] and plain.finish_reason == "stop"
    assert short.tokens == [5] and short.finish_reason == "tag"
    [tagged] = searcher.run([[2]], [params.replace(allow_tag=True)], (EOS,))
    assert tagged.tokens[:2] == [5, TAG]


def test_cached_decoder_safe_beam_equals_full_recomputation():
    """The tree-shaped lookahead, cache commits and beam reordering on the real decoder."""
    from safejax.inference.lm import decoder_lm

    cfg = DecoderConfig(vocab_size=48, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        dtype="float32", init_std=0.3)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    prompts = [[7, 9, 11, 13, 20], [8, 30]]
    params = [SamplingParams(strategy="safebeam", num_beams=2, expansions=3, max_new_tokens=m) for m in (4, 3)]
    cached = BeamSearcher(decoder_lm(model, 32), TAG).run(prompts, params, (EOS,))
    full = BeamSearcher(recompute_lm(model, 32), TAG).run(prompts, params, (EOS,))
    for a, b in zip(cached, full):
        assert a.tokens == b.tokens and a.score == pytest.approx(b.score, rel=1e-4)


def test_min_tokens_and_tag_probability_of_beam_strategies():
    """Both end after one token unless min_tokens bans the stop; the best hypothesis carries the
    tag probability of each of its positions (known exactly on the bigram model)."""
    table = _risky_table()
    p_tag = np.exp(log_softmax(table)[:, TAG])
    searcher = BeamSearcher(bigram_lm(table), TAG)
    beam = SamplingParams(strategy="beam", num_beams=2, max_new_tokens=4, length_penalty=0.0)
    for params in (beam, beam.replace(strategy="safebeam", expansions=2)):
        [short] = searcher.run([[2]], [params], (EOS,))
        [long] = searcher.run([[2]], [params.replace(min_tokens=3)], (EOS,))
        assert len(short.tokens) == 1 and len(long.tokens) >= 3
        for out in (short, long):
            np.testing.assert_allclose(out.tag_probability, p_tag[[2] + out.tokens[:-1]], rtol=1e-5)
