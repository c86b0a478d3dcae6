"""How a document becomes classifier windows, and how its windows' scores become its score.

Pure Python and numpy, so that the PyTorch peer benchmark (benchmarks/hf_score.py) runs the very
same rule without importing JAX.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def window_spans(word_ids: Sequence[int | None], window: int, overlap: int) -> list[tuple[int, int]]:
    """Token spans [start, end) of at most `window` tokens that cut between words, each starting
    at least `overlap` tokens before the previous one ends (a word longer than a window is cut).

    `word_ids` are the tokenizer's word of each token (tokenizers.Encoding.word_ids).
    """
    n = len(word_ids)
    if n <= window:
        return [(0, n)]

    def word_start(i: int) -> int:  # the first token of the word holding token i
        while 0 < i and word_ids[i] is not None and word_ids[i - 1] == word_ids[i]:
            i -= 1
        return i

    spans, start = [], 0
    while True:
        end = n if start + window >= n else max(word_start(start + window), start + 1)
        spans.append((start, end))
        if end == n:
            return spans
        start = max(word_start(max(end - overlap, 0)), start + 1)


def document_scores(probs: np.ndarray, owner: np.ndarray, count: int) -> list[tuple[int, np.ndarray, int]]:
    """(score, probs of the deciding window, number of windows) for each of `count` documents,
    from the probabilities of all windows and each window's document (ascending): the highest
    argmax over the windows, ties broken by that score's probability (PAPER.md §1)."""
    bounds = np.searchsorted(owner, np.arange(count + 1))
    results = []
    for i in range(count):
        mine = probs[bounds[i]:bounds[i + 1]]
        labels = mine.argmax(axis=1)
        best = int(np.lexsort((mine[np.arange(len(mine)), labels], labels))[-1])
        results.append((int(labels[best]), mine[best], len(mine)))
    return results
