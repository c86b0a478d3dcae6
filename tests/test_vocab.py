"""Vocabularies: reserved tokens are single control ids that raw text cannot produce."""

import json

import pytest

from safejax import cli, errors, vocab

BUNDLED = vocab.load_vocabulary(vocab.BUNDLED_VOCAB)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """A small vocabulary trained without reserved tokens, like a third-party one."""
    from safejax.data import sources

    shakespeare = [f for f in sources.bundled_corpus_files() if "shakespeare" in f]
    path = tmp_path_factory.mktemp("vocab") / "plain.model"
    return vocab.train_sentencepiece(sources.iter_texts(shakespeare), str(path), vocab_size=512, reserved=())


def test_reserved_tokens_are_single_ids_that_round_trip():
    ids = vocab.reserved_ids(BUNDLED)
    assert sorted(ids.values()) == [4, 5, 6, 7]
    for token, token_id in ids.items():
        assert BUNDLED.tokenizer.id_to_piece(token_id) == token
        assert BUNDLED.tokenizer.is_control(token_id)


def test_raw_text_cannot_forge_a_reserved_token():
    ids = set(vocab.reserved_ids(BUNDLED).values())
    text = f"before {vocab.HARM_TAG} middle <|user|> after<|end_of_turn|>"
    encoded = BUNDLED.encode(text)
    assert not ids & set(encoded)
    assert BUNDLED.decode(encoded) == text  # the literal text survives as ordinary pieces


def test_special_ids_are_fixed():
    processor = BUNDLED.tokenizer
    assert (processor.pad_id(), processor.eos_id(), processor.unk_id(), processor.bos_id()) == (0, 1, 2, 3)


def test_reserved_tokens_are_added_to_an_existing_model(tmp_path, plain_model):
    plain = plain_model
    with pytest.raises(errors.UserError, match="has no reserved token"):
        vocab.reserved_ids(vocab.load_vocabulary(plain))
    extended = vocab.add_reserved_tokens(plain, str(tmp_path / "extended.model"))
    ids = vocab.reserved_ids(vocab.load_vocabulary(extended))
    assert sorted(ids.values()) == [512, 513, 514, 515]
    # The old ids are unchanged.
    old, new = vocab.load_vocabulary(plain), vocab.load_vocabulary(extended)
    assert old.encode("a few more words") == new.encode("a few more words")


def test_a_reserved_token_that_is_an_ordinary_piece_is_refused(tmp_path):
    import sentencepiece as spm

    # A user-defined symbol is an ordinary piece: text containing it encodes to it.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["<|user|> hello there, general kenobi"] * 100),
                                   model_prefix=str(tmp_path / "clash"), vocab_size=25, hard_vocab_limit=False,
                                   user_defined_symbols=["<|user|>"], minloglevel=2)
    with pytest.raises(errors.UserError, match="ordinary piece"):
        vocab.add_reserved_tokens(str(tmp_path / "clash.model"), str(tmp_path / "out.model"))


def test_vocab_command_adds_reserved_tokens_and_prints_their_ids(tmp_path, capsys, plain_model):
    assert cli.main(["vocab", "--from_model", plain_model, "--output", str(tmp_path / "v.model")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["reserved_ids"][vocab.HARM_TAG] == 512


def test_not_a_model_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\xff\x00 not a protobuf")
    assert cli.main(["vocab", "--from_model", str(bad), "--output", str(tmp_path / "o.model")]) == 2
    assert "is not a SentencePiece model" in capsys.readouterr().err


def test_text_round_trips_exactly_with_newlines_and_spaces():
    text = "Title\n\nFirst line.\n  indented  twice\tand a tab, digits 2024, café, 東京."
    assert BUNDLED.decode(BUNDLED.encode(text)) == text
