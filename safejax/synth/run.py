"""`safejax synth rephrase|refuseweb|moral`: unsafe web text turned into safe training data
(PAPER.md §2-3), in the record formats data/tasks.py reads.

The output directory (point safety_data.rephrased / .refuseweb / .moral_education at its file):

  rephrased.jsonl | refuseweb.jsonl | moral_education.jsonl    the kept records, one line each:
      {"id": "KIND:SOURCE_ID:PIECE", "kind": KIND, "text": ...}           rephrased, moral_education
      {"id": ..., "kind": "refuseweb", "turns": [{"role", "text"}, ...],
       "roles": {"user": NAME, "assistant": NAME}}                          refuseweb
    each with "provenance": {source_id, piece, pieces, kind, style (rephrase) or roles, category,
      backend, model, prompt_sha, score_before, score_after, repaired, tokens_in, tokens_out, key}
  rejected.jsonl    outputs the gate refused: the same record plus "rejected" (why) and "score"
  invalid.jsonl     unusable replies, even after the repair, with their raw texts (kept across runs)
  failed.jsonl      this run's items whose request failed after its retries (a rerun retries them)
  quarantine.jsonl  this run's unusable input lines, with file and line
  manifest.json     what the records depend on: job, backend, model, prompt version, gate, ...
  summary.json      counts kept / rejected / invalid per style (rephrase) or category, score
                    histograms before and after, tokens in and out, this run's speed

The directory is its own cache: every record is keyed by (prompt sha, backend, model, source
id, piece) and appended, flushed, as it is settled; a killed run loses no settled record, and a
rerun sends only the items not in the output, rejected or invalid files (torn last lines are cut
off). With a classifier, outputs wait to be scored in batches of `gate_batch` (and the template
backend produces that many items at a time, its sentence verdicts in one call): a kill loses at
most those.
A directory made with other prompts, another backend, model or gate is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Sequence

import gin
import tqdm

from safejax import errors
from safejax.data.preprocessors import dialogue_role_names
from safejax.data.quarantine import QUARANTINE
from safejax.safety import resumable
from safejax.safety.openai_client import ChatClient, ChatEndpoint, EndpointError
from safejax.safety.rubric import NUM_SCORES
from safejax.safety.scoring import SCORE_DTYPE
from safejax.synth import inputs as inputs_lib
from safejax.synth.backends import EndpointBackend
from safejax.synth.gate import Gate, load_scorer, sentence_judge
from safejax.synth.jobs import JOBS, Item, Job, Outcome
from safejax.synth.prompts import Prompt
from safejax.synth.template import TemplateBackend

STYLES = ("podcast", "textbook", "teacher script", "TED talk", "parent-child conversation",
          "conversation between friends", "children's video script")  # PAPER.md §2
BACKENDS = ("template", "endpoint")

# Flags of `safejax synth` that override gin bindings, and what they bind.
FLAG_BINDINGS = {
    "backend": "SynthConfig.backend",
    "base_url": "ChatEndpoint.base_url",
    "model": "ChatEndpoint.model",
    "api_key_env": "ChatEndpoint.api_key_env",
    "timeout_s": "ChatEndpoint.timeout_s",
    "max_retries": "ChatEndpoint.max_retries",
    "concurrency": "SynthConfig.concurrency",
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SynthConfig:
    backend: str = "template"
    styles: tuple[str, ...] = STYLES
    role_pairs: tuple[tuple[str, str], ...] | None = None  # None: dialogue_role_names (data/preprocessors.py)
    seed: int = 0  # of the style and role choices
    piece_chars: int = 4000  # longer documents are cut into pieces of at most this many characters
    concurrency: int = 16  # endpoint requests in flight at once
    reject_at: dict = dataclasses.field(default_factory=lambda: {"rephrase": 2, "refuseweb": 3, "moral": 2})
    sentence_max_score: int = 0  # template rephrase keeps sentences the classifier scores at most this
    classifier_batch_size: int = 64
    gate_batch: int = 32  # outputs scored by the classifier together (template: items produced together)
    template_file: str = "synth/template.json"
    prompt_files: dict = dataclasses.field(default_factory=lambda: {n: j.prompt_file for n, j in JOBS.items()})
    retry_invalid: bool = False  # resend items whose reply stayed invalid in an earlier run
    max_consecutive_failures: int = 50  # stop when this many requests fail in a row (0: never)
    progress_bar: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise errors.UserError(f"SynthConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise errors.UserError(f"SynthConfig.concurrency must be an integer >= 1, got {self.concurrency!r}")
        if not self.styles:
            raise errors.UserError("SynthConfig.styles must name at least one style")
        unknown = set(self.reject_at) - set(JOBS)
        if unknown:
            raise errors.UserError(f"SynthConfig.reject_at has an unknown job {sorted(unknown)[0]!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run needs besides its inputs, picklable (the Beam job ships it to workers)."""
    job: str
    cfg: SynthConfig
    endpoint: ChatEndpoint | None
    classifier: str | None
    score_files: tuple[str, ...] = ()
    score_range: tuple[int, int] | None = None

    def range(self) -> tuple[int, int]:
        return self.score_range or JOBS[self.job].score_range or (0, NUM_SCORES - 1)


