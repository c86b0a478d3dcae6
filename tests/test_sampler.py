"""KV-cache decoding and the token strategies: the cache against full recomputation (padded and
ragged batches), filters, seeding, and the harm tag (never emitted; tag-aware filtering)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_lm import EOS, TAG, bigram_lm, log_softmax, random_table, recompute_lm

from safejax.inference import lm as lm_lib
from safejax.inference.params import SamplingParams
from safejax.inference.sampler import TokenSampler, filter_logits
from safejax.models.decoder import Decoder, DecoderConfig

CFG = DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                    dtype="float32", init_std=0.3)
PROMPTS = [[5, 9, 11, 20, 7, 33, 12], [8, 30], [12, 13, 14, 15]]  # ragged: left padding differs per row


@pytest.fixture(scope="module")
def model():
    return Decoder(CFG, rngs=nnx.Rngs(0))


def _full_logits(model, sequences):
    """Logits of each sequence alone: one forward pass, right-padded (segment 0 = padding)."""
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    segments = np.zeros_like(tokens)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)], segments[i, :len(s)] = s, 1
    positions = np.broadcast_to(np.arange(width), tokens.shape)
    return np.asarray(jax.jit(lambda *a: model(*a))(tokens, positions, segments))


def _jitted(lm):
    """The LM's forward and prefill compiled whole (op-by-op dispatch is slow on the CPU)."""
    forward = jax.jit(lm.forward, static_argnames=("last_only",))
    lm = lm_lib.CachedLM(forward, lm.init_cache, lm.params, lm.vocab_size, lm.context)
    return lm, jax.jit(lambda *a: lm_lib.prefill(lm, *a), static_argnums=(3,))


def test_cached_decoding_equals_the_full_forward_pass(model):
    """Prefill of a ragged, left-padded batch, then teacher-forced one-token steps: every step's
    logits equal the full forward pass over that row's prompt + continuation, unpadded."""
    lm, prefill = _jitted(lm_lib.decoder_lm(model, 64))
    continuation = np.random.default_rng(0).integers(5, CFG.vocab_size, size=(len(PROMPTS), 4))
    tokens, pad = lm_lib.left_pad(PROMPTS, 9, 0)  # two columns more than the longest prompt
    length = 9 + 4
    logits, cache = prefill(lm.params, tokens, pad, length)
    steps = [logits]
    for i in range(3):
        index = 9 + i
        step, cache = lm.forward(lm.params, jnp.asarray(continuation[:, i:i + 1]), lm_lib.positions(pad, index, 1),
                                 cache, index, lm_lib.attend_mask(pad, index, 1, length))
        steps.append(step[:, 0])
    full = _full_logits(model, [p + list(c[:3]) for p, c in zip(PROMPTS, continuation)])
    for row, prompt in enumerate(PROMPTS):
        for i, step in enumerate(steps):
            np.testing.assert_allclose(step[row], full[row, len(prompt) - 1 + i], rtol=2e-5, atol=2e-5)


