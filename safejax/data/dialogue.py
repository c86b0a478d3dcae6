"""The dialogue template: how RefuseWeb records (and chat prompts) become tokens.

A dialogue is a list of turns {"role": "user" | "assistant", "text": ...}. Each turn is

    <|user|> or <|assistant|>   then the tokens of "NAME: TEXT"   then <|end_of_turn|>

The markers are reserved control ids (vocab.py): text cannot produce them, so raw web text can
never fake a turn boundary. NAME is the role's display name; the paper varies them (student /
teacher and the like), so that the model does not tie refusals to one pair of words. A record may
name its own pair in `roles` ({"user": ..., "assistant": ...}); otherwise one pair is picked from
`dialogue_role_names` by hashing the dialogue id (FarmHash, as tf.strings.to_hash_bucket_fast).
The pair used is kept in the `roles` feature.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from safejax import vocab as vocab_lib
from safejax.data.preprocessors import dialogue_role_names

USER, ASSISTANT, END_OF_TURN = vocab_lib.ROLE_MARKERS


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
    """seqio preprocessor: dialogue records -> `targets` token ids, all in TF ops.

    The source gives each record's turns as features (data/sources.py DIALOGUE_COLUMNS).
    """
    vocabulary = output_features["targets"].vocabulary
    ids = vocab_lib.reserved_ids(vocabulary)
    pairs = tf.constant(dialogue_role_names())

    def to_tokens(example):
        given = example["role_names"]
        names = tf.cond(tf.size(given) == 2, lambda: given,
                        lambda: pairs[tf.strings.to_hash_bucket_fast(example["id"], len(pairs))])
        is_assistant = example["turn_is_assistant"]
        speakers = tf.where(is_assistant, names[1], names[0])
        turns = tf.cast(vocabulary.encode_tf(tf.strings.join([speakers, ": ", example["turn_texts"]])),
                        tf.int32)  # ragged (turns, tokens)
        marker = tf.where(is_assistant, ids[ASSISTANT], ids[USER])[:, None]
        end = tf.fill([tf.size(is_assistant), 1], ids[END_OF_TURN])
        tokens = tf.concat([tf.RaggedTensor.from_tensor(marker), turns,
                            tf.RaggedTensor.from_tensor(end)], axis=1)
        rest = {k: v for k, v in example.items() if k not in ("turn_texts", "turn_is_assistant", "role_names")}
        return {**rest, "targets": tokens.flat_values, "roles": tf.strings.join([names[0], "/", names[1]])}

    return dataset.map(to_tokens, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
