"""The `safejax eval` command and its two other forms:

    safejax eval --checkpoint DIR --suite S[,S] --decoding D[,D] --judge J[,J] --output RUN [...]
    safejax eval compare RUN [RUN ...] [--output DIR]
    safejax eval judge-agreement --judge J[,J] --labels FILE [--classifier DIR] [--judge_url ...]

An option that the form given does not take is an error, not ignored.
"""

from __future__ import annotations

import argparse
import json
import sys

from safejax import config, errors

FLAG_BINDINGS = {  # flag -> the gin parameter it sets (configs/eval/default.gin)
    "judge_url": "LLMJudge.base_url",
    "judge_model": "LLMJudge.model",
    "judge_prompt": "LLMJudge.prompt_file",
    "judge_concurrency": "LLMJudge.concurrency",
    "clean_text": "EvalConfig.clean_text",
    "multiple_choice": "EvalConfig.multiple_choice",
}
JUDGE_FLAGS = ("judge", "classifier", "judge_url", "judge_model", "judge_prompt", "judge_concurrency")
TAKES = {  # form -> the options it takes
    "run": {"checkpoint", "step", "vocab", "suite", "decoding", "output", "limit", "chat", "label", "prompts",
            "text_column", "clean_text", "multiple_choice", "gin_file", *JUDGE_FLAGS},
    "compare": {"output", "gin_file"},
    "judge-agreement": {"labels", "gin_file", *JUDGE_FLAGS},
}


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="measure a checkpoint: attack success rate, toxicity, over-refusal, "
                                     "utility, with judges and bootstrap CIs; compare runs; validate judges",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("form", nargs="*", metavar="compare RUN... | judge-agreement",
                    help="nothing: run an eval; compare RUN...: runs side by side; judge-agreement: judges vs labels")
    ev.add_argument("--gin_file", action="append", default=[], help="gin file after configs/eval/default.gin")
    ev.add_argument("--checkpoint", help="a `safejax train` workdir")
    ev.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ev.add_argument("--vocab", help="a copy of the checkpoint's vocabulary file")
    ev.add_argument("--suite", help="comma-separated: safety, toxicity, refusal, utility, or all")
    ev.add_argument("--decoding", default="greedy", help="comma-separated: greedy, sample, beam, safebeam, "
                                                          "randomdrop (default greedy)")
    ev.add_argument("--judge", help="comma-separated: classifier, profanity, refusal, llm")
    ev.add_argument("--classifier", help="the classifier judge's classifier-train workdir or model/ folder")
    ev.add_argument("--output", help="the run directory (results.json, report.md, generations/, judgments/); "
                                     "compare: where to write compare.md and its figure")
    ev.add_argument("--limit", type=int, help="only the first N prompts of each set")
    ev.add_argument("--chat", action="store_true", help="prompt with the dialogue template (tuned models) "
                                                        "instead of the completion templates")
    ev.add_argument("--label", help="the run's name in reports (default: the checkpoint folder's name)")
    ev.add_argument("--prompts", action="append", help="a prompt set name or CSV/JSONL file (repeatable) "
                                                       "instead of the suite's sets; one suite only")
    ev.add_argument("--text_column", help="the text column of --prompts files (id and category are optional)")
    ev.add_argument("--clean_text", help="utility: a score folder (its score_0 validation documents) or a file")
    ev.add_argument("--multiple_choice", action="append", help="utility: a multiple-choice JSONL file (repeatable)")
    ev.add_argument("--judge_url", help="llm judge: an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                                        "(key from $SAFEJAX_EVAL_API_KEY)")
    ev.add_argument("--judge_model", help="llm judge: the model the endpoint serves")
    ev.add_argument("--judge_prompt", help="llm judge: a prompt file with {request} and {completion} "
                                           "(default configs/eval/llm_judge.md)")
    ev.add_argument("--judge_concurrency", type=int, help="llm judge: requests in flight")
    ev.add_argument("--labels", help="judge-agreement: CSV/JSONL with prompt, completion, label")
    ev.epilog = "Any --gin.NAME=VALUE argument binds a gin parameter (configs/eval/default.gin, sample/default.gin)."
    ev.set_defaults(run=cmd_eval, takes_gin=True)


def _form(args) -> tuple[str, list[str]]:
    words = list(args.form)
    if not words:
        return "run", []
    if words[0] in ("compare", "judge-agreement"):
        return words[0], words[1:]
    raise errors.UserError(f"unknown eval form {words[0]!r}: give options for a run, or compare RUN..., "
                           "or judge-agreement")


def _check_options(args, form: str) -> None:
    defaults = {"decoding": "greedy", "gin_file": [], "chat": False}
    given = [k for k in sorted(set().union(*TAKES.values()))
             if getattr(args, k) not in (None, defaults.get(k))]
    extra = [k for k in given if k not in TAKES[form]]
    if extra:
        raise errors.UserError(f"`safejax eval{'' if form == 'run' else ' ' + form}` does not take --{extra[0]}")


def _register() -> None:
    from safejax.evals import run

    run.register_configurables()


def cmd_eval(args, bindings) -> int:
    form, words = _form(args)
    _check_options(args, form)
    _register()
    bindings = list(bindings) + config.flag_bindings(args, FLAG_BINDINGS)
    if form == "compare":
        from safejax.evals import report

        if not words:
            raise errors.UserError("eval compare needs at least one RUN directory")
        config.parse(["eval/default.gin", *args.gin_file], bindings)
        print(report.compare(words, args.output), end="")
        return 0
    if form == "judge-agreement":
        from safejax.evals import agreement

        if words or not args.judge or not args.labels:
            raise errors.UserError("eval judge-agreement takes --judge J[,J] and --labels FILE (no other words)")
        names = [n.strip() for n in args.judge.split(",") if n.strip()]
        config.parse(["eval/default.gin", *args.gin_file], bindings)
        print(json.dumps(agreement.agreement(names, args.labels, args.classifier), indent=1))
        return 0
    return _run(args, bindings)


def _run(args, bindings) -> int:
    from safejax.evals import generation, judges, run

    for flag in ("checkpoint", "suite", "output"):
        if not getattr(args, flag):
            raise errors.UserError(f"safejax eval needs --{flag}")
    suites = run.split_names(args.suite, run.SUITES, "suite")
    decodings = run.split_names(args.decoding, tuple(generation.DECODINGS), "decoding")
    if not args.judge and set(suites) & set(run.GENERATION_SUITES):
        raise errors.UserError("safejax eval needs --judge for the suites that generate (classifier, profanity, "
                               "refusal, llm)")
    judge_names = run.split_names(args.judge, tuple(judges.JUDGES), "judge") if args.judge else []
    run.parse(args.checkpoint, args.gin_file, bindings)
    results = run.evaluate(args.checkpoint, args.output, suites=suites, decodings=decodings,
                           judge_names=judge_names, classifier=args.classifier, step=args.step, limit=args.limit,
                           chat=args.chat, label=args.label, prompt_sets=args.prompts or (),
                           text_column=args.text_column, vocab_path=args.vocab)
    print(json.dumps(run.summary_line(results, args.output)))
    failed = sum(c["failed"] for c in results["cells"])
    if failed:
        print(f"safejax: {failed} judge requests failed (counted as 'failed' in results.json, not in the rates); "
              "rerun the same command to retry them", file=sys.stderr)
    return 1 if failed else 0