def test_tree_lookahead_equals_each_candidate_alone(model):
    """M candidates in one tree-shaped call == each appended on its own; after `commit`, the
    chosen candidate's cache continues like plain decoding."""
    lm, prefill = _jitted(lm_lib.decoder_lm(model, 64))
    tokens, pad = lm_lib.left_pad(PROMPTS, 7, 0)
    length = 7 + 4
    _, cache = prefill(lm.params, tokens, pad, length)
    cands = np.asarray([[21, 22, 23], [24, 25, 26], [27, 28, 29]])
    choice = np.asarray([2, 0, 1])
    tree, tree_cache = lm.forward(lm.params, jnp.asarray(cands), lm_lib.positions(pad, 7, 3, tree=True), cache, 7,
                                  lm_lib.attend_mask(pad, 7, 3, length, tree=True))
    committed = lm_lib.commit(tree_cache, 7, jnp.asarray(choice))
    nxt, _ = lm.forward(lm.params, jnp.full((3, 1), 40), lm_lib.positions(pad, 8, 1), committed, 8,
                        lm_lib.attend_mask(pad, 8, 1, length))
    alone = [p + [int(c)] for p, row in zip(PROMPTS, cands) for c in row]
    chosen = [p + [int(cands[r, choice[r]]), 40] for r, p in enumerate(PROMPTS)]
    full = _full_logits(model, alone + chosen)
    for row, prompt in enumerate(PROMPTS):
        for m in range(3):
            np.testing.assert_allclose(tree[row, m], full[3 * row + m, len(prompt)], rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(nxt[row, 0], full[9 + row, len(prompt) + 1], rtol=2e-5, atol=2e-5)


def test_sampler_on_the_cache_equals_full_recomputation():
    """Greedy and sampled rows in one ragged batch, over several device chunks, tag-aware (so the
    tree lookahead and cache commits run too; plain steps are checked above)."""
    tag_filter = "reject"
    params = [SamplingParams(strategy="greedy", max_new_tokens=6, tag_filter=tag_filter, tag_candidates=3,
                             tag_threshold=0.02),
              SamplingParams(strategy="sample", temperature=0.8, top_k=10, top_p=0.9, seed=3, max_new_tokens=5,
                             tag_filter=tag_filter, tag_candidates=3, tag_threshold=0.02),
              SamplingParams(strategy="greedy", max_new_tokens=4, tag_filter=tag_filter, tag_candidates=3,
                             tag_threshold=0.02)]
    small = Decoder(DecoderConfig(**{**CFG.__dict__, "num_layers": 1}), rngs=nnx.Rngs(1))
    cached = TokenSampler(lm_lib.decoder_lm(small, 32), TAG, chunk_steps=2).run(PROMPTS, params, (EOS,))
    full = TokenSampler(recompute_lm(small, 32), TAG, chunk_steps=4).run(PROMPTS, params, (EOS,))
    assert [o.tokens for o in cached] == [o.tokens for o in full]
    assert [len(o.tokens) for o in cached] == [6, 5, 4]


def test_filter_logits_keeps_top_k_then_nucleus():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]))
    kept = jnp.isfinite(filter_logits(logits, jnp.ones(3), jnp.asarray([2, 0, 3]), jnp.asarray([1.0, 0.65, 0.6])))
    # Row 0: top-2. Row 1: 0.4 + 0.3 >= 0.65. Row 2: top-3 renormalised is (.44, .33, .22): .44 + .33 >= .6.
    assert np.asarray(kept).tolist() == [[True, True, False, False], [True, True, False, False],
                                         [True, True, False, False]]
    scaled = filter_logits(logits, jnp.full(3, 0.5), jnp.zeros(3, jnp.int32), jnp.ones(3))
    np.testing.assert_allclose(scaled, logits / 0.5, rtol=1e-6)


def test_sampling_is_seeded_and_follows_the_filtered_distribution():
    table = random_table(8, seed=0, scale=1.0)
    table[:, TAG] = -1e9
    table[:, EOS] = -1e9
    sampler = TokenSampler(bigram_lm(table), TAG, chunk_steps=8)
    base = SamplingParams(strategy="sample", temperature=1.0, top_k=3, max_new_tokens=1)
    rows = [base.replace(seed=s) for s in range(256)]
    first = [o.tokens[0] for o in sampler.run([[5]] * 256, rows, (EOS,))]
    assert first == [o.tokens[0] for o in sampler.run([[5]] * 256, rows, (EOS,))]
    probs = np.exp(log_softmax(table)[5])
    top3 = np.argsort(-probs)[:3]
    assert set(first) <= set(top3.tolist())
    expected = probs[top3] / probs[top3].sum()
    observed = np.asarray([first.count(int(t)) for t in top3]) / 256
    np.testing.assert_allclose(observed, expected, atol=0.1)


def test_the_tag_is_never_emitted_unless_asked():
    table = random_table(8, seed=1)
    table[:, TAG] = 10.0  # the model's favourite token everywhere
    sampler = TokenSampler(bigram_lm(table), TAG, chunk_steps=4)
    greedy = SamplingParams(strategy="greedy", max_new_tokens=6)
    sample = SamplingParams(strategy="sample", temperature=2.0, max_new_tokens=6)
    for out in sampler.run([[5], [6]], [greedy, sample], (EOS,)):
        assert TAG not in out.tokens
    [tagged] = sampler.run([[5]], [greedy.replace(allow_tag=True)], (EOS,))
    assert tagged.tokens[0] == TAG


