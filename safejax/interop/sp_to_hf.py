"""Our SentencePiece vocabulary as a Hugging Face `tokenizer.json`, with the same ids.

The unigram pieces and scores go over as they are; the normalizer does what SentencePiece's does
for our vocabularies (identity rule: a dummy "▁" before each text, spaces as "▁"). Two things
need care so that the `tokenizers` lattice sees only what SentencePiece's sees:

- SentencePiece never matches control or byte pieces (`<s>`, `<|user|>`, `<0x41>`) in text,
  while `tokenizers` matches every vocabulary string. All of those begin with "<", which no
  ordinary piece of our vocabularies contains, so a pre-tokenizer isolates each "<": it is a
  forced piece boundary in SentencePiece anyway, and alone it falls back to its byte.
- Added tokens are cut out of the text before normalization, so each stretch of text between two
  special tokens gets its own dummy "▁", as each `encode` call between reserved ids does in
  data/dialogue.py; a rendered chat therefore encodes to the ids we train on.

One difference remains: when two segmentations score exactly (or within float32 rounding) the
same, e.g. "AAAA" as AAA+A or A+AAA, SentencePiece (float32 path scores) and `tokenizers`
(float64) may pick differently. The text is the same either way; tests measure how often.
"""

from __future__ import annotations

from sentencepiece import sentencepiece_model_pb2 as model_pb2
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from safejax import errors
from safejax import vocab as vocab_lib

_PIECE = model_pb2.ModelProto.SentencePiece
SPACE = "\u2581"
# Texts whose ids the export checks piece by piece: every reserved and special token's text,
# bytes that fall back, whitespace runs, digits and non-Latin scripts.
PROBES = (
    "", " ", "  leading spaces", "trailing  ", "a", "Hello, world!", "line\nbreaks\n\n and\ttabs\r\n",
    "numbers 1234567890 and 3.14", "héllo wörld ñ ç 漢字 かな 🙂 \u200b", "<0x41> <s> </s> <unk> <pad>",
    *vocab_lib.RESERVED_TOKENS, " ".join(vocab_lib.RESERVED_TOKENS), f"x{vocab_lib.HARM_TAG}y",
)


def _read(model_path: str) -> model_pb2.ModelProto:
    model = model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        model.ParseFromString(f.read())
    return model


def _check_convertible(model: model_pb2.ModelProto, model_path: str) -> None:
    spec, norm = model.trainer_spec, model.normalizer_spec
    if spec.model_type != model_pb2.TrainerSpec.UNIGRAM:
        raise errors.UserError(f"{model_path}: only unigram SentencePiece models convert to tokenizer.json "
                               f"(trainer_spec.model_type is {model_pb2.TrainerSpec.ModelType.Name(spec.model_type)})")
    if norm.precompiled_charsmap or not norm.escape_whitespaces or norm.remove_extra_whitespaces:
        raise errors.UserError(f"{model_path}: normalizer_spec {norm.name!r} is not the identity rule with "
                               "escaped whitespace that `safejax vocab` writes")
    ordinary = [p.piece for p in model.pieces if p.type in (_PIECE.NORMAL, _PIECE.USER_DEFINED)]
    if any("<" in p for p in ordinary):
        raise errors.UserError(f"{model_path}: an ordinary piece contains '<', so control pieces cannot be kept "
                               "out of the tokenizers lattice")
    if any(not p.piece.startswith("<") for p in model.pieces if p.type in (_PIECE.CONTROL, _PIECE.BYTE)):
        raise errors.UserError(f"{model_path}: a control or byte piece does not begin with '<'")


def tokenizer_from_sentencepiece(model_path: str) -> Tokenizer:
    """The tokenizers Tokenizer with our ids; special and reserved pieces as special added tokens.
    Raises UserError when it would not encode the PROBES to SentencePiece's ids."""
    model = _read(model_path)
    _check_convertible(model, model_path)
    unk = next(i for i, p in enumerate(model.pieces) if p.type == _PIECE.UNKNOWN)
    unigram = models.Unigram([(p.piece, p.score) for p in model.pieces], unk_id=unk,
                             byte_fallback=model.trainer_spec.byte_fallback)
    tok = Tokenizer(unigram)
    steps = [normalizers.Replace(" ", SPACE)]
    if model.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Split("<", behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if model.normalizer_spec.add_dummy_prefix else [])])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in model.pieces if p.type in (_PIECE.CONTROL, _PIECE.UNKNOWN)])
    _verify(tok, model_path)
    return tok


def _verify(tok: Tokenizer, model_path: str) -> None:
    sp = vocab_lib.load_vocabulary(model_path)
    tok.encode_special_tokens = True  # raw text: special-token text stays text, as in SentencePiece
    try:
        for text in PROBES:
            ours, theirs = sp.encode(text), tok.encode(text, add_special_tokens=False).ids
            if ours != theirs:
                raise errors.UserError(f"{model_path}: the converted tokenizer encodes {text!r} to {theirs}, "
                                       f"SentencePiece to {ours}")
    finally:
        tok.encode_special_tokens = False
