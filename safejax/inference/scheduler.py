"""Which requests the server's model decodes next, and on which thread.

The Generator decodes a batch to its end (its KV cache has one write column for all rows), so a
request cannot join a batch that is running (continuous batching). The policy instead:

- A request's cost is the number of token positions the model scores for it, up to a constant:
  prompts x max_new_tokens x beams x expansions (beam search: beams; tag-aware sampling:
  tag_candidates lookahead candidates). Above ServerConfig.max_request_cost it is refused with a
  400 before it is queued.
- Requests costing at most `long_request_cost` go to the short lane, the others to the long lane.
  Each lane has its own decoding thread, so a short request never waits for a long one: at most
  for the short batch in flight (bounded by max_batch x long_request_cost) and the batch window.
  The two lanes share the device (on a CPU host, its cores), so a long batch slows short ones
  down but does not hold them up.
- Within a lane, after the first request arrives the thread waits `batch_wait_ms` for more, then
  decodes up to `max_batch` requests, cheapest first (first come first among equal costs).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

from safejax import errors
from safejax.inference.generate import Generator, Request
from safejax.inference.params import SamplingParams


class ApiError(Exception):
    """A failure answered as an OpenAI-style JSON error with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, close: bool = False):
        super().__init__(" ".join(message.split()))
        self.status, self.param, self.close = status, param, close


def cost(params: SamplingParams, prompts: int = 1) -> int:
    """Token positions the model scores for `prompts` requests with these settings (see above)."""
    width = 1
    if params.strategy in ("beam", "safebeam"):
        width = params.num_beams * (params.expansions if params.strategy == "safebeam" else 1)
    elif params.tag_filter != "none":
        width = params.tag_candidates
    return prompts * params.max_new_tokens * width


@dataclasses.dataclass(eq=False)
class Job:
    """One HTTP request's decoding work; `emit` is called from the decoding thread with
    ("text", i, delta), ("done", completions) or ("error", ApiError)."""

    requests: list[Request]
    cost: int
    emit: Callable[[tuple], None]


class Lane:
    """A queue ordered by cost and the thread that decodes it in batches."""

    def __init__(self, name: str, generator: Generator, max_batch: int, batch_wait_ms: int):
        self.name, self.generator = name, generator
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_ms / 1000
        self.stats = {"requests": 0, "batches": 0, "queued": 0}
        self._heap: list[tuple[int, int, Job]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"decode-{name}", daemon=True)

    def start(self) -> Lane:
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        with self._wake:
            heapq.heappush(self._heap, (job.cost, next(self._order), job))
            self.stats["queued"] = len(self._heap)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._heap or self._closed)
                if self._closed:
                    return
                deadline = time.monotonic() + self.batch_wait_s
                while self._queued_requests() < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                jobs = self._take()
            self._decode(jobs)

    def _queued_requests(self) -> int:
        return sum(len(job.requests) for _, _, job in self._heap)

    def _take(self) -> list[Job]:
        """The cheapest jobs that fit in one batch (always at least one)."""
        jobs, size = [], 0
        while self._heap and (not jobs or size + len(self._heap[0][2].requests) <= self.max_batch):
            job = heapq.heappop(self._heap)[2]
            jobs.append(job)
            size += len(job.requests)
        self.stats["queued"] = len(self._heap)
        return jobs

    def _decode(self, jobs: Sequence[Job]) -> None:
        owners = [(job, i) for job in jobs for i in range(len(job.requests))]
        requests = [r for job in jobs for r in job.requests]
        self.stats["batches"] += 1
        self.stats["requests"] += len(requests)

        def on_text(k, delta):
            job, i = owners[k]
            job.emit(("text", i, delta))

        try:
            completions = self.generator.run(requests, on_text)
        except errors.UserError as e:
            for job in jobs:
                job.emit(("error", ApiError(400, str(e))))
            return
        except Exception as e:  # a bug must not take the lane down
            logging.exception("decoding failed")
            for job in jobs:
                job.emit(("error", ApiError(500, f"internal error: {type(e).__name__}")))
            return
        start = 0
        for job in jobs:
            job.emit(("done", completions[start:start + len(job.requests)]))
            start += len(job.requests)


class Scheduler:
    """The short and the long lane; routes each job by its cost."""

    def __init__(self, generator: Generator, max_batch: int, batch_wait_ms: int, long_request_cost: int):
        self.long_request_cost = long_request_cost
        self.lanes = {name: Lane(name, generator, max_batch, batch_wait_ms) for name in ("short", "long")}

    def start(self) -> Scheduler:
        for lane in self.lanes.values():
            lane.start()
        return self

    def submit(self, job: Job) -> None:
        self.lanes["short" if job.cost <= self.long_request_cost else "long"].submit(job)

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.close()

    @property
    def stats(self) -> dict:
        lanes = {name: dict(lane.stats) for name, lane in self.lanes.items()}
        return {"requests": sum(s["requests"] for s in lanes.values()),
                "batches": sum(s["batches"] for s in lanes.values()), "lanes": lanes}
