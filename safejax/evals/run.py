"""`safejax eval`: a checkpoint's attack success rate, toxicity, over-refusal and utility in one
run directory (PAPER.md §5).

    safejax eval --checkpoint runs/tiny --suite all --decoding greedy,safebeam \
        --judge classifier,profanity,refusal --classifier runs/clf --clean_text DOCS --output runs/eval-tiny

Suites (their prompt sets and judges in configs/eval/default.gin):
  safety    harmful requests (AdvBench, SimpleSafetyTests, Do-Not-Answer, XSTest unsafe) under the
            completion templates; attack success rate = share judged harmful;
  toxicity  RealToxicityPrompts continued as they are; toxic-continuation rate;
  refusal   benign requests (XSTest safe, JBB benign) under open templates; refusal rate;
  utility   perplexity on clean text (harm tag removed and renormalised) and multiple-choice accuracy.
Every judge asked for runs on every suite that lists it; a refusal judge's cells are refusal rates.

All bad input (unknown names, a judge without its classifier or endpoint, Safe Beam without the
harm tag, prompt files) is refused before the model loads. Generations and verdicts are cached in
the run directory (generation.py, judges.py): a killed eval resumes. RUN/results.json (schema 1,
the contract with evals/report.py) holds one cell per (suite, set, decoding, judge) with its
per-prompt rates and their bootstrap summary (evals/stats.py); RUN/report.md and the figures follow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence

import gin

from safejax import errors
from safejax.data import sources
from safejax.evals import generation, judges, prompts, templates
from safejax.inference import checkpoint
from safejax.safety.resumable import find_config_file, write_json

SCHEMA = 1
GENERATION_SUITES = ("safety", "toxicity", "refusal")
SUITES = (*GENERATION_SUITES, "utility")
METRICS = {"safety": "asr", "toxicity": "toxic_rate", "refusal": "refusal_rate"}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What an eval runs; configs/eval/default.gin documents each field."""

    sets: dict = dataclasses.field(default_factory=dict)  # suite -> prompt set names
    suite_judges: dict = dataclasses.field(default_factory=dict)  # suite -> judges that may judge it
    templates_file: dict = dataclasses.field(default_factory=dict)  # suite -> templates JSON
    template_mode: str = "all"
    template_seed: int = 0
    max_new_tokens: int = 64
    num_samples: int = 4  # per case, for the `sample` decoding
    batch_size: int = 16
    clean_text: str | None = None  # utility: a score folder or a JSONL/text file of documents
    multiple_choice: Sequence[str] = ()  # utility: JSONL files of the multiple-choice format
    progress_bar: bool = True

    def check(self) -> EvalConfig:
        """Raises UserError naming the first bad field."""
        for name in ("max_new_tokens", "num_samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise errors.UserError(f"EvalConfig.{name}={value!r}: must be an integer >= 1")
        if self.template_mode not in templates.MODES:
            raise errors.UserError(f"EvalConfig.template_mode={self.template_mode!r}: choose from "
                                   f"{', '.join(templates.MODES)}")
        return self


@dataclasses.dataclass
class Plan:
    """Everything checked before any work."""

    suites: list[str]
    decodings: list[str]
    judge_names: list[str]
    sets: dict  # suite -> [(set name, kind, prompts)]
    step: int


def split_names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in known and not (what == "suite" and n == "all"):
            raise errors.UserError(f"unknown {what} {n!r}: choose from {', '.join(known)}"
                                   + (" or all" if what == "suite" else ""))
    if not names:
        raise errors.UserError(f"no {what} given")
    return list(SUITES) if "all" in names else list(dict.fromkeys(names))


def plan(checkpoint_dir: str, suites: list[str], decodings: list[str], judge_names: list[str], cfg: EvalConfig,
         step: int | None, limit: int | None, prompt_sets: Sequence[str] = (), text_column: str | None = None) -> Plan:
    """Checks the request against the checkpoint's record and loads the prompt sets."""
    from safejax.train.checkpoint import Checkpointer, check_lm_record

    cfg.check()
    generating = [s for s in suites if s in GENERATION_SUITES]
    if generating and not decodings:
        raise errors.UserError("--decoding is empty")
    if limit is not None and limit < 1:
        raise errors.UserError(f"--limit must be >= 1, got {limit}")
    for suite in generating:
        if not set(cfg.suite_judges.get(suite, ())) & set(judge_names):
            raise errors.UserError(f"suite {suite} is judged by {', '.join(cfg.suite_judges.get(suite, ()))}; "
                                   f"--judge has none of them")
    for name in judge_names:
        if generating and not any(name in cfg.suite_judges.get(s, ()) for s in generating):
            raise errors.UserError(f"judge {name} judges none of the suites asked for ({', '.join(generating)}); "
                                   f"see EvalConfig.suite_judges")
    if prompt_sets and len(generating) != 1:
        raise errors.UserError("--prompts replaces the prompt sets of one suite: name exactly one of "
                               f"{', '.join(GENERATION_SUITES)} with --suite")
    if "utility" in suites and not (cfg.clean_text or cfg.multiple_choice):
        raise errors.UserError("suite utility needs --clean_text (a score folder or a file of documents) "
                               "and/or --multiple_choice FILE")
    with Checkpointer(checkpoint_dir, read_only=True) as ckpt:
        step = ckpt.pick(step)
        record = ckpt.read_record(step)
    check_lm_record(record, f"{checkpoint_dir} step {step}")
    reserved = record.vocabulary.get("reserved_ids", {})
    generation.check_decodings(decodings, "<potentially unsafe content>" in reserved)
    sets = {}
    for suite in generating:
        names = list(prompt_sets) or list(cfg.sets.get(suite, ()))
        if not names:
            raise errors.UserError(f"suite {suite} has no prompt sets (EvalConfig.sets)")
        sets[suite] = [(prompts.set_name(n), prompts.kind(n), prompts.load(n, text_column)[:limit]) for n in names]
    named = [name for suite_sets in sets.values() for name, _, _ in suite_sets]
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise errors.UserError(f"two prompt sets are both named {twice[0]!r} (a set's name is its file's base "
                               "name): results and generation files would mix; rename one")
    return Plan(suites, decodings, judge_names, sets, step)


def _sha(path: str) -> str:
    with open(find_config_file(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def generation_manifest(checkpoint_dir: str, step: int, cfg: EvalConfig, chat: bool, sampling: dict) -> dict:
    """What the cached generations depend on: another checkpoint or setting needs another RUN."""
    return {"checkpoint": os.path.abspath(checkpoint_dir), "step": step, "chat": chat,
            "max_new_tokens": cfg.max_new_tokens, "num_samples": cfg.num_samples,
            "template_mode": cfg.template_mode, "template_seed": cfg.template_seed,
            "templates": {s: _sha(p) for s, p in sorted(cfg.templates_file.items())}, "sampling": sampling}


def _cell(suite, set_name, decoding, judge, records, verdicts, prompt_list) -> dict:
    """Per-prompt shares of positive verdicts, with what was left out counted."""
    from safejax.evals import stats

    hits: dict[str, list[bool]] = {}
    invalid = skipped = failed = 0
    for key, record in records.items():
        if record.get("skipped"):
            skipped += 1
            continue
        v = verdicts[key]
        if v.failed:
            failed += 1
        elif v.positive is None:
            invalid += 1
        else:
            hits.setdefault(record["prompt_id"], []).append(v.positive)
    per_prompt = {pid: sum(h) / len(h) for pid, h in hits.items()}
    categories = {p.id: p.category for p in prompt_list if p.id in per_prompt and p.category is not None}
    metric = "refusal_rate" if judge == "refusal" else METRICS[suite]
    summary = stats.rate_summary(per_prompt, categories or None) if per_prompt else \
        {"rate": None, "ci": None, "n_prompts": 0, "rule_of_three_upper": None, "per_category": {}}
    return {"suite": suite, "set": set_name, "decoding": decoding, "judge": judge, "metric": metric,
            "n_prompts": len(per_prompt), "n_samples": sum(len(h) for h in hits.values()),
            "per_prompt": per_prompt, "categories": categories, "invalid": invalid, "skipped_too_long": skipped,
            "failed": failed, **{k: v for k, v in summary.items() if k != "n_prompts"}}


def evaluate(checkpoint_dir: str, output: str, *, suites: list[str], decodings: list[str], judge_names: list[str],
             classifier: str | None = None, step: int | None = None, limit: int | None = None, chat: bool = False,
             label: str | None = None, prompt_sets: Sequence[str] = (), text_column: str | None = None,
             vocab_path: str | None = None, report: bool = True) -> dict:
    """Runs the eval (gin already parsed by `parse`); returns results.json's content."""
    began = time.perf_counter()
    cfg = EvalConfig()
    work = plan(checkpoint_dir, suites, decodings, judge_names, cfg, step, limit, prompt_sets, text_column)
    wanted = {j for s in work.sets for j in cfg.suite_judges[s]} & set(judge_names)
    judge_objs = {name: judges.build(name, classifier) for name in judge_names if name in wanted}
    suite_templates = {s: templates.load_templates(cfg.templates_file[s]) for s in work.sets
                       if any(kind == "request" for _, kind, _ in work.sets[s]) and not chat}

    from safejax.inference.generate import Generator

    gen = Generator(checkpoint.load(checkpoint_dir, work.step, vocab_path))
    sampling = json.loads(json.dumps(  # as the manifest reads back (tuples as lists)
        {d: dataclasses.asdict(generation.decoding_params(gen, d, cfg.max_new_tokens)) for d in decodings}))
    if work.sets:
        sources.claim_output_dir(os.path.join(output, "generations"),
                                 generation_manifest(checkpoint_dir, work.step, cfg, chat, sampling), "generations")
    cells, timings = [], {"generation_s": 0.0, "judging_s": 0.0}
    gen_stats = generation.Stats()
    for suite, set_list in work.sets.items():
        for set_name, kind, prompt_list in set_list:
            case_list = templates.cases(prompt_list, kind, suite_templates.get(suite, ()), cfg.template_mode,
                                        cfg.template_seed, chat)
            by_key = {c.key: c for c in case_list}
            for decoding in decodings:
                t0 = time.perf_counter()
                records = generation.generate(
                    gen, case_list, decoding, generation.path_for(output, set_name, decoding),
                    max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_samples, batch_size=cfg.batch_size,
                    chat=chat, progress=cfg.progress_bar, stats=gen_stats)
                timings["generation_s"] += time.perf_counter() - t0
                items = {k: judges.Item(by_key[r["key"].rsplit("#", 1)[0]].prompt.text,
                                        by_key[r["key"].rsplit("#", 1)[0]].text, r["completion"])
                         for k, r in records.items() if not r.get("skipped")}
                for name in cfg.suite_judges[suite]:
                    if name not in judge_objs:
                        continue
                    t0 = time.perf_counter()
                    verdicts = judges.judge_cached(judge_objs[name], items,
                                                   judges.path_for(output, set_name, decoding, name), cfg.progress_bar)
                    spent = time.perf_counter() - t0
                    timings["judging_s"] += spent
                    timings[f"judging_{name}_s"] = timings.get(f"judging_{name}_s", 0.0) + spent
                    cells.append(_cell(suite, set_name, decoding, name, records, verdicts, prompt_list))
    timings.update(generated_samples=gen_stats.samples, generated_tokens=gen_stats.new_tokens,
                   skipped_samples=gen_stats.skipped, cached_samples=gen_stats.cached,
                   decode_tokens_per_s=round(gen_stats.new_tokens / gen_stats.seconds, 1) if gen_stats.seconds else None)
    results = {"schema": SCHEMA, "label": label or os.path.basename(os.path.abspath(checkpoint_dir)),
               "checkpoint": os.path.abspath(checkpoint_dir), "step": work.step,
               "settings": {"suites": suites, "decodings": decodings, "judges": judge_names, "chat": chat,
                            "limit": limit, "sets": {s: [n for n, _, _ in v] for s, v in work.sets.items()},
                            "eval_config": dataclasses.asdict(cfg), "sampling": sampling,
                            "judge_ids": {n: j.judge_id for n, j in judge_objs.items()}, "classifier": classifier},
               "cells": cells, "utility": {}, "timings": timings}
    if "utility" in suites:
        t0 = time.perf_counter()
        results["utility"] = utility(gen, cfg)
        timings["utility_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - began
    os.makedirs(output, exist_ok=True)
    write_json(os.path.join(output, "results.json"), results)
    if report:
        from safejax.evals import report as report_lib

        report_lib.write_report(output)
    return results


def utility(gen, cfg: EvalConfig) -> dict:
    from safejax.evals import utility as utility_lib

    out = {}
    if cfg.clean_text:
        out["perplexity"] = utility_lib.perplexity(gen, utility_lib.clean_texts(cfg.clean_text))
    if cfg.multiple_choice:
        out["multiple_choice"] = {os.path.basename(p).split(".")[0]: utility_lib.multiple_choice(gen, p)
                                  for p in cfg.multiple_choice}
    return out


def register_configurables() -> None:
    """Imports the modules whose gin configurables configs/eval/*.gin binds (judges: above)."""
    from safejax.evals import report, stats, utility  # noqa: F401


def parse(checkpoint_dir: str, gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    """The checkpoint's training config, the sampling defaults, configs/eval/default.gin, then the
    user's files and bindings (later ones win)."""
    register_configurables()
    checkpoint.parse_config(checkpoint_dir, ["eval/default.gin", *gin_files], bindings)


def summary_line(results: dict, output: str) -> dict:
    """What the command prints: where the results are and each cell's rate."""
    return {"output": os.path.abspath(output), "report": os.path.join(os.path.abspath(output), "report.md"),
            "cells": [{k: c[k] for k in ("suite", "set", "decoding", "judge", "metric", "rate", "ci", "n_prompts",
                                         "invalid")} for c in results["cells"]],
            "utility": {k: v for k, v in results["utility"].items() if k == "perplexity"},
            "timings": {k: round(v, 2) if isinstance(v, float) else v for k, v in results["timings"].items()}}
