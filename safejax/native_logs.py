"""Keeps the native libraries' start-up chatter off the console, for the CLI and the Python API.

TensorFlow 2.21 logs through absl before absl is initialised, which ignores TF_CPP_MIN_LOG_LEVEL:
each of its two shared libraries prints "All log messages before absl::InitializeLog() ...", the
oneDNN notice and "Could not find cuda drivers" while `import tensorflow` runs; TF-Text's
SentencePiece op prints "precompiled_charsmap is empty" when it loads our vocabulary (identity
normalisation). Those lines, and only those, are dropped: stderr's file descriptor goes to a
temporary file while such a library loads, and every other line written meanwhile is copied to
the real stderr afterwards. Later TensorFlow and gRPC logs (the `failed call to cuInit` of a host
with CUDA libraries but no GPU among them) obey TF_CPP_MIN_LOG_LEVEL and GRPC_VERBOSITY, set here
unless the user set them. SAFEJAX_NATIVE_LOGS=1 keeps everything.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
SWITCH = "SAFEJAX_NATIVE_LOGS"
NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:. ]+\d+ (port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine)"
    r"|normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty")


def enabled() -> bool:
    return os.environ.get(SWITCH, "0") != "1"


_lock = threading.Lock()
_active = {"depth": 0, "saved": -1, "held": None}  # one redirection for all threads inside a block


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Writes to stderr inside the block are held back (from any thread: file descriptor 2 is the
    process's); when the last block open ends, all but NOISE lines go on to the real stderr."""
    if not enabled():
        yield
        return
    with _lock:
        if _active["depth"] == 0:
            sys.stderr.flush()
            _active["saved"], _active["held"] = os.dup(2), tempfile.TemporaryFile()
            os.dup2(_active["held"].fileno(), 2)
        _active["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _active["depth"] -= 1
            if _active["depth"] == 0:
                sys.stderr.flush()
                os.dup2(_active["saved"], 2)
                os.close(_active["saved"])
                with _active["held"] as held:
                    held.seek(0)
                    text = held.read().decode("utf-8", "replace")
                kept = [line for line in text.splitlines(keepends=True) if not NOISE.match(line)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()


def first_quietly(items: Iterable[T]) -> Iterator[T]:
    """`items`, its first one made under `filtered_stderr`: a tf.data pipeline that tokenizes
    loads the vocabulary into TF-Text (which logs) when it makes its first element."""
    iterator = iter(items)
    with filtered_stderr():
        try:
            first = next(iterator)
        except StopIteration:
            return
    yield first
    yield from iterator


class _QuietImport(importlib.abc.MetaPathFinder):
    """Loads `tensorflow` (when first imported, by whichever module) under `filtered_stderr`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; and find_spec below must not find this finder again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = self._loader  # the module keeps its real loader
        with filtered_stderr():
            self._loader.exec_module(module)


def quiet() -> None:
    """Called by `import safejax`: before TensorFlow loads, wherever it is imported from."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if enabled() and "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
