"""The dialogue template: how RefuseWeb records (and chat prompts) become tokens.

A dialogue is a list of turns {"role": "user" | "assistant", "text": ...}. Each turn is

    <|user|> or <|assistant|>   then the tokens of "NAME: TEXT"   then <|end_of_turn|>

The markers are reserved control ids (vocab.py): text cannot produce them, so raw web text can
never fake a turn boundary. NAME is the role's display name; the paper varies them (student /
teacher and the like), so that the model does not tie refusals to one pair of words. A record may
name its own pair in `roles` ({"user": ..., "assistant": ...}); otherwise one pair is picked from
`dialogue_role_names` by hashing the dialogue id (FarmHash, as tf.strings.to_hash_bucket_fast).
The pair used is kept in the `roles` feature. Chat finetuning (data/chat.py) names every
dialogue with one fixed pair instead, the one `safejax sample --chat` prompts with.

`loss_mask` marks the tokens a model writes when it speaks as the assistant: the text of each
assistant turn and its end-of-turn marker, not the marker or the "NAME:" that the generation
prompt already gives (finetuning on assistant tokens only).
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


def format_dialogues(dataset: tf.data.Dataset, output_features, role_names: tuple[str, str] | None = None
                     ) -> tf.data.Dataset:
    """seqio preprocessor: dialogue records -> `targets` token ids and their `loss_mask`, all in
    TF ops. `role_names`: one (user, assistant) pair for every dialogue (default: the record's
    own, else one of `dialogue_role_names` by id hash).

    The source gives each record's turns as features (data/sources.py DIALOGUE_COLUMNS).
    """
    vocabulary = output_features["targets"].vocabulary
    ids = vocab_lib.reserved_ids(vocabulary)
    pairs = tf.constant(dialogue_role_names())

    def to_tokens(example):
        given = example["role_names"]
        if role_names is not None:
            names = tf.constant(role_names)
        else:
            names = tf.cond(tf.size(given) == 2, lambda: given,
                            lambda: pairs[tf.strings.to_hash_bucket_fast(example["id"], len(pairs))])
        is_assistant = example["turn_is_assistant"]
        speakers = tf.where(is_assistant, names[1], names[0])
        turns = tf.cast(vocabulary.encode_tf(tf.strings.join([speakers, ": ", example["turn_texts"]])),
                        tf.int32)  # ragged (turns, tokens)
        prompted = vocabulary.encode_tf(tf.strings.join([speakers, ":"])).row_lengths()  # "NAME:" pieces
        written = tf.ragged.range(turns.row_lengths()) >= prompted[:, None]
        written = tf.cast(tf.logical_and(written, is_assistant[:, None]), tf.int32)
        count = tf.size(is_assistant)
        marker = tf.where(is_assistant, ids[ASSISTANT], ids[USER])[:, None]
        end = tf.fill([count, 1], ids[END_OF_TURN])
        tokens = tf.concat([tf.RaggedTensor.from_tensor(marker), turns,
                            tf.RaggedTensor.from_tensor(end)], axis=1)
        mask = tf.concat([tf.RaggedTensor.from_tensor(tf.zeros([count, 1], tf.int32)), written,
                          tf.RaggedTensor.from_tensor(tf.cast(is_assistant, tf.int32)[:, None])], axis=1)
        rest = {k: v for k, v in example.items() if k not in ("turn_texts", "turn_is_assistant", "role_names")}
        return {**rest, "targets": tokens.flat_values, "loss_mask": mask.flat_values,
                "roles": tf.strings.join([names[0], "/", names[1]])}

    return dataset.map(to_tokens, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
