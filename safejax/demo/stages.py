"""The demo's stage runner: stages in order, each skipped when its marker says it finished.

A stage is finished when DIR/stages/NAME.json exists: it is written (whole, by rename) only
after the stage's own outputs are complete, with its summary and wall time. A stage killed or
failing midway has no marker, so the next run starts it again, and the command it wraps resumes
its own finished work (score shards, synthesis records, checkpoints, cached generations). The
time of a failed or stopped attempt is kept in NAME.attempts.json and added to the stage's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

from safejax.safety.resumable import write_json


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    does: str  # one line: what it does, printed before it starts
    run: Callable[[], dict]  # returns a JSON-able summary


def marker_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, "stages", f"{name}.json")


def finished(workdir: str, name: str) -> dict | None:
    path = marker_path(workdir, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _attempts_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, "stages", f"{name}.attempts.json")


def _earlier_attempts(workdir: str, name: str) -> dict:
    """The failed or stopped attempts' count and time, so a resumed stage reports all it took."""
    path = _attempts_path(workdir, name)
    if not os.path.isfile(path):
        return {"attempts": 0, "wall_s": 0.0}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_stages(workdir: str, stages: Sequence[Stage], echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Runs the unfinished stages in order; returns every stage's marker (name -> summary)."""
    os.makedirs(os.path.join(workdir, "stages"), exist_ok=True)
    markers = {}
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {stage.name}"
        done = finished(workdir, stage.name)
        if done is not None:
            echo(f"{head}: finished earlier in {done['wall_s']:.0f} s, skipped")
            markers[stage.name] = done
            continue
        echo(f"{head}: {stage.does}")
        earlier = _earlier_attempts(workdir, stage.name)
        began = time.perf_counter()
        try:
            summary = stage.run()
        except BaseException:  # a failure or a signal: its time counts towards the stage's (SIGKILL's does not)
            write_json(_attempts_path(workdir, stage.name),
                       {"attempts": earlier["attempts"] + 1,
                        "wall_s": round(earlier["wall_s"] + time.perf_counter() - began, 1)})
            raise
        wall = round(earlier["wall_s"] + time.perf_counter() - began, 1)
        marker = {"stage": stage.name, "wall_s": wall, "attempts": earlier["attempts"] + 1, "summary": summary}
        write_json(marker_path(workdir, stage.name), marker)
        echo(f"{head}: done in {wall:.0f} s" + (f" over {marker['attempts']} attempts" if earlier["attempts"] else ""))
        markers[stage.name] = marker
    return markers