def settings_from_gin(job: str, classifier: str | None, score_files: Sequence[str] = (),
                      score_range: tuple[int, int] | None = None) -> Settings:
    if job not in JOBS:
        raise errors.UserError(f"unknown synth job {job!r}; choose from {', '.join(JOBS)}")
    cfg = SynthConfig()
    if cfg.role_pairs is None:
        cfg = dataclasses.replace(cfg, role_pairs=dialogue_role_names())
    endpoint = ChatEndpoint() if cfg.backend == "endpoint" else None
    if score_range is not None and not 0 <= score_range[0] <= score_range[1] < NUM_SCORES:
        raise errors.UserError(f"--score_range must be LOW-HIGH within 0-{NUM_SCORES - 1}, got {score_range}")
    return Settings(job, cfg, endpoint, os.path.abspath(classifier) if classifier else None,
                    tuple(score_files), score_range)


class Producer:
    """The backend and gate of a run, built once (per Beam worker: one client each)."""

    def __init__(self, settings: Settings, scorer=None, client: ChatClient | None = None):
        cfg = settings.cfg
        if scorer is None and settings.classifier:
            scorer = load_scorer(settings.classifier, cfg.classifier_batch_size)
        self.gate = Gate(scorer, cfg.reject_at.get(settings.job, 2))
        if cfg.backend == "endpoint":
            self.client = client or ChatClient(settings.endpoint)
            self.backend = EndpointBackend(self.client, Prompt.load(cfg.prompt_files[settings.job]))
            if settings.job == "rephrase":
                self.backend.prompt.check_styles(cfg.styles)
        else:
            self.client = None
            judge = sentence_judge(scorer, cfg.sentence_max_score) if scorer is not None else None
            self.backend = TemplateBackend(cfg.template_file, judge)
            self.backend.check_styles(cfg.styles)

    @property
    def requests(self) -> int:
        return self.client.requests if self.client else 0

    def score_table(self, settings: Settings) -> dict[str, int] | None:
        """The score shards joined by id, read once per producer (a Beam worker runs many files)."""
        if not hasattr(self, "_table"):
            self._table = None if settings.job == "moral" else \
                inputs_lib.read_score_table(settings.score_files, settings.range())
        return self._table


class _Stats:
    """The summary's counts, over every record of the directory (earlier runs' included)."""

    def __init__(self):
        self.groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.before: collections.Counter = collections.Counter()
        self.after: collections.Counter = collections.Counter()
        self.tokens: collections.Counter = collections.Counter()

    def add(self, status: str, group: str | None, record: dict, scored: bool = True) -> None:
        """`record`: a provenance (kept, rejected) or an invalid record, both with their tokens."""
        self.groups[group or "none"][status] += 1
        if scored:
            self.before[str(record.get("score_before"))] += 1
            self.after[str(record.get("score_after"))] += 1
        for name in ("tokens_in", "tokens_out"):
            self.tokens[name] += record.get(name, 0)

    def summary(self) -> dict:
        totals = collections.Counter()
        for counts in self.groups.values():
            totals.update(counts)
        histogram = lambda c: {k: c[k] for k in [*map(str, range(NUM_SCORES)), "None"] if c[k]}  # noqa: E731
        return {"kept": totals["kept"], "rejected": totals["rejected"], "invalid": totals["invalid"],
                "by_group": {g: {s: c[s] for s in ("kept", "rejected", "invalid")} for g, c in sorted(self.groups.items())},
                "score_before": histogram(self.before), "score_after": histogram(self.after),
                "tokens_in": self.tokens["tokens_in"], "tokens_out": self.tokens["tokens_out"]}


