"""The dialogue template: how RefuseWeb records (and chat prompts) become tokens.

A dialogue is a list of turns {"role": "user" | "assistant", "text": ...}. Each turn is

    <|user|> or <|assistant|>   then the tokens of "NAME: TEXT"   then <|end_of_turn|>

The markers are reserved control ids (vocab.py): text cannot produce them, so raw web text can
never fake a turn boundary. NAME is the role's display name; the paper varies them (student /
teacher and the like), so that the model does not tie refusals to one pair of words. A record may
name its own pair in `roles` ({"user": ..., "assistant": ...}); otherwise one pair is picked from
`dialogue_role_names` by hashing the dialogue id. The pair used is kept in the `roles` feature.
"""

from __future__ import annotations

import json
import zlib

import seqio
import tensorflow as tf

from safejax import vocab as vocab_lib
from safejax.data.preprocessors import dialogue_role_names

USER, ASSISTANT, END_OF_TURN = vocab_lib.ROLE_MARKERS


def role_pair(record: dict, pairs: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    roles = record.get("roles")
    if isinstance(roles, dict) and roles.get("user") and roles.get("assistant"):
        return str(roles["user"]), str(roles["assistant"])
    return pairs[zlib.crc32(str(record["id"]).encode()) % len(pairs)]


def turn_texts(record: dict, pairs) -> tuple[list[str], list[bool], str]:
    """Each turn's "NAME: TEXT", whether it is the assistant's, and the pair as "USER/ASSISTANT"."""
    user, assistant = role_pair(record, pairs)
    texts, is_assistant = [], []
    for turn in record["turns"]:
        mine = turn["role"] == "assistant"
        texts.append(f"{assistant if mine else user}: {turn['text']}")
        is_assistant.append(mine)
    return texts, is_assistant, f"{user}/{assistant}"


def encode_dialogue(vocabulary: seqio.SentencePieceVocabulary, turns: list[dict],
                    names: tuple[str, str] = ("User", "Assistant"),
                    generation_prompt: bool = False) -> list[int]:
    """Token ids of a dialogue; with `generation_prompt`, ending where the assistant speaks next."""
    ids = vocab_lib.reserved_ids(vocabulary)
    tokens: list[int] = []
    for turn in turns:
        mine = turn["role"] == "assistant"
        tokens.append(ids[ASSISTANT if mine else USER])
        tokens.extend(vocabulary.encode(f"{names[mine]}: {turn['text']}"))
        tokens.append(ids[END_OF_TURN])
    if generation_prompt:
        tokens.append(ids[ASSISTANT])
        tokens.extend(vocabulary.encode(f"{names[1]}:"))
    return tokens


def format_dialogues(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """seqio preprocessor: dialogue records (turns in the `json` feature) -> `targets` token ids."""
    vocabulary = output_features["targets"].vocabulary
    ids = vocab_lib.reserved_ids(vocabulary)
    pairs = dialogue_role_names()

    def parse(record_json):
        texts, is_assistant, roles = turn_texts(json.loads(record_json), pairs)
        return [t.encode() for t in texts], is_assistant, roles.encode()

    def to_tokens(example):
        texts, is_assistant, roles = tf.numpy_function(
            parse, [example["json"]], [tf.string, tf.bool, tf.string], stateful=False)
        texts.set_shape([None])
        is_assistant.set_shape([None])
        roles.set_shape([])
        turns = tf.cast(vocabulary.encode_tf(texts), tf.int32)  # ragged (turns, tokens)
        marker = tf.where(is_assistant, ids[ASSISTANT], ids[USER])[:, None]
        end = tf.fill([tf.size(is_assistant), 1], ids[END_OF_TURN])
        tokens = tf.concat([tf.RaggedTensor.from_tensor(marker), turns,
                            tf.RaggedTensor.from_tensor(end)], axis=1)
        return {**example, "targets": tokens.flat_values, "roles": roles}

    return dataset.map(to_tokens, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
