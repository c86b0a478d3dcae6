"""A seqio Vocabulary over a Hugging Face `tokenizer.json` (the `tokenizers` library).

It stands wherever the SentencePiece vocabulary does (data pipeline, tagger, sampler), so a model
imported with its own tokenizer trains and decodes with it. Reserved tokens (harm tag, role
markers) are the tokenizer's added special tokens, and raw text must not be able to produce them:
the tokenizer encodes special-token text as ordinary text (`encode_special_tokens`), and
`reserved_ids` refuses a tokenizer whose model still turns a token's text into its id.

The end-of-sequence token is named by the `tokenizer_config.json` beside the file (`eos_token`),
as in every Hugging Face folder. What `safejax import` decided is recorded there too, under
"safejax":

    reserved_tokens   our reserved token -> the tokenizer's own special token standing for it
                      (`--harm_tag`, `--role_markers`), so every reader finds it under our name
    id_0_moved_to     seqio treats id 0 as padding (no loss; packing measures lengths by non-zero
                      ids), so a tokenizer whose id 0 is a real token (SmolLM2's eos, Llama 3's "!")
                      has that token moved to this new last id: ours = the tokenizer's, except
                      0 -> id_0_moved_to, and our id 0 is padding that no text encodes to. The
                      tokenizer.json itself is untouched, so export copies it back out as it was.
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
from safejax import vocab as vocab_lib

TOKENIZER_CONFIG = "tokenizer_config.json"
RECORDED = ("reserved_tokens", "id_0_moved_to")  # the fields of tokenizer_config.json's "safejax"


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


def read_config(path: str) -> tuple[str, dict]:
    """The tokenizer_config.json beside tokenizer.json `path`: its path and contents."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_CONFIG)
    try:
        with open(config_path, encoding="utf-8") as f:
            settings = json.load(f)
    except OSError:
        raise errors.UserError(f"{path}: no {TOKENIZER_CONFIG} beside it to name the eos_token") from None
    except json.JSONDecodeError as e:
        raise errors.UserError(f"{config_path} is not valid JSON ({e.msg})") from None
    if not isinstance(settings, dict):
        raise errors.UserError(f"{config_path} must hold a JSON object")
    return config_path, settings


def _eos_token(settings: dict, config_path: str) -> str:
    eos = settings.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not isinstance(eos, str):
        raise errors.UserError(f"{config_path}: eos_token must name a token, got {eos!r}")
    return eos


def _recorded(settings: dict, config_path: str) -> tuple[dict[str, str], int | None]:
    """tokenizer_config.json's "safejax" fields, checked: (reserved_tokens, id_0_moved_to)."""
    recorded = settings.get("safejax", {})
    if not isinstance(recorded, dict) or set(recorded) - set(RECORDED):
        raise errors.UserError(f"{config_path}: safejax must be an object with fields {', '.join(RECORDED)}")
    names = recorded.get("reserved_tokens", {})
    if (not isinstance(names, dict) or set(names) - set(vocab_lib.RESERVED_TOKENS)
            or not all(isinstance(v, str) for v in names.values())):
        raise errors.UserError(f"{config_path}: safejax.reserved_tokens must map reserved tokens "
                               f"({', '.join(vocab_lib.RESERVED_TOKENS)}) to token texts")
    moved = recorded.get("id_0_moved_to")
    if moved is not None and (not isinstance(moved, int) or moved <= 0):
        raise errors.UserError(f"{config_path}: safejax.id_0_moved_to must be a positive id, got {moved!r}")
    return names, moved


def reserved_token_id(tokenizer: tokenizers.Tokenizer, text: str, where: str) -> int:
    """The tokenizer's id of `text` as a reserved token; a UserError starting with `where` unless it
    is a special added token that raw text (alone or in a sentence) does not encode to."""
    token_id = tokenizer.token_to_id(text)
    if token_id is None:
        raise errors.UserError(f"{where}: the tokenizer has no token {text!r}")
    added = tokenizer.get_added_tokens_decoder().get(token_id)
    if added is None or not added.special:
        raise errors.UserError(f"{where}: {text!r} is an ordinary token of the tokenizer, not a special one, "
                               "so raw text could produce it")
    before, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    try:
        forged = any(token_id in tokenizer.encode(t, add_special_tokens=False).ids for t in (text, f"a {text} b{text}"))
    finally:
        tokenizer.encode_special_tokens = before
    if forged:
        raise errors.UserError(f"{where}: the text {text!r} encodes to its reserved id, so raw text could forge it")
    return token_id