class _Run:
    """Settles items into the output directory; only the calling thread writes."""

    def __init__(self, job: Job, settings: Settings, producer: Producer, store: resumable.OutputDir):
        self.job, self.settings, self.producer, self.store = job, settings, producer, store
        self.stats, self.counts = _Stats(), collections.Counter()
        self.group_of = (lambda item, outcome: item.style) if job.name == "rephrase" else \
            (lambda item, outcome: outcome.category)
        self.done: set[str] = set()
        for name, status in ((job.output, "kept"), ("rejected.jsonl", "rejected")):
            for record in store.cached[name]:
                provenance = record["provenance"]
                self.done.add(provenance["key"])
                self.stats.add(status, provenance.get("style") if job.name == "rephrase" else provenance.get("category"),
                               provenance)
        for record in store.cached["invalid.jsonl"]:
            self.stats.add("invalid", record.get("group"), record, scored=False)
            if not settings.cfg.retry_invalid:
                self.done.add(record["key"])
        store.cached.clear()
        self.pending: list[tuple[Item, Outcome]] = []
        self.failures_in_a_row = 0

    def settle(self, item: Item, outcome: Outcome) -> int:
        """Writes what became of the item (or queues it for the gate); returns records settled."""
        self._check_failures(outcome)
        if outcome.failed:
            self.counts["failed"] += 1
            self.store.append("failed.jsonl", {"id": self._id(item), "key": item.key, "error": outcome.error})
            return 1
        if outcome.output is None:
            self._invalid(item, outcome)
            return 1
        self.pending.append((item, outcome))
        batched = self.producer.gate.scorer is not None  # only the classifier scores in batches
        return self.flush() if not batched or len(self.pending) >= self.settings.cfg.gate_batch else 0

    def flush(self) -> int:
        pending, self.pending = self.pending, []
        verdicts = self.producer.gate.judge(self.job.name, [outcome for _, outcome in pending])
        for (item, outcome), (score, reason) in zip(pending, verdicts):
            record = self._record(item, outcome, score)
            if reason is None:
                self.store.append(self.job.output, record)
                status = "kept"
            else:
                self.store.append("rejected.jsonl", {**record, "rejected": reason, "score": score})
                status = "rejected"
            self.counts[status] += 1
            self.done.add(item.key)
            self.stats.add(status, self.group_of(item, outcome), record["provenance"])
        return len(pending)

    def _id(self, item: Item) -> str:
        return f"{self.job.kind}:{item.source_id}:{item.piece}"

    def _provenance(self, item: Item, outcome: Outcome, score: int | None) -> dict:
        backend = self.producer.backend
        out = {"source_id": item.source_id, "piece": item.piece, "pieces": item.pieces, "kind": self.job.kind}
        if self.job.name == "rephrase":
            out["style"] = item.style
        else:
            out["roles"] = {"user": item.roles[0], "assistant": item.roles[1]}
        out.update(category=outcome.category, backend=backend.name, model=backend.model, prompt_sha=backend.sha,
                   score_before=item.score_before, score_after=score, repaired=outcome.repaired,
                   tokens_in=outcome.tokens_in, tokens_out=outcome.tokens_out, key=item.key)
        return out

    def _record(self, item: Item, outcome: Outcome, score: int | None) -> dict:
        record = {"id": self._id(item), "kind": self.job.kind, self.job.record: outcome.output}
        if self.job.name == "refuseweb":
            record["roles"] = {"user": item.roles[0], "assistant": item.roles[1]}
        record["provenance"] = self._provenance(item, outcome, score)
        return record

    def _invalid(self, item: Item, outcome: Outcome) -> None:
        self.counts["invalid"] += 1
        self.done.add(item.key)
        backend = self.producer.backend
        record = {"id": self._id(item), "key": item.key, "source_id": item.source_id, "piece": item.piece,
                  "group": self.group_of(item, outcome), "error": outcome.error, "raw": outcome.raw,
                  "repair_raw": outcome.repair_raw, "backend": backend.name, "model": backend.model,
                  "prompt_sha": backend.sha, "tokens_in": outcome.tokens_in, "tokens_out": outcome.tokens_out}
        self.stats.add("invalid", record["group"], record, scored=False)
        self.store.append("invalid.jsonl", record)

    def _check_failures(self, outcome: Outcome) -> None:
        self.failures_in_a_row = self.failures_in_a_row + 1 if outcome.failed else 0
        limit = self.settings.cfg.max_consecutive_failures
        if limit and self.failures_in_a_row >= limit:
            raise EndpointError(f"{limit} requests in a row failed, the last with: {outcome.error}; finished "
                                "records are saved and a rerun resumes")


def _manifest(settings: Settings, producer: Producer) -> dict:
    cfg, backend = settings.cfg, producer.backend
    return {"job": settings.job, "kind": JOBS[settings.job].kind, "backend": backend.name, "model": backend.model,
            "prompt_sha": backend.sha, "temperature": settings.endpoint.temperature if settings.endpoint else None,
            "piece_chars": cfg.piece_chars, "seed": cfg.seed, "styles": list(cfg.styles),
            "role_pairs": [list(p) for p in cfg.role_pairs], "classifier": settings.classifier,
            "classifier_dtype": SCORE_DTYPE if settings.classifier else None,
            "reject_at": cfg.reject_at.get(settings.job, 2) if settings.classifier else None,
            "score_range": list(settings.range())}


