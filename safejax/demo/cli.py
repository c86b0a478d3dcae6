"""`safejax demo [--workdir DIR] [--quick] [--base_url URL --model M]`: the whole method on the
bundled data, stage by stage (resumable), ending with DIR/report.md and its headline table."""

from __future__ import annotations

import os
import time

DEFAULT_WORKDIR = "runs/demo"


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the whole method end to end on the bundled data: classifier, scoring, "
                                       "synthesis, RAW and SAFE pretraining, evaluation, benign finetuning, "
                                       "report (resumable; full <= 30 min on 2 CPU cores, --quick <= 5)")
    demo.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"where every stage writes (default {DEFAULT_WORKDIR})")
    demo.add_argument("--quick", action="store_true", help="smaller models, fewer steps and prompts "
                                                           "(configs/demo/quick.gin instead of full.gin)")
    demo.add_argument("--base_url", help="synthesize with an OpenAI-compatible endpoint instead of the "
                                         "template backend, e.g. http://127.0.0.1:8000/v1")
    demo.add_argument("--model", help="the model the endpoint serves (with --base_url)")
    demo.add_argument("--gin_file", action="append", default=[], help="gin file after the mode's")
    demo.epilog = "Any --gin.NAME=VALUE argument binds a DemoConfig field (configs/demo/full.gin)."
    demo.set_defaults(run=cmd_demo, takes_gin=True)


def cmd_demo(args, bindings) -> int:
    from safejax import errors
    from safejax.data import sources
    from safejax.demo import pipeline, report, settings, stages

    if bool(args.base_url) != bool(args.model):
        raise errors.UserError("--base_url and --model go together")
    mode = "demo/quick.gin" if args.quick else "demo/full.gin"
    cfg = settings.load([mode, *args.gin_file], bindings)
    workdir = os.path.abspath(args.workdir)
    # A workdir holds one mode's stages: resuming it in the other mode would mix their outputs.
    sources.claim_output_dir(workdir, {"mode": cfg.mode, "base_url": args.base_url, "model": args.model}, "a demo")
    demo = pipeline.Demo(workdir, cfg, args.base_url, args.model)
    _cache_compilations(os.path.join(workdir, "xla_cache"))
    print(f"safejax demo ({cfg.mode}) in {workdir}", flush=True)
    began = time.perf_counter()
    stages.run_stages(workdir, demo.stages(), lambda line: print(line, flush=True))
    print(f"\ndone in {time.perf_counter() - began:.0f} s; report: {os.path.join(workdir, 'report.md')}\n")
    print("\n".join(report.headline(report.measurements(demo))))
    return 0


def _cache_compilations(directory: str) -> None:
    """XLA's persistent compilation cache in the workdir: the stages build the same programs again
    (RAW and SAFE share a model, the four eval runs share their decoders and the judge), and
    without it each build compiles anew (on 2 CPU cores most of `--quick`'s eval time)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
