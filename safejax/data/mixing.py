"""seqio Mixtures whose held-out stream is every member's held-out records.

seqio mixes with `sample_from_datasets(stop_on_empty_dataset=True)`: fine for training, where
every member repeats forever, but a validation stream (one epoch) then ends as soon as its
smallest member runs out, and is empty when one member has no validation record at all (a
hundred synthetic rephrasings and a small validation share). Mixtures registered here
mix until every member is exhausted. In training, where an empty member would now be skipped
quietly, `check_members` refuses it by name instead.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from safejax import errors, native_logs

_MIX_UNTIL_ALL_EMPTY = functools.partial(tf.data.Dataset.sample_from_datasets, stop_on_empty_dataset=False)


def register_mixture(name: str, pairs: Sequence[tuple[str, float]]) -> None:
    """Registers (or replaces) Mixture `name` of (task, rate) pairs."""
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, list(pairs), sample_fn=_MIX_UNTIL_ALL_EMPTY)


def empty_members(name: str, split: str, sequence_length: Mapping[str, int], use_cached: bool = False) -> list[str]:
    """The member tasks of Mixture `name` (none for a Task) with no example in `split`."""
    target = seqio.get_mixture_or_task(name)
    if not isinstance(target, seqio.Mixture):
        return []
    empty = []
    for task in target.tasks:
        ds = task.get_dataset(sequence_length, split=split, use_cached=use_cached, shuffle=False,
                              num_epochs=1).take(1)
        if not any(True for _ in native_logs.first_quietly(ds.as_numpy_iterator())):
            empty.append(task.name)
    return empty


def check_members(name: str, split: str, sequence_length: Mapping[str, int], use_cached: bool = False) -> None:
    """A training mixture with a member that has no examples is an error naming the member."""
    empty = empty_members(name, split, sequence_length, use_cached)
    if empty:
        raise errors.UserError(f"mixture {name!r}: kind {empty[0]!r} has no {split} examples (its files are "
                               f"empty or every record was set aside); drop it from the mixture or add data")
