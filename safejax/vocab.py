"""SentencePiece vocabularies: training one on a corpus and loading it as a seqio Vocabulary.

The ids of the special pieces are fixed (pad 0, eos 1, unk 2, bos 3) because seqio's feature
converters treat id 0 as padding and id 1 as end of sequence.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import seqio
import sentencepiece as spm

from safejax import errors

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    *,
    vocab_size: int = 8192,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    max_sentence_length: int = 16384,
    seed_sentences: int = 2_000_000,
) -> str:
    """Trains a SentencePiece model on `texts` and writes `model_path` (a .model file)."""
    if model_type not in ("unigram", "bpe"):
        raise errors.UserError(f"vocab: model_type must be 'unigram' or 'bpe', got {model_type!r}")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        n = 0
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    f.write(line.strip()[:max_sentence_length] + "\n")
                    n += 1
        corpus_file = f.name
    if n == 0:
        raise errors.UserError("vocab: the training corpus has no non-empty lines")
    try:
        spm.SentencePieceTrainer.train(
            input=corpus_file,
            model_prefix=model_path.removesuffix(".model"),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            input_sentence_size=seed_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    finally:
        os.unlink(corpus_file)
    return model_path


def load_vocabulary(model_path: str) -> seqio.SentencePieceVocabulary:
    """Opens a SentencePiece model as a seqio Vocabulary, with a clear error when it is missing."""
    if not os.path.isfile(model_path):
        raise errors.UserError(f"vocabulary file not found: {model_path}")
    return seqio.SentencePieceVocabulary(model_path)