class TokenizerJsonVocabulary(seqio.Vocabulary):
    """tokenizer.json as a seqio Vocabulary; id 0 is padding to seqio, as for SentencePiece (the
    tokenizer's own id 0 is either a special token no text produces, or moved)."""

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
        config_path, settings = read_config(path)
        self.reserved_tokens, self.id_0_moved_to = _recorded(settings, config_path)
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if self.id_0_moved_to is not None and self.id_0_moved_to < size:
            raise errors.UserError(f"{config_path}: safejax.id_0_moved_to ({self.id_0_moved_to}) is an id of the "
                                   f"tokenizer (it has {size})")
        eos = _eos_token(settings, config_path)
        if self.tokenizer.token_to_id(eos) is None:
            raise errors.UserError(f"{path}: the eos_token {eos!r} of {TOKENIZER_CONFIG} is not in the tokenizer")
        self._eos_id = self.our_id(self.tokenizer.token_to_id(eos))
        self._special = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        super().__init__(extra_ids=0)

    def our_id(self, tokenizer_id: int) -> int:
        return self.id_0_moved_to if tokenizer_id == 0 and self.id_0_moved_to is not None else tokenizer_id

    def tokenizer_id(self, our_id: int) -> int:
        """The tokenizer.json id of one of our ids (our padding 0 of a moved id 0 has none)."""
        return 0 if our_id == self.id_0_moved_to else our_id

    def id_0_is_padding(self) -> bool:
        """Whether the tokenizer's id 0 may stand as seqio's padding: a special token that is not
        the eos, the unk or a reserved token, so no text encodes to it and no target needs it."""
        reserved = (*vocab_lib.RESERVED_TOKENS, *self.reserved_tokens.values())
        needed = {self.tokenizer_id(self.eos_id), self._unk_tokenizer_id(), *map(self.tokenizer.token_to_id, reserved)}
        return 0 in self._special and 0 not in needed

    def _unk_tokenizer_id(self) -> int | None:
        model = self._spec["model"]
        if isinstance(model.get("unk_id"), int):  # Unigram names it by id
            return model["unk_id"]
        return self.tokenizer.token_to_id(model["unk_token"]) if isinstance(model.get("unk_token"), str) else None

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int | None:
        unk_id = self._unk_tokenizer_id()
        return None if unk_id is None else self.our_id(unk_id)

    @property
    def _base_vocab_size(self) -> int:
        if self.id_0_moved_to is not None:
            return self.id_0_moved_to + 1
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
        ids = self.tokenizer.encode(s, add_special_tokens=False).ids
        return ids if self.id_0_moved_to is None else [self.our_id(i) for i in ids]

    def _decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.id_0_moved_to is not None:
            ids = [self.tokenizer_id(i) for i in ids if i != 0]  # our 0 is padding, not the tokenizer's 0
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        """Through the Rust tokenizer in a py_function: a scalar string (as seqio's tokenize feeds
        them) to ids, a vector of strings (as the dialogue template's turns) to ragged ids."""
        if s.shape.rank == 0:
            def encode(text):
                return np.asarray(self._encode(text.numpy().decode("utf-8")), np.int32)

            ids = tf.py_function(encode, [s], tf.int32)
            ids.set_shape([None])
            return ids

        def encode_all(texts):
            rows = [self._encode(t.decode("utf-8")) for t in texts.numpy()]
            return (np.asarray([i for row in rows for i in row], np.int32),
                    np.asarray([len(row) for row in rows], np.int64))

        values, lengths = tf.py_function(encode_all, [s], (tf.int32, tf.int64))
        values.set_shape([None])
        lengths.set_shape([None])
        return tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(row):
            return self._decode(row.numpy().tolist())

        text = tf.py_function(decode, [ids], tf.string)
        text.set_shape([])
        return text

    def reserved_ids(self, reserved: Sequence[str]) -> dict[str, int]:
        """Id of each reserved token (under our name; its text is the tokenizer's own where import
        named one): a special added token that its own text does not encode to."""
        ids = {}
        for token in reserved:
            text = self.reserved_tokens.get(token, token)
            if self.tokenizer.token_to_id(text) is None:
                raise errors.UserError(f"tokenizer {self.tokenizer_file} has no reserved token {token!r} (import "
                                       "with --add_harm_tag to add the reserved tokens, or name them)")
            ids[token] = self.our_id(reserved_token_id(self.tokenizer, text, f"tokenizer {self.tokenizer_file}"))
        return ids

    def piece_texts(self) -> list[str | None]:
        """The text each id stands for (None for special tokens), with its leading and trailing
        whitespace, for the tagger's word starts; a byte of a multi-byte character stands as 'x'."""
        byte_level = _byte_level_alphabet() if _uses_byte_level(self._spec) else None
        texts: list[str | None] = []
        for ours in range(self._base_vocab_size):
            i = self.tokenizer_id(ours)
            padding = ours == 0 and self.id_0_moved_to is not None
            token = None if padding else self.tokenizer.id_to_token(i)
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
