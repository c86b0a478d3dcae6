"""The `safejax` console script: one subcommand per job, each with --help.

A user mistake (UserError) prints one line `safejax: error: ...` and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

from safejax import errors


def _add_gin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable; later files override earlier ones)")
    parser.epilog = "Any --gin.NAME=VALUE argument binds a gin parameter or macro, e.g. --gin.TRAIN_STEPS=30."
    parser.set_defaults(takes_gin=True)


def _add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """The OpenAI-compatible endpoint that `label` and `synth` call (safety/openai_client.py)."""
    parser.add_argument("--base_url", help="endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="model name the endpoint serves")
    parser.add_argument("--api_key_env", help="environment variable holding the API key")
    parser.add_argument("--concurrency", type=int, help="requests in flight at once")
    parser.add_argument("--timeout_s", type=float, help="seconds to wait on the endpoint per attempt")
    parser.add_argument("--max_retries", type=int, help="retries on 429, 5xx and timeouts")


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a `safejax train` workdir (config.gin + checkpoints/)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--vocab", help="SentencePiece model (default: the one the training config names)")


def _exit_code(summary: dict) -> int:
    """A training run stopped by Ctrl-C (after writing its checkpoint) exits 130, as interrupted
    commands do; completed and preempted (SIGTERM) runs exit 0."""
    return 130 if summary.get("status") == "interrupted" else 0


def cmd_train(args, bindings) -> int:
    from safejax import config, parallel
    from safejax.train import plan, pretrain

    if not args.dry_run:
        parallel.initialize_distributed()
    if not args.gin_file:
        raise errors.UserError("train needs at least one --gin_file (e.g. configs/lm/tiny.gin)")
    config.parse(args.gin_file, bindings)
    if args.dry_run:  # the plan from the config alone: no devices of the named topology needed
        print(plan.format_plan(plan.build(args.workdir)))
        return 0
    plan.check_composition()
    plan.check_runtime()
    summary = pretrain.train(args.workdir)
    print(json.dumps(summary))
    return _exit_code(summary)


def cmd_finetune(args, bindings) -> int:
    from safejax import parallel
    from safejax.train import finetune, pretrain

    parallel.initialize_distributed()
    if not args.gin_file:
        raise errors.UserError("finetune needs at least one --gin_file (e.g. finetune/gsm8k.gin)")
    finetune.parse(args.source, args.step, args.gin_file, bindings)
    summary = pretrain.train(args.workdir)
    if summary["status"] == "completed":
        from safejax.evals import gsm8k

        accuracy = gsm8k.gsm8k_accuracy(args.workdir)  # when the config asks for it (finetune/gsm8k.gin)
        if accuracy is not None:
            summary["gsm8k"] = accuracy
    print(json.dumps(summary))
    return _exit_code(summary)


def cmd_vocab(args, bindings) -> int:
    from safejax import vocab
    from safejax.data import sources

    if args.from_model:
        path = vocab.add_reserved_tokens(args.from_model, args.output)
    else:
        files = sources.expand_files(args.input) if args.input else sources.bundled_corpus_files()
        path = vocab.train_sentencepiece(sources.iter_texts(files), args.output,
                                         vocab_size=args.vocab_size, model_type=args.model_type)
    ids = vocab.reserved_ids(vocab.load_vocabulary(path))
    print(json.dumps({"model": os.path.abspath(path), "reserved_ids": ids}))
    return 0


def cmd_label(args, bindings) -> int:
    from safejax import config
    from safejax.safety import labeler

    config.parse(["label/default.gin", *args.gin_file], bindings + config.flag_bindings(args, labeler.FLAG_BINDINGS))
    summary = labeler.run(args.input, args.output)
    print(json.dumps(summary))
    if summary["failed"]:
        print(f"safejax: {summary['failed']} texts failed (see {args.output}/failed.jsonl); "
              "rerun the same command to retry them", file=sys.stderr)
    return 1 if summary["failed"] else 0


def _score_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        return int(low), int(high if sep else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH, e.g. 1-3, got {text!r}") from None


def cmd_synth(args, bindings) -> int:
    from safejax import config
    from safejax.synth import run as synth

    config.parse(["synth/default.gin", *args.gin_file], bindings + config.flag_bindings(args, synth.FLAG_BINDINGS))
    if args.beam:
        from safejax.synth import beam

        settings = synth.settings_from_gin(args.job, args.classifier, args.scores or (), args.score_range)
        summary = beam.synthesize(settings, args.input, args.output, args.passthrough)
    else:
        summary = synth.run(args.job, args.input, args.output, args.classifier, args.scores or (), args.score_range)
    print(json.dumps(summary))
    if summary["failed"]:
        print(f"safejax: {summary['failed']} records failed (see {args.output}/failed.jsonl); "
              "rerun the same command to retry them", file=sys.stderr)
    return 1 if summary["failed"] else 0


def _classifier_config(gin_files, bindings) -> None:
    from safejax import config
    from safejax.train import classify  # noqa: F401 (registers the classifier's configurables)

    config.parse(gin_files or ["classifier/minilm.gin"], bindings)


def cmd_classifier_train(args, bindings) -> int:
    from safejax import parallel
    from safejax.train import classify

    parallel.initialize_distributed()
    _classifier_config(args.gin_file, bindings)
    summary = classify.train(args.workdir)
    print(json.dumps(summary))
    return _exit_code(summary)


def cmd_classifier_eval(args, bindings) -> int:
    from safejax.safety import classifier_eval

    trained = os.path.join(args.workdir, "config.gin")
    if not os.path.isfile(trained):
        raise errors.UserError(f"{args.workdir} has no config.gin: train it with safejax classifier-train first")
    _classifier_config([trained, *args.gin_file], bindings)
    report = classifier_eval.evaluate(args.workdir, args.split)
    print(classifier_eval.markdown(report), end="")
    return 0


def cmd_score(args, bindings) -> int:
    from safejax import parallel
    from safejax.safety import scoring

    parallel.initialize_distributed()
    batch_size = scoring.SCORE_BATCH_SIZE if args.batch_size is None else args.batch_size
    options = dict(batch_size=batch_size, overlap=args.overlap, dtype=args.dtype or scoring.SCORE_DTYPE,
                   rule=args.rule, cascade=args.cascade == "on")
    if args.beam:
        from safejax.safety import scoring_beam

        summary = scoring_beam.score_corpus(args.checkpoint, args.input, args.output, args.passthrough, **options)
    else:
        summary = scoring.score_corpus(args.checkpoint, args.input, args.output, **options)
    print(json.dumps(summary))
    return 0


def cmd_data(args, bindings) -> int:
    from safejax import config
    from safejax.data import quarantine, stats, tasks

    config.parse(args.gin_file or ["data/safety.gin"], bindings)
    if args.action == "split":  # before the tasks: they may read the folders it writes
        from safejax.data import split

        if not args.output:
            raise errors.UserError("data split needs --output DIR")
        quarantine.QUARANTINE.write_to(args.quarantine or os.path.join(args.output, "quarantine.jsonl"))
        print(json.dumps(split.split_by_score(args.output)))
        return 0
    tasks.safety_data()
    if args.action == "list":
        print(json.dumps(stats.list_data(), indent=1))
        return 0
    if not args.name:
        raise errors.UserError(f"data {args.action} needs the NAME of a task or mixture (see `safejax data list`)")
    if args.action == "cache":
        import gin

        from safejax.data import beam_cache

        if not args.cache_dir:
            raise errors.UserError("data cache needs --cache_dir")
        quarantine.QUARANTINE.write_to(args.quarantine)
        summary = beam_cache.run(args.name, args.cache_dir, gin.config_str(), args.passthrough)
        print(json.dumps(summary))
        return 0
    quarantine.QUARANTINE.write_to(args.quarantine)
    report = stats.stats(args.name, args.split, limit=args.max_documents)
    print(json.dumps(report, indent=1))
    if args.show:
        for example in stats.show(args.name, args.show, args.split):
            print(json.dumps(example, ensure_ascii=False))
    return 0


def cmd_sample(args, bindings) -> int:
    from safejax.inference import params as sampling
    from safejax.inference.generate import Generator, Request

    gen = Generator.from_checkpoint(args.checkpoint, args.step, args.gin_file, bindings, args.vocab)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += _read_prompts(args.prompt_file)
    if not prompts:
        raise errors.UserError("sample needs --prompt TEXT or --prompt_file FILE")
    params = gen.params(**sampling.overrides(args))
    encode = (lambda p: gen.encode_chat([{"role": "user", "content": p}])) if args.chat else gen.encode
    requests = [Request(encode(p), params.replace(seed=params.seed + i), args.chat) for i, p in enumerate(prompts)]
    for prompt, c in zip(prompts, gen.run(requests)):
        print(json.dumps({"prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
                          "new_tokens": len(c.tokens), "score": c.score, "tag_probability": c.tag_probability},
                         ensure_ascii=False))
    return 0


def _read_prompts(path: str) -> list[str]:
    """One prompt a line; a .jsonl file holds objects with a "prompt" field."""
    try:
        lines = (sys.stdin if path == "-" else open(path, encoding="utf-8")).read().splitlines()
    except OSError as e:
        raise errors.UserError(f"cannot read prompt file {path}: {e.strerror}") from e
    if not path.endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompts.append(json.loads(line)["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise errors.UserError(f"{path}:{n}: expected a JSON object with a \"prompt\" field") from None
    return prompts


def cmd_serve(args, bindings) -> int:
    import dataclasses
    import signal
    import threading
    import time

    from safejax.inference.generate import Generator
    from safejax.inference.server import Server, ServerConfig

    gen = Generator.from_checkpoint(args.checkpoint, args.step, args.gin_file, bindings, args.vocab)
    cfg = ServerConfig()
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    try:
        server = Server(gen, cfg, args.model_name or os.path.basename(os.path.abspath(args.checkpoint)))
    except OSError as e:
        raise errors.UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from e
    server.start()
    print(json.dumps({"url": server.url, "model": server.model_name}), flush=True)
    received = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    while not received:  # until Ctrl-C or SIGTERM
        time.sleep(0.2)
    closing = threading.Thread(target=server.shutdown, daemon=True)
    closing.start()
    closing.join(timeout=30)
    # Exit now: a stopped server has nothing left to write, and JAX/TensorFlow teardown can wait
    # on their own background threads (seen to hang a CI run's interpreter exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if received[0] == signal.SIGINT else 0)


def cmd_export(args, bindings) -> int:
    from safejax.inference import checkpoint
    from safejax.interop import hf_export  # registers export.max_shard_bytes before the bindings

    checkpoint.parse_config(args.checkpoint, args.gin_file, bindings)
    print(json.dumps(hf_export.export(args.checkpoint, args.output, args.step)))
    return 0


def cmd_import(args, bindings) -> int:
    from safejax import vocab
    from safejax.interop import hf_import

    named = {**({vocab.HARM_TAG: args.harm_tag} if args.harm_tag else {}),
             **dict(zip(vocab.ROLE_MARKERS, args.role_markers or ()))}
    print(json.dumps(hf_import.import_hf(args.hf, args.workdir, add_harm_tag=args.add_harm_tag, named=named)))
    return 0


def cmd_bench(args, bindings) -> int:
    from safejax.bench import registry

    return registry.run(args.name, args.extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safejax", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="pretrain or continue the decoder LM from gin configs")
    _add_gin_args(train)
    train.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, config.gin go here")
    train.add_argument("--dry-run", action="store_true", help="print the plan (hosts, mesh, batch, steps, "
                       "checkpoints, the data each mixture member reads) and exit without starting")
    train.set_defaults(run=cmd_train)

    tune = sub.add_parser("finetune", help="finetune a trained LM from its parameters (instruction tuning, "
                                           "benign finetuning on GSM8K) with a fresh optimizer and schedule")
    _add_gin_args(tune)
    tune.add_argument("--from", dest="source", required=True, help="the `safejax train` workdir to start from")
    tune.add_argument("--step", type=int, help="its checkpoint step (default: the latest)")
    tune.add_argument("--workdir", required=True, help="this run's checkpoints, metrics.jsonl, config.gin")
    tune.set_defaults(run=cmd_finetune)

    voc = sub.add_parser("vocab", help="train a SentencePiece vocabulary with the reserved tokens "
                                        "(harm tag, role markers), or add them to an existing one")
    voc.add_argument("--input", nargs="+", help="JSONL(.gz) files or globs (default: the bundled corpus)")
    voc.add_argument("--output", required=True, help="where to write the .model file")
    voc.add_argument("--vocab_size", type=int, default=8192)
    voc.add_argument("--model_type", choices=("unigram", "bpe"), default="unigram")
    voc.add_argument("--from_model", help="existing SentencePiece model to add the reserved tokens to")
    voc.set_defaults(run=cmd_vocab)

    lab = sub.add_parser("label", help="score texts 0-5 with the rubric through an LLM behind an "
                                       "OpenAI-compatible endpoint (resumable)")
    _add_gin_args(lab)
    lab.add_argument("--input", nargs="+", required=True, help="JSONL(.gz) files or globs with id, text")
    lab.add_argument("--output", required=True, help="directory for labels.jsonl (also the cache), "
                                                     "invalid.jsonl, failed.jsonl, quarantine.jsonl")
    _add_endpoint_args(lab)
    lab.add_argument("--prompt_file", help="the rubric prompt (default configs/label/rubric.md)")
    lab.set_defaults(run=cmd_label)

    syn = sub.add_parser("synth", help="turn scored documents into safe training data: rephrasings (scores "
                                       "1-3), RefuseWeb dialogues (4-5), Moral Education articles (resumable)")
    _add_gin_args(syn)
    syn.add_argument("job", choices=("rephrase", "refuseweb", "moral"))
    syn.add_argument("--input", nargs="+", required=True,
                     help="a `data split` SPLIT_DIR, or JSONL(.gz) files or globs (with --scores, or records "
                          "carrying their own score); moral: refuseweb output directories or files")
    syn.add_argument("--output", required=True, help="directory for the records (also the cache), rejected.jsonl, "
                                                     "invalid.jsonl, failed.jsonl, summary.json")
    syn.add_argument("--backend", choices=("template", "endpoint"),
                     help="template: offline deterministic baseline (default); endpoint: an LLM server")
    syn.add_argument("--scores", nargs="+", help="score shards of `safejax score` for JSONL --input files")
    syn.add_argument("--score_range", type=_score_range, help="LOW-HIGH (default 1-3 rephrase, 4-5 refuseweb)")
    syn.add_argument("--classifier", help="safety classifier (classifier-train workdir or export): the quality "
                                          "gate, and the template backend's sentence filter")
    _add_endpoint_args(syn)
    syn.add_argument("--beam", action="store_true", help="run as an Apache Beam pipeline, one input file per "
                                                         "worker task; its options go after -- (default DirectRunner)")
    syn.set_defaults(run=cmd_synth)

    ctrain = sub.add_parser("classifier-train", help="train the 0-5 safety classifier (encoder + linear "
                                                     "head) and evaluate it; resumable")
    _add_gin_args(ctrain)
    ctrain.add_argument("--workdir", required=True, help="checkpoints, model/, eval.json, eval.md go here")
    ctrain.set_defaults(run=cmd_classifier_train)

    ceval = sub.add_parser("classifier-eval", help="evaluate a trained classifier and the two baselines "
                                                   "(writes DIR/eval.json and DIR/eval.md)")
    _add_gin_args(ceval)
    ceval.add_argument("--workdir", required=True, help="a classifier-train workdir")
    ceval.add_argument("--split", choices=("test", "validation"), default="test")
    ceval.set_defaults(run=cmd_classifier_eval)

    score = sub.add_parser("score", help="score a JSONL corpus 0-5 with the safety classifier into score "
                                         "shards the data pipeline joins (resumable)")
    score.add_argument("--checkpoint", required=True, help="a classifier-train workdir or its model/ folder")
    score.add_argument("--input", nargs="+", required=True, help="JSONL(.gz) files or globs (id, text)")
    score.add_argument("--output", required=True, help="directory for scores-*.jsonl.gz (one per input file)")
    score.add_argument("--batch_size", type=int, default=None,
                       help="windows per classifier call (default: scoring.SCORE_BATCH_SIZE, 32)")
    score.add_argument("--overlap", type=int, help="tokens shared by consecutive windows (default 32, at "
                                                   "most a quarter of a window)")
    score.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                       help="matmul precision (default bfloat16 with float32 accumulation; float32 is the slower "
                            "reference); speed and agreement in benchmarks/PEERS.md")
    score.add_argument("--rule", choices=("calibrated", "max"), default=None,
                       help="document rule (default: the checkpoint's, calibrated; max: the paper's highest "
                            "window, recall first; safety/windows.py)")
    score.add_argument("--cascade", choices=("on", "off"), default="on",
                       help="the checkpoint's cascade, where it has one: its first encoder layers clear clearly "
                            "safe windows at a miss rate fitted on validation (safety/cascade.py); off scores "
                            "every window with the whole encoder")
    score.add_argument("--beam", action="store_true", help="run as an Apache Beam pipeline; its options "
                                                          "go after -- (default DirectRunner)")
    score.set_defaults(run=cmd_score)

    data = sub.add_parser("data", help="list, measure and show the safety data's seqio tasks and mixtures; "
                                       "split the corpus into score folders")
    _add_gin_args(data)
    data.add_argument("action", choices=("list", "stats", "cache", "split"))
    data.add_argument("name", nargs="?", help="task or mixture (see `safejax data list`)")
    data.add_argument("--show", type=int, default=0, metavar="N", help="also decode N documents")
    data.add_argument("--split", default="train", choices=("train", "validation"))
    data.add_argument("--max_documents", type=int, help="measure only the first N documents of each task")
    data.add_argument("--quarantine", help="write the malformed records found to this JSONL file")
    data.add_argument("--cache_dir", help="cache: where the Beam job writes the preprocessed tasks")
    data.add_argument("--output", help="split: where to write the corpus in score folders (SPLIT_DIR)")
    data.epilog = ("cache: Beam pipeline options go after --, e.g. -- --runner=DataflowRunner "
                   "(see launch/beam_dataflow.sh); the default is the DirectRunner.")
    data.set_defaults(run=cmd_data)

    samp = sub.add_parser("sample", help="generate text from a checkpoint (greedy, sample, beam, safebeam)")
    _add_gin_args(samp)
    _add_checkpoint_args(samp)
    samp.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    samp.add_argument("--prompt_file", help="one prompt a line (.jsonl: {\"prompt\": ...} objects); - for stdin")
    samp.add_argument("--chat", action="store_true", help="send each prompt as a user turn of a chat")
    from safejax.inference import params as sampling
    sampling.add_arguments(samp)
    samp.set_defaults(run=cmd_sample)

    serve = sub.add_parser("serve", help="OpenAI-compatible completions server over a checkpoint")
    _add_gin_args(serve)
    _add_checkpoint_args(serve)
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, ServerConfig.host)")
    serve.add_argument("--port", type=int, help="port (default 8000, ServerConfig.port; 0 picks a free one)")
    serve.add_argument("--model_name", help="the model id clients see (default: the checkpoint directory's name)")
    serve.set_defaults(run=cmd_serve)

    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face LlamaForCausalLM folder "
                                           "(config, safetensors, tokenizer, chat template)")
    _add_gin_args(export)
    export.add_argument("--checkpoint", required=True, help="a `safejax train` workdir")
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument("--output", required=True, help="the folder to write (new or empty)")
    export.epilog += " Shards above --gin.export.max_shard_bytes (default 5 GiB)."
    export.set_defaults(run=cmd_export)

    imp = sub.add_parser("import", help="make a safejax workdir from a local Hugging Face Llama-architecture "
                                        "folder (config.json, safetensors, tokenizer)")
    imp.add_argument("--hf", required=True, help="the folder: config.json, model.safetensors (or shards + index), "
                                                 "tokenizer.json + tokenizer_config.json or tokenizer.model")
    imp.add_argument("--workdir", required=True, help="the workdir to write (new or empty)")
    imp.add_argument("--add_harm_tag", action="store_true", help="add the harm tag and role markers the tokenizer "
                                                                 "lacks as new ids (new rows: the mean of the old)")
    imp.add_argument("--harm_tag", metavar="TOKEN", help="the tokenizer's own special token to use as the harm tag")
    imp.add_argument("--role_markers", nargs=3, metavar=("USER", "ASSISTANT", "END_OF_TURN"),
                     help="the tokenizer's own special tokens to use as the dialogue role markers")
    imp.set_defaults(run=cmd_import)

    from safejax.evals import cli as eval_cli  # safejax eval (its parser lives with the evals)
    eval_cli.add_parser(sub)
    from safejax.demo import cli as demo_cli  # safejax demo (the whole method end to end)
    demo_cli.add_parser(sub)

    bench = sub.add_parser("bench", help="run a benchmark and print its figures as JSON lines")
    from safejax.bench.registry import BENCHMARKS

    bench.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME",
                       help="; ".join(f"{name}: {what}" for name, (_, what) in BENCHMARKS.items())
                            + " (`safejax bench NAME --help` for its options)")
    bench.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(run=cmd_bench)
    return parser


def _raise_terminated(signum, frame):
    raise errors.Terminated()


# Commands for which SIGTERM is a preemption: stopping before any work is as clean as after it.
PREEMPTIBLE = ("train", "finetune", "classifier-train")


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a SIGTERM before the command's own handler takes over stops it cleanly."""
    import signal

    argv = sys.argv[1:] if argv is None else argv
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:  # installed inside the try: a SIGTERM the moment it is in place is still caught
        if in_main_thread:  # commands may install their own later
            signal.signal(signal.SIGTERM, _raise_terminated)
        return _main(argv)
    except errors.Terminated:
        command = next((a for a in argv if not a.startswith("-")), "")
        kept = "the checkpoints written are kept" if command in PREEMPTIBLE else "what it finished is kept"
        print(f"safejax: stopped by SIGTERM ({kept}); rerun the same command to go on", file=sys.stderr)
        return 0 if command in PREEMPTIBLE else 143
    finally:  # a SIGTERM during the interpreter's teardown, after the work is done, is no traceback
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    from safejax import config  # (`import safejax` has quietened the native libraries' logs)

    parser = build_parser()
    try:
        bindings, rest = config.split_gin_args(argv)
    except errors.UserError as e:
        parser.exit(2, f"safejax: error: {e}\n")
    passthrough = []
    if "--" in rest:  # what follows `--` is for another program (Beam's pipeline options)
        rest, passthrough = rest[: rest.index("--")], rest[rest.index("--") + 1:]
    args = parser.parse_args(rest)
    args.passthrough = passthrough
    if bindings and not getattr(args, "takes_gin", False):
        parser.exit(2, f"safejax: error: `safejax {args.command}` takes no --gin bindings "
                       f"(got --gin.{bindings[0].split(' = ')[0]})\n")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    if not args.verbose:  # the libraries on absl logging (orbax, seqio) report what we report in one line
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return args.run(args, bindings)
    except errors.UserError as e:
        print(f"safejax: error: {' '.join(str(e).split(chr(10))[0].split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safejax: interrupted", file=sys.stderr)
        return 130


# Subcommands whose compiled steps allocate temporaries large enough for huge pages to pay
# (safejax/host_memory.py; measured in benchmarks/PEERS.md). The input pipeline alone ran a few
# percent slower with them, so the data jobs keep the default pages; the demo, mostly training,
# takes them (its LM's steps: 0.553 against 0.607 s).
HUGE_PAGE_COMMANDS = (("train",), ("finetune",), ("bench", "train"), ("demo",), ("score",), ("bench", "score"))


def is_huge_page_command(argv: list[str]) -> bool:
    words = [a for a in argv if not a.startswith("-")]
    return any(tuple(words[: len(c)]) == c for c in HUGE_PAGE_COMMANDS)


def run() -> None:
    """The console script: restarts with huge pages first where that pays, then runs `main`."""
    if is_huge_page_command(sys.argv[1:]):
        from safejax import host_memory

        host_memory.restart_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    run()
