"""Chat data for finetuning: every conversation format reads into the same turns, the loss mask
covers exactly the assistant's tokens (also packed), malformed conversations are set aside with
file and line, and the tagged share of a chat mixture."""

import json
import random

import numpy as np
import pytest
import seqio

import safety_fixtures as fx
from safejax import errors, vocab
from safejax.data import chat, conversations, dialogue, pipeline, sources, stats
from safejax.data.quarantine import QUARANTINE

VOCAB = vocab.load_vocabulary(vocab.BUNDLED_VOCAB)
RESERVED = vocab.reserved_ids(VOCAB)
TAG = RESERVED[vocab.HARM_TAG]
USER, ASSISTANT, EOT = (RESERVED[m] for m in vocab.ROLE_MARKERS)


def _write(path, records, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def test_every_format_reads_into_the_same_turns():
    turns = [{"role": "user", "text": "How many apples?"}, {"role": "assistant", "text": "Three apples."}]
    formats = [
        {"turns": turns},
        {"messages": [{"role": "user", "content": "How many apples?"},
                      {"role": "assistant", "content": "Three apples."}]},
        {"chosen": "\n\nHuman: How many apples?\n\nAssistant: Three apples."},
        {"question": "How many apples?", "answer": "Three apples."},
    ]
    for record in formats:
        assert conversations.to_turns(record) == turns
    system = conversations.to_turns({"messages": [{"role": "system", "content": "Be brief."}, *[
        {"role": t["role"], "content": t["text"]} for t in turns]]})
    assert system[0] == {"role": "user", "text": "Be brief.\n\nHow many apples?"} and system[1] == turns[1]
    for bad, reason in [({"turns": [{"role": "narrator", "text": "x"}]}, "unknown_role"),
                        ({"messages": [{"role": "tool", "content": "x"}]}, "unknown_role"),
                        ({"chosen": "no speaker here"}, "bad_turn"),
                        ({"question": "only a question"}, "bad_turn"),
                        ({"text": "plain text"}, "missing_turns")]:
        with pytest.raises(conversations.NotAConversation) as e:
            conversations.to_turns(bad)
        assert e.value.reason == reason


def test_malformed_conversations_are_quarantined_with_file_and_line(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"id": "ok", "question": "q?", "answer": "a."}],
                  ['{"id": "who", "turns": [{"role": "narrator", "text": "x"}]}', "{torn"])
    QUARANTINE.reset()
    QUARANTINE.write_to(None)
    assert [r["id"] for r in sources.iter_records([path], kind="dialogue")] == ["ok"]
    assert QUARANTINE.counts() == {"unknown_role": 1, "bad_json": 1}


def _examples(name, split="train", pack=False, seq_len=128):
    cfg = pipeline.DataConfig(task=name, seq_len=seq_len, global_batch_size=4, pack=pack, eval_batches=0)
    return [b for b, _ in zip(pipeline.train_batches(cfg), range(6))]


def _expected_mask(turns):
    """Python's reading of the rule: 0 on each turn's marker and "NAME:", 1 on the assistant's
    text and its end-of-turn marker."""
    mask = []
    for turn in turns:
        name = "Assistant" if turn["role"] == "assistant" else "User"
        body = VOCAB.encode(f"{name}: {turn['text']}")
        prompt = VOCAB.encode(f"{name}:")
        assert body[:len(prompt)] == prompt
        mine = int(turn["role"] == "assistant")
        mask += [0] + [0] * len(prompt) + [mine] * (len(body) - len(prompt)) + [mine]
    return mask


def test_loss_mask_is_one_on_exactly_the_assistant_tokens_also_packed(tmp_path):
    rng = random.Random(0)
    records = [{"id": f"c{i}", "turns": [{"role": r, "text": fx.sentence(rng, rng.randint(3, 9))}
                                         for r in ("user", "assistant", "user", "assistant")]} for i in range(40)]
    path = _write(tmp_path / "c.jsonl", records)
    name = chat.chat_task(name="test_chat", files=[path])
    expected = {tuple(dialogue.encode_dialogue(VOCAB, r["turns"])): _expected_mask(r["turns"]) for r in records}
    for pack in (False, True):
        checked = 0
        for batch in _examples(name, pack=pack):
            for row in range(batch["targets"].shape[0]):
                seg, targets, weights = batch["segment_ids"][row], batch["targets"][row], batch["weights"][row]
                for s in set(seg[seg > 0].tolist()):
                    tokens = tuple(targets[seg == s].tolist())
                    assert weights[seg == s].tolist() == expected[tokens]  # whole conversations, one template
                    checked += 1
                assert (weights[seg == 0] == 0).all()
        assert checked >= 20
    everything = chat.chat_task(name="test_chat_all", files=[path], loss_on="all")
    batch = _examples(everything)[0]
    assert (batch["weights"] == (batch["targets"] != 0)).all()


def test_tagged_share_and_tags_only_in_assistant_tokens_of_harmful_conversations(tmp_path):
    rng = random.Random(1)
    plain = [{"id": f"p{i}", "question": fx.sentence(rng, 6), "answer": fx.sentence(rng, 12)} for i in range(300)]
    harmful = [{"id": f"h{i}", "score": 4 if i % 2 else 0, "question": fx.sentence(rng, 6),
                "answer": fx.sentence(rng, 30)} for i in range(300)]
    a = chat.chat_task(name="test_plain", files=[_write(tmp_path / "p.jsonl", plain)])
    t = chat.chat_task(name="test_tagged", files=[_write(tmp_path / "h.jsonl", harmful)], tagged=True, tag_rate=0.2)
    mixture = chat.chat_mixture(name="test_instruct", tasks=[a], tagged=t, tagged_share=0.1)
    shares = stats.mixture_shares(seqio.get_mixture_or_task(mixture), 4000, seed=3)
    assert abs(shares["test_tagged"] - 0.1) < 0.02
    for ex in seqio.get_mixture_or_task(t).get_dataset({"targets": 256, "loss_mask": 256}, "train",
                                                        shuffle=False).as_numpy_iterator():
        tokens, mask = ex["targets"], ex["loss_mask"]
        tags = tokens == TAG
        if ex["score"] == 0:
            assert not tags.any()
        else:
            assert tags.any() and (mask[tags] == chat.MASK_ON).all()  # in what the assistant writes, and learnt
            untagged = tokens[~tags].tolist()
            record = next(r for r in harmful if r["id"] == ex["id"].decode())
            assert untagged == dialogue.encode_dialogue(VOCAB, conversations.to_turns(record))


def test_bad_chat_options_are_one_line_errors(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(errors.UserError, match="loss_on"):
        chat.chat_task(name="x", files=[path], loss_on="user")
    with pytest.raises(errors.UserError, match="tagged_share"):
        chat.chat_mixture(name="m", tasks=[chat.chat_task(name="x", files=[path])], tagged="x", tagged_share=1.0)
    with pytest.raises(errors.UserError, match="reserved|role|harm"):
        chat.chat_task(name="x", files=[path], vocab_path=_no_markers_vocab(tmp_path))


def _no_markers_vocab(tmp_path):
    """A SentencePiece model without the reserved pieces."""
    import sentencepiece as spm

    texts = tmp_path / "texts.txt"
    rng = random.Random(0)
    texts.write_text("\n".join(fx.sentence(rng, 12) for _ in range(400)))
    prefix = str(tmp_path / "plain")
    spm.SentencePieceTrainer.train(input=str(texts), model_prefix=prefix, vocab_size=60, minloglevel=3)
    return prefix + ".model"