def synthesize(settings: Settings, inputs: Sequence[str], output_dir: str, producer: Producer | None = None,
               part_of_a_whole: bool = False) -> dict:
    """Runs the job over `inputs` into `output_dir`; returns the summary (also summary.json).
    `part_of_a_whole`: one file of a larger input (the Beam job), which may hold no document in range."""
    start = time.time()
    job, cfg = JOBS[settings.job], settings.cfg
    files = inputs if part_of_a_whole else inputs_lib.input_files(job, inputs, settings.range())
    producer = producer or Producer(settings)
    table = producer.score_table(settings)
    backend = producer.backend
    store = resumable.OutputDir(output_dir, _manifest(settings, producer), "synthetic records", files={
        job.output: "a", "rejected.jsonl": "a", "invalid.jsonl": "a", "failed.jsonl": "w"})
    run = _Run(job, settings, producer, store)
    maker = inputs_lib.ItemMaker(job, backend.sha, backend.name, backend.model, cfg.styles, cfg.role_pairs,
                                 cfg.seed, cfg.piece_chars, settings.range())
    quarantine_path = store.path("quarantine.jsonl")
    if os.path.exists(quarantine_path):
        os.remove(quarantine_path)  # the input is read again in full, so are its bad lines
    QUARANTINE.reset()
    QUARANTINE.write_to(quarantine_path)
    counts = inputs_lib.Counts()
    pool = resumable.RequestPool(cfg.concurrency, "synth") if producer.client else None
    bar = tqdm.tqdm(unit=" rec", desc=f"synth {job.name}", disable=not cfg.progress_bar)
    items = cached = 0
    chunk: list[Item] = []  # the template backend produces gate_batch items at a time

    def settle_chunk() -> int:
        if not chunk:
            return 0
        settled = sum(run.settle(i, outcome) for i, outcome in zip(chunk, backend.produce_many(job.name, chunk)))
        chunk.clear()
        return settled

    loop_start = time.time()
    try:
        for item in maker.items(files, table, counts):
            items += 1
            if item.key in run.done or (pool is not None and item.key in pool):
                cached += item.key in run.done
                continue
            if pool is None:
                chunk.append(item)
                if len(chunk) >= cfg.gate_batch:
                    bar.update(settle_chunk())
                continue
            pool.submit(item.key, item, backend.produce, job.name, item)
            while pool.full():
                bar.update(sum(run.settle(i[0], outcome) for _, i, outcome in pool.collect()))
        if pool is not None:
            bar.update(sum(run.settle(i[0], outcome) for _, i, outcome in pool.collect(everything=True)))
        bar.update(settle_chunk() + run.flush())
    except BaseException:
        if producer.client:
            producer.client.stop()  # in-flight requests end without further retries
        raise
    finally:
        if pool is not None:
            pool.close()
        bar.close()
        store.close()
        QUARANTINE.write_to(None)
    if items == 0 and job.name != "moral" and not part_of_a_whole:
        low, high = settings.range()
        raise errors.UserError(f"no documents scored {low}-{high} in {', '.join(inputs)} "
                               f"({counts.read} read, {counts.out_of_range} out of range, {counts.no_score} without a score)")
    seconds, loop_seconds = time.time() - start, time.time() - loop_start
    produced = sum(run.counts[s] for s in ("kept", "rejected", "invalid"))
    summary = {"job": job.name, "kind": job.kind, "output": os.path.abspath(store.path(job.output)),
               "backend": backend.name, "model": backend.model, "prompt_sha": backend.sha,
               "inputs": counts.read + QUARANTINE.total() - counts.no_score, "bad_input": QUARANTINE.total(),
               "out_of_range": counts.out_of_range, "items": items, "cached": cached,
               "this_run": {s: run.counts[s] for s in ("kept", "rejected", "invalid", "failed")},
               "failed": run.counts["failed"], "requests": producer.requests, "seconds": round(seconds, 3),
               "records_per_sec": round(produced / loop_seconds if loop_seconds else 0.0, 2),
               **run.stats.summary()}
    resumable.write_json(store.path("summary.json"), summary)
    return summary


def run(job: str, inputs: Sequence[str], output_dir: str, classifier: str | None = None,
        score_files: Sequence[str] = (), score_range: tuple[int, int] | None = None) -> dict:
    """`safejax synth` with the bound gin config (configs/synth/default.gin and overrides)."""
    return synthesize(settings_from_gin(job, classifier, score_files, score_range), inputs, output_dir)
