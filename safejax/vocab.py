"""SentencePiece vocabularies: training one on a corpus and loading it as a seqio Vocabulary.

The ids of the special pieces are fixed (pad 0, eos 1, unk 2, bos 3) because seqio's feature
converters treat id 0 as padding and id 1 as end of sequence.

Reserved tokens (the harm tag and the dialogue role markers) are SentencePiece *control* pieces:
each is one id, and encoding text never produces it. So a document whose raw text contains
`<potentially unsafe content>` literally gets ordinary pieces for it, never the tag id: web text
cannot forge a tag. Tags are inserted as ids, after tokenization (safety/tagging).

An imported model's Hugging Face tokenizer.json opens here too (interop/hf_tokenizer.py): the
functions below take either vocabulary.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import seqio
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from safejax import errors

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
spm.set_min_log_level(1)  # loading an identity-normalized model logs an INFO line otherwise
HARM_TAG = "<potentially unsafe content>"
ROLE_MARKERS = ("<|user|>", "<|assistant|>", "<|end_of_turn|>")
RESERVED_TOKENS = (HARM_TAG, *ROLE_MARKERS)
BUNDLED_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "vocab", "bundled_8k.model")


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    *,
    vocab_size: int = 8192,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    max_sentence_length: int = 16384,
    seed_sentences: int = 2_000_000,
    reserved: Sequence[str] = RESERVED_TOKENS,
) -> str:
    """Trains a SentencePiece model on `texts` and writes `model_path` (a .model file).

    The reserved tokens take the ids right after the special ones (4, 5, ...).
    """
    if model_type not in ("unigram", "bpe"):
        raise errors.UserError(f"vocab: model_type must be 'unigram' or 'bpe', got {model_type!r}")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    pieces = _training_pieces(texts, max_sentence_length)
    if not pieces:
        raise errors.UserError("vocab: the training corpus is empty")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(pieces),
        model_prefix=model_path.removesuffix(".model"),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        # Text must survive a round trip: keep newlines, runs of spaces and the exact
        # characters (no NFKC), as Llama- and Gemma-style vocabularies do.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
        control_symbols=list(reserved),
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    vocab_file = model_path.removesuffix(".model") + ".vocab"
    if os.path.exists(vocab_file):  # a human-readable listing we do not use
        os.unlink(vocab_file)
    return model_path


def _training_pieces(texts: Iterable[str], max_bytes: int) -> list[str]:
    """Documents cut at line ends into pieces under SentencePiece's sentence limit, newlines kept
    inside, so the vocabulary learns newline and indentation pieces."""
    pieces = []
    for text in texts:
        current = ""
        for line in text.splitlines(keepends=True):
            if current and len((current + line).encode()) > max_bytes:
                pieces.append(current)
                current = ""
            current += line[: max_bytes // 4]  # a pathological line longer than the limit
        if current.strip():
            pieces.append(current)
    return pieces


def add_reserved_tokens(model_path: str, output_path: str, reserved: Sequence[str] = RESERVED_TOKENS) -> str:
    """Copies an existing SentencePiece model (e.g. a 32k or 49k vocabulary), appending the
    reserved tokens as control pieces at the end of its id range.

    A reserved token that the model already has as an ordinary piece would make raw text able to
    forge it, so that is an error rather than something to patch silently.
    """
    model = _read_model(model_path)
    existing = {p.piece: p for p in model.pieces}
    for token in reserved:
        piece = existing.get(token)
        if piece is None:
            model.pieces.add(piece=token, score=0.0, type=model_pb2.ModelProto.SentencePiece.CONTROL)
        elif piece.type != model_pb2.ModelProto.SentencePiece.CONTROL:
            raise errors.UserError(f"{model_path}: {token!r} is an ordinary piece of this vocabulary; "
                                   f"text could produce it, so it cannot be a reserved token")
    model.trainer_spec.vocab_size = len(model.pieces)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "wb") as f:
        f.write(model.SerializeToString())
    return output_path


def _read_model(model_path: str) -> model_pb2.ModelProto:
    model = model_pb2.ModelProto()
    try:
        with open(model_path, "rb") as f:
            model.ParseFromString(f.read())
    except OSError as e:
        raise errors.UserError(f"cannot read SentencePiece model {model_path}: {e.strerror}") from e
    except Exception as e:  # protobuf's DecodeError
        raise errors.UserError(f"{model_path} is not a SentencePiece model ({type(e).__name__})") from e
    return model


def reserved_ids(vocabulary: seqio.Vocabulary,
                 reserved: Sequence[str] = RESERVED_TOKENS) -> dict[str, int]:
    """Id of each reserved token; a clear error for a vocabulary made without them."""
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return vocabulary.reserved_ids(reserved)  # interop/hf_tokenizer.py
    processor = vocabulary.tokenizer
    ids = {}
    for token in reserved:
        token_id = processor.piece_to_id(token)
        if token_id == processor.unk_id() or not processor.is_control(token_id):
            raise errors.UserError(f"vocabulary {vocabulary.sentencepiece_model_file} has no reserved "
                                   f"token {token!r}; make it with `safejax vocab`")
        ids[token] = token_id
    return ids


def load_vocabulary(model_path: str) -> seqio.Vocabulary:
    """Opens a SentencePiece model, or a Hugging Face tokenizer.json (interop/hf_tokenizer.py), as
    a seqio Vocabulary, with a clear error when it is missing."""
    if not os.path.isfile(model_path):
        raise errors.UserError(f"vocabulary file not found: {model_path}")
    if model_path.endswith(".json"):
        from safejax.interop.hf_tokenizer import TokenizerJsonVocabulary

        return TokenizerJsonVocabulary(model_path)
    return seqio.SentencePieceVocabulary(model_path)


def vocabulary_file(vocabulary: seqio.Vocabulary) -> str:
    """The file a vocabulary was opened from."""
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return vocabulary.sentencepiece_model_file
    return vocabulary.tokenizer_file


def piece_texts(vocabulary: seqio.Vocabulary) -> list[str | None]:
    """The text each id stands for, None for control and unknown pieces (the tagger's word
    starts); a byte piece stands for its byte, 'x' for a byte of a multi-byte character."""
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return vocabulary.piece_texts()
    processor = vocabulary.tokenizer
    texts: list[str | None] = []
    for i in range(processor.get_piece_size()):
        piece = processor.id_to_piece(i)
        if processor.is_control(i) or processor.is_unknown(i):
            texts.append(None)
        elif processor.is_byte(i):  # <0x0A> and friends stand for one byte
            texts.append(chr(int(piece[3:5], 16)) if int(piece[3:5], 16) < 128 else "x")
        else:
            texts.append(piece.replace("\u2581", " "))
    return texts


def harm_tag_id(vocabulary: seqio.Vocabulary) -> int:
    """The harm tag's id; a clear error for a vocabulary made without it."""
    return reserved_ids(vocabulary, (HARM_TAG,))[HARM_TAG]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def describe(vocabulary: seqio.Vocabulary) -> dict:
    """What a checkpoint records of its vocabulary: the file, its content hash, its size, its
    end-of-sequence id and the reserved ids (empty for a vocabulary made without them)."""
    path = os.path.abspath(vocabulary_file(vocabulary))
    try:
        reserved = reserved_ids(vocabulary)
    except errors.UserError:
        reserved = {}
    return {"path": path, "sha256": _sha256(path), "pieces": vocabulary.vocab_size, "eos_id": vocabulary.eos_id,
            "reserved_ids": reserved}


def load_recorded(record: dict, path: str | None = None) -> seqio.Vocabulary:
    """The vocabulary a checkpoint recorded (or the file at `path`), refused when its content
    differs from the recorded one: the ids would mean other pieces. Size, eos and reserved ids are
    compared too: an imported tokenizer's tokenizer_config.json (eos, named tokens, a moved id 0)
    changes them without changing the file."""
    path = path or record["path"]
    vocabulary = load_vocabulary(path)
    found = describe(vocabulary)
    if found["sha256"] != record["sha256"]:
        raise errors.UserError(f"vocabulary {path} (sha256 {found['sha256'][:12]}) is not the one the checkpoint "
                               f"was trained with ({record['path']}, sha256 {record['sha256'][:12]})")
    for field in ("pieces", "eos_id", "reserved_ids"):
        if record.get(field, found[field]) != found[field]:
            raise errors.UserError(f"vocabulary {path}: its {field} is {found[field]}, the checkpoint was "
                                   f"trained with {record[field]}")
    return vocabulary
