"""seqio Tasks and Mixtures for finetuning on conversations (`safejax finetune`).

A chat Task reads JSONL conversations in any format of data/conversations.py, formats them with
the one dialogue template (data/dialogue.py, the one `safejax sample --chat` prompts with) and
gives a `loss_mask` beside the tokens: 1 on what the assistant writes (`loss_on="assistant"`),
or on every token (`"all"`). ChatFeatureConverter packs both, so the loss weights stay exact at
packing boundaries. A conversation longer than the sequence length is cut at it (seqio's trim),
not split: its second half would start mid-dialogue.

The tagged share (PAPER.md §4: 10% of the tuning data carries tags): a chat Task with `tagged`
inserts the harm tag into the assistant's tokens of its harmful conversations, those whose score
(a `score` field, or score shards joined by id) lies in `tag_scores`, with the tagging code and
rate of pretraining; `chat_mixture` gives such a Task a share of the examples.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import gin
import seqio
import tensorflow as tf

from safejax import errors
from safejax import vocab as vocab_lib
from safejax.data import dialogue, mixing, sources
from safejax.data import preprocessors as pre
from safejax.safety import tagging

LOSS_ON = ("assistant", "all")


# seqio's packing measures each feature by its non-zero values, so the mask travels as 1 (no
# loss) and 2 (loss) and becomes 0/1 weights after packing, padding 0.
MASK_OFF, MASK_ON = 1, 2


class ChatFeatureConverter(seqio.LMFeatureConverter):
    """seqio's LM converter with the Task's `loss_mask` as the loss weights (packed with the
    tokens, so each packed conversation keeps its own mask)."""

    TASK_FEATURES = {"targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                     "loss_mask": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}

    def _convert_example(self, features):
        out = dict(super()._convert_example(features))
        out["decoder_loss_weights"] = tf.cast(features["loss_mask"] == MASK_ON, tf.int32)
        return out


def is_chat(task_or_mixture: str) -> bool:
    """Whether a registered Task or Mixture gives a `loss_mask` (and needs ChatFeatureConverter)."""
    return "loss_mask" in seqio.get_mixture_or_task(task_or_mixture).output_features


def _as_packable_mask(loss_on: str):
    """The dialogue's 0/1 loss mask as MASK_OFF/MASK_ON (every token MASK_ON for "all")."""

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        def convert(ex):
            mask = tf.ones_like(ex["loss_mask"]) if loss_on == "all" else ex["loss_mask"]
            return {**ex, "loss_mask": mask + MASK_OFF}

        return dataset.map(convert)

    return preprocess


@gin.configurable
def chat_task(name: str = gin.REQUIRED, files: Sequence[str] | None = gin.REQUIRED,
              vocab_path: str = vocab_lib.BUNDLED_VOCAB, loss_on: str = "assistant",
              role_names: tuple[str, str] = ("User", "Assistant"), tagged: bool = False,
              scores: Sequence[str] | None = None, tag_rate: float = 0.05,
              tag_scores: tuple[int, int] = (1, 5), tag_seed: int = 0,
              validation_permille: int = 20, shuffle_buffer_size: int = 1024) -> str | None:
    """Registers (or re-registers) a chat Task over JSONL conversations; returns its name, or
    None when `files` is None (a part of a mixture the config leaves out, e.g. no refusals yet).

    `tagged`: harm tags in the assistant tokens of conversations scored within `tag_scores`,
    the score read from each record's `score` field, or from `scores` (score shards, by id).
    """
    if loss_on not in LOSS_ON:
        raise errors.UserError(f"chat_task.loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if files is None:
        return None
    if not files:
        raise errors.UserError(f"chat_task {name!r}: no files")
    vocabulary = vocab_lib.load_vocabulary(vocab_path)
    vocab_lib.reserved_ids(vocabulary)  # a vocabulary without the role markers: a clear error now
    files = sources.expand_files(files)
    score_files = tuple(sources.expand_files(scores)) if scores else ()
    source = sources.JsonlDataSource(files, validation_permille, "dialogue",
                                     scored=tagged and not score_files)
    steps = [pre.mark_kind(name)]
    if tagged and score_files:
        steps.append(pre.join_scores(score_files, name))
    steps.append(functools.partial(dialogue.format_dialogues, role_names=tuple(role_names)))
    if tagged:  # before the mask is made packable: tags go where the mask is 1
        steps.append(tagging.tag_preprocessor(tag_rate, tuple(tag_scores), tag_seed, mask_feature="loss_mask"))
    steps.append(_as_packable_mask(loss_on))
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=source,
        preprocessors=[*steps, pre.drop_raw_text, seqio.CacheDatasetPlaceholder()],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False),
                         "loss_mask": seqio.Feature(seqio.PassThroughVocabulary(3), add_eos=False)},
        shuffle_buffer_size=shuffle_buffer_size)
    return name


@gin.configurable
def chat_mixture(name: str = gin.REQUIRED, tasks: Sequence[str | None] = gin.REQUIRED,
                 rates: Sequence[float] | None = None, tagged: str | None = None,
                 tagged_share: float = 0.1) -> str:
    """Registers a Mixture of chat Tasks (rates default to equal; a task that is None, left out
    by its config, is dropped with its rate); with `tagged`, that Task makes up `tagged_share`
    of the examples drawn. Returns its name."""
    rates = list(rates) if rates is not None else [1.0] * len(tasks)
    if len(rates) != len(tasks) or min(rates, default=0) <= 0:
        raise errors.UserError(f"chat_mixture {name!r}: one positive rate per task, got {rates} for {list(tasks)}")
    pairs = [(task, rate) for task, rate in zip(tasks, rates) if task is not None]
    if not pairs:
        raise errors.UserError(f"chat_mixture {name!r}: every task is left out (their files are None)")
    if tagged:
        if not 0.0 < tagged_share < 1.0:
            raise errors.UserError(f"chat_mixture.tagged_share must be in (0, 1), got {tagged_share}")
        pairs.append((tagged, tagged_share / (1.0 - tagged_share) * sum(rate for _, rate in pairs)))
    mixing.register_mixture(name, pairs)
    return name
