"""What the LLM jobs (`safejax label`, `safejax synth`) share: an output directory that is its own
cache, and a bounded pool of keyed requests.

The directory holds append-only JSONL files, one flushed line per finished record, so a killed
run loses nothing it finished; on restart a torn last line (the kill came mid-write) is cut off
and the whole lines are the cache. Its manifest (data/sources.claim_output_dir) names what the
records depend on, so a rerun with other settings is refused instead of mixing two kinds.

The pool keeps at most `concurrency` requests running and as many queued, so memory stays
bounded however long the input. Results are taken back on the calling thread only: the files
need no locks and every line is whole.
"""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import json
import logging
import os
from collections.abc import Callable, Hashable, Sequence

from safejax import config, errors
from safejax.data import sources


def read_jsonl(path: str) -> list[dict]:
    """Records of a file this process appends to; a torn last line (a killed run) is cut off."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logging.warning("cutting a partly written last line off %s (an interrupted run)", path)
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for line_no, line in enumerate(data[:end].splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise errors.UserError(f"{path} line {line_no} is damaged ({e}); "
                                   "move the file away to start over") from None
    return records


def write_json(path: str, obj: dict) -> None:
    """Replaces `path` whole (summaries, read while a run may be writing the next)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def count_lines(files: Sequence[str]) -> int:
    """Non-blank lines (a progress bar's total); reading every file first also finds a damaged one."""
    count = 0
    for path in files:
        try:
            with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
                count += sum(1 for line in f if line.strip())
        except (OSError, EOFError) as e:
            raise errors.UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    return count


def find_config_file(path: str) -> str:
    """A prompt or other config file: as given, else under the package's configs/."""
    for candidate in (path, os.path.join(config.CONFIG_DIR, path)):
        if os.path.isfile(candidate):
            return candidate
    raise errors.UserError(f"prompt file not found: {path}")


class OutputDir:
    """A claimed output directory and its JSONL files, opened for appending (mode "a") or rewritten
    by each run (mode "w": files about this run only, like failed requests)."""

    def __init__(self, directory: str, manifest: dict, what: str, files: dict[str, str],
                 keys: Sequence[str] | None = None):
        self.directory = directory
        sources.claim_output_dir(directory, manifest, what, keys=keys)
        self.cached = {name: read_jsonl(self.path(name)) for name, mode in files.items() if mode == "a"}
        self._files = {name: open(self.path(name), mode, encoding="utf-8") for name, mode in files.items()}

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def append(self, name: str, record: dict) -> None:
        f = self._files[name]
        line = json.dumps(record, ensure_ascii=False)
        if not sources.encodable(line):  # a model's raw reply with half a UTF-16 pair: kept escaped
            line = json.dumps(record)
        f.write(line + "\n")
        f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


class RequestPool:
    """Keyed requests on `concurrency` threads; items that need the same key share one request."""

    def __init__(self, concurrency: int, name: str):
        self.concurrency = concurrency
        self._pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name)
        self._futures: dict[cf.Future, Hashable] = {}
        self._waiting: dict[Hashable, list] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._waiting

    def __len__(self) -> int:
        return len(self._futures)

    def full(self) -> bool:
        """True when as many requests are queued as run: collect before submitting more."""
        return len(self._futures) >= 2 * self.concurrency

    def submit(self, key: Hashable, item, fn: Callable, *args) -> None:
        """Runs fn(*args) for `key`, or adds `item` to the request for `key` already in flight."""
        if key in self._waiting:
            self._waiting[key].append(item)
            return
        self._waiting[key] = [item]
        self._futures[self._pool.submit(fn, *args)] = key

    def collect(self, everything: bool = False) -> list[tuple[Hashable, list, object]]:
        """Waits for one request (or all): (key, its items, its result) of each finished one. A
        request's exception is raised here."""
        if not self._futures:
            return []
        done, _ = cf.wait(self._futures, return_when=cf.ALL_COMPLETED if everything else cf.FIRST_COMPLETED)
        finished = []
        for future in done:
            key = self._futures.pop(future)
            finished.append((key, self._waiting.pop(key), future.result()))
        return finished

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
