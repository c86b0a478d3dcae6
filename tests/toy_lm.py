"""Models behind the CachedLM interface for the decoding tests.

- `bigram_lm`: next-token logits are a row of a hand-made table, so every probability (the harm
  tag's after each candidate included) is known exactly.
- `recompute_lm`: the real decoder without a KV cache: every call recomputes the full forward
  pass over the columns each new token sees. Strategies on it must match the cached decoder.
"""

import jax
import jax.numpy as jnp
import numpy as np

from safejax.inference.lm import CachedLM

EOS, TAG = 1, 4


def bigram_lm(table, context: int = 256) -> CachedLM:
    table = jnp.asarray(table, jnp.float32)

    def forward(params, tokens, positions, cache, index, attend_mask, last_only=False):
        logits = params[tokens]
        return (logits[:, -1:] if last_only else logits), cache

    def init_cache(batch, length):  # nothing to remember, but shaped like a real cache
        return {"unused": jnp.zeros((batch, 1, length, 1))}

    return CachedLM(forward, init_cache, table, table.shape[0], context)


def recompute_lm(model, context: int = 256) -> CachedLM:
    from flax import nnx

    graphdef, params = nnx.split(model)

    def forward(params, tokens, positions, cache, index, attend_mask, last_only=False):
        decoder = nnx.merge(graphdef, params)
        ids = jax.lax.dynamic_update_slice(cache["ids"], tokens[:, None, :, None], (0, 0, index, 0))
        columns = ids[:, 0, :, 0]
        outs = []
        for i in range(tokens.shape[1]):
            seen = attend_mask[:, i, :]
            pos = jnp.maximum(jnp.cumsum(seen, axis=1) - 1, 0)
            logits = decoder(columns, pos, seen.astype(jnp.int32))
            outs.append(logits[:, index + i])
        logits = jnp.stack(outs, axis=1)
        return (logits[:, -1:] if last_only else logits), {"ids": ids}

    def init_cache(batch, length):
        return {"ids": jnp.zeros((batch, 1, length, 1), jnp.int32)}

    return CachedLM(forward, init_cache, params, model.cfg.vocab_size, context)


def random_table(vocab: int, seed: int, scale: float = 2.0) -> np.ndarray:
    """Bigram logits with no ties; padding (id 0) is never predicted."""
    table = np.random.default_rng(seed).normal(size=(vocab, vocab)) * scale
    table[:, 0] = -1e9
    return table


def log_softmax(table) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(jnp.asarray(table, jnp.float32), axis=-1), np.float64)
