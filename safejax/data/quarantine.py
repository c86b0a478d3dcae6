"""Records that cannot be used are set aside here: counted, and written with where they came from.

Malformed input (bad JSON, missing or empty text, invalid UTF-8, an unparsable TFRecord) and
documents without a score are never dropped silently. The readers run inside tf.data, possibly
over several epochs, so each entry is keyed (file and line, or document id) and counted once.

One ledger per process (`QUARANTINE`): tf.data calls back into Python from its own threads, and
the train run, `safejax data stats` and the Beam job each point it at their output file with
`write_to`. The file is JSONL, one object per entry:

    {"reason": "bad_json", "key": [FILE, 17], "file": FILE, "line": 17, "detail": "...", "raw": "..."}
    {"reason": "no_score", "key": [TASK, "doc-42"], "task": TASK, "id": "doc-42"}
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading

import tensorflow as tf

RAW_CHARS_KEPT = 2000  # enough to find and fix the record, small enough for a huge bad line


class Quarantine:
    def __init__(self):
        self._lock = threading.Lock()
        self._seen: set[tuple] = set()
        self._counts: collections.Counter = collections.Counter()
        self._path: str | None = None
        self._file = None

    def write_to(self, path: str | None) -> None:
        """Appends later entries to `path` (any tf.io.gfile path); None keeps counts only.

        Entries already in the file (a run resumed in a new process) count and are not repeated.
        """
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._path, self._file = path, None
            if path and tf.io.gfile.exists(path):
                with tf.io.gfile.GFile(path) as f:
                    for line in f:
                        entry = json.loads(line)
                        key = (entry["reason"], tuple(entry["key"]))
                        if key not in self._seen:
                            self._seen.add(key)
                            self._counts[entry["reason"]] += 1

    @property
    def path(self) -> str | None:
        return self._path

    def add(self, reason: str, key: tuple[str | int, ...], **fields) -> None:
        """Records one entry unless `key` was recorded before (a record read in a later epoch)."""
        with self._lock:
            if (reason, key) in self._seen:
                return
            self._seen.add((reason, key))
            self._counts[reason] += 1
            first_of_reason = self._counts[reason] == 1
            if self._path is not None:
                if self._file is None:
                    if os.path.dirname(self._path):
                        tf.io.gfile.makedirs(os.path.dirname(self._path))
                    self._file = tf.io.gfile.GFile(self._path, "a")
                entry = {"reason": reason, "key": list(key), **fields}
                self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
                self._file.flush()
        if first_of_reason:
            logging.warning("set aside a record: %s (%s); all such records go to %s", reason,
                            ", ".join(f"{k}={v}" for k, v in fields.items() if k != "raw"),
                            self._path or "the counts only")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        """Forgets everything (tests and `data stats` measure one task at a time)."""
        with self._lock:
            self._seen.clear()
            self._counts.clear()


QUARANTINE = Quarantine()


def raw_text(raw: bytes) -> str:
    """The start of a bad record as text, invalid bytes shown as escapes."""
    return raw[:RAW_CHARS_KEPT].decode("utf-8", errors="backslashreplace")