def _risky_table():
    """From 2 the likeliest token is 5, then 6, then 3; after 5 the tag has probability ~0.5,
    after 6 ~0.12, after 3 almost 0."""
    table = np.full((8, 8), -6.0)
    table[:, 0] = -1e9
    table[2, 5], table[2, 6], table[2, 3] = 3.0, 2.0, 1.0
    table[5, TAG], table[5, 7] = 2.0, 2.0
    table[6, TAG], table[6, 7] = 0.0, 2.0
    table[3, 7] = 2.0
    return table


def test_tag_aware_decoding_rejects_or_reweights_risky_tokens():
    table = _risky_table()
    p_tag = np.exp(log_softmax(table)[:, TAG])
    sampler = TokenSampler(bigram_lm(table), TAG)
    greedy = SamplingParams(strategy="greedy", max_new_tokens=1, tag_candidates=3)
    first = lambda p: sampler.run([[2]], [p], (EOS,))[0].tokens[0]
    assert first(greedy) == 5
    assert first(greedy.replace(tag_filter="reject", tag_threshold=0.3)) == 6
    assert first(greedy.replace(tag_filter="reject", tag_threshold=0.05)) == 3
    assert first(greedy.replace(tag_filter="reject", tag_threshold=0.0)) == 3  # all rejected: the least risky
    # reweight: log p + log(1 - p_tag): 5 -> 3 + log(1 - p_tag[5]) vs 6 -> 2 + log(1 - p_tag[6]).
    scores = {t: table[2, t] + np.log1p(-p_tag[t]) for t in (5, 6, 3)}
    assert first(greedy.replace(tag_filter="reweight")) == max(scores, key=scores.get)


def test_rows_stop_at_eos_or_their_own_limit():
    table = random_table(8, seed=2)
    table[5, EOS] = 20.0  # after 5 the text ends
    table[6, 5] = 20.0
    table[3, 7], table[7, 7] = 20.0, 20.0
    sampler = TokenSampler(bigram_lm(table), TAG, chunk_steps=2)
    outs = sampler.run([[6], [3]], [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=3)], (EOS,))
    assert (outs[0].tokens, outs[0].finish_reason) == ([5], "stop")
    assert (outs[1].tokens, outs[1].finish_reason) == ([7, 7, 7], "length")


def test_bad_sampling_parameters_are_named():
    from safejax import errors

    with pytest.raises(errors.UserError, match="strategy='nucleus'"):
        SamplingParams(strategy="nucleus").validate(64, True)
    with pytest.raises(errors.UserError, match="top_p=1.5"):
        SamplingParams(top_p=1.5).validate(64, True)
    with pytest.raises(errors.UserError, match="unknown sampling parameter"):
        SamplingParams().replace(beams=3)
    with pytest.raises(errors.UserError, match="needs the harm tag"):
        SamplingParams(strategy="safebeam").validate(64, has_tag=False)
    with pytest.raises(errors.UserError, match="temperature"):
        SamplingParams(strategy="sample", temperature=0.0).validate(64, True)
    assert jax.tree.leaves(SamplingParams().validate(64, True).stop) == []


def test_min_tokens_bans_the_stop_token_and_tag_probability_is_exact():
    """After 5 the text would end at once: min_tokens keeps it going; each new token's position
    reports p(tag) of the bigram row it was chosen from."""
    table = random_table(8, seed=2)
    table[5, EOS] = 20.0
    table[6, 5] = 20.0
    sampler = TokenSampler(bigram_lm(table), TAG, chunk_steps=2)
    params = SamplingParams(max_new_tokens=6)
    [free] = sampler.run([[6]], [params], (EOS,))
    [held] = sampler.run([[6]], [params.replace(min_tokens=4)], (EOS,))
    [never] = sampler.run([[6]], [params.replace(min_tokens=6)], (EOS,))
    assert (free.tokens, free.finish_reason) == ([5], "stop")
    assert len(held.tokens) >= 4 and held.tokens[0] == 5 and EOS not in held.tokens
    assert (len(never.tokens), never.finish_reason) == (6, "length")
    p_tag = np.exp(log_softmax(table)[:, TAG])
    for out in (free, held, never):
        previous = [6] + out.tokens[:-1]
        np.testing.assert_allclose(out.tag_probability, p_tag[previous], rtol=1e-5)
    with pytest.raises(Exception, match="min_tokens=7"):
        params.replace(min_tokens=7).validate(8, True)
