"""A seqio Vocabulary over a Hugging Face `tokenizer.json` (the `tokenizers` library).

It stands wherever the SentencePiece vocabulary does (data pipeline, tagger, sampler), so a model
imported with its own tokenizer trains and decodes with it. Reserved tokens (harm tag, role
markers) are the tokenizer's added special tokens, and raw text must not be able to produce them:
the tokenizer encodes special-token text as ordinary text (`encode_special_tokens`), and
`reserved_ids` refuses a tokenizer whose model still turns a token's text into its id.

The end-of-sequence token is named by the `tokenizer_config.json` beside the file (`eos_token`),
as in every Hugging Face folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

from safejax import errors

TOKENIZER_CONFIG = "tokenizer_config.json"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _uses_byte_level(spec: dict) -> bool:
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))


def _eos_token(path: str) -> str:
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_CONFIG)
    try:
        with open(config_path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except OSError:
        raise errors.UserError(f"{path}: no {TOKENIZER_CONFIG} beside it to name the eos_token") from None
    except json.JSONDecodeError as e:
        raise errors.UserError(f"{config_path} is not valid JSON ({e.msg})") from None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not isinstance(eos, str):
        raise errors.UserError(f"{config_path}: eos_token must name a token, got {eos!r}")
    return eos


class TokenizerJsonVocabulary(seqio.Vocabulary):
    """tokenizer.json as a seqio Vocabulary; id 0 is padding to seqio, as for SentencePiece."""

    def __init__(self, path: str):
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(path)
            with open(path, encoding="utf-8") as f:
                self._spec = json.load(f)
        except OSError as e:
            raise errors.UserError(f"cannot read tokenizer {path}: {e.strerror}") from e
        except Exception as e:  # the Rust side's parse errors
            raise errors.UserError(f"{path} is not a tokenizer.json ({' '.join(str(e).split())[:200]})") from None
        self.tokenizer.encode_special_tokens = True  # special-token text in raw text is just text
        self.tokenizer_file = os.path.abspath(path)
        eos = _eos_token(path)
        self._eos_id = self.tokenizer.token_to_id(eos)
        if self._eos_id is None:
            raise errors.UserError(f"{path}: the eos_token {eos!r} of {TOKENIZER_CONFIG} is not in the tokenizer")
        self._special = {t["id"] for t in self._spec.get("added_tokens", []) if t.get("special")}
        super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int | None:
        unk = self._spec["model"].get("unk_token")
        return self.tokenizer.token_to_id(unk) if isinstance(unk, str) else None

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """Through the Rust tokenizer in a py_function (scalar strings, as seqio's tokenize feeds them)."""
        def encode(text):
            return np.asarray(self._encode(text.numpy().decode("utf-8")), np.int32)

        ids = tf.py_function(encode, [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(row):
            return self._decode(row.numpy().tolist())

        text = tf.py_function(decode, [ids], tf.string)
        text.set_shape([])
        return text

    def reserved_ids(self, reserved: Sequence[str]) -> dict[str, int]:
        """Id of each reserved token: a special added token that its own text does not encode to."""
        ids = {}
        for token in reserved:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is None or token_id not in self._special:
                raise errors.UserError(f"tokenizer {self.tokenizer_file} has no reserved token {token!r} "
                                       "(import with --add_harm_tag to add the reserved tokens)")
            if any(token_id in self._encode(text) for text in (token, f"a {token} b{token}")):
                raise errors.UserError(f"tokenizer {self.tokenizer_file}: the text {token!r} encodes to its "
                                       "reserved id, so raw text could forge it")
            ids[token] = token_id
        return ids

    def piece_texts(self) -> list[str | None]:
        """The text each id stands for (None for special tokens), with its leading and trailing
        whitespace, for the tagger's word starts; a byte of a multi-byte character stands as 'x'."""
        byte_level = _byte_level_alphabet() if _uses_byte_level(self._spec) else None
        texts: list[str | None] = []
        for i in range(self._base_vocab_size):
            token = self.tokenizer.id_to_token(i)
            if token is None or i in self._special:
                texts.append(None)
            elif byte_level is not None:
                raw = bytes(byte_level.get(c, ord("x")) for c in token)
                texts.append("".join(chr(b) if b < 128 else "x" for b in raw))
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                b = int(token[3:5], 16)
                texts.append(chr(b) if b < 128 else "x")
            else:
                texts.append(token.replace("\u2581", " "))
        return texts

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenizerJsonVocabulary) and other.tokenizer_file == self.tokenizer_file

    def __hash__(self) -> int:
        return hash(self.tokenizer_file)
