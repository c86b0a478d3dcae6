"""`safejax train --dry-run`: the plan of a run, worked out from its gin config alone.

It names the hosts and devices (of the topology a configs/topology/*.gin file names, else of this
machine), the mesh, how the batch splits, the length in steps and tokens, the checkpoint cadence
and the data each member of the mixture reads (the mixture is registered, so its files must
exist). Nothing is compiled or written, and no device of the named topology is needed: the mesh
shape is checked against its device count by arithmetic, on an abstract mesh, with the rules the
Trainer applies. A real run checks the same topology against the devices it finds.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import os

import gin
import seqio
from jax.sharding import AbstractMesh

from safejax import errors, hardware, parallel
from safejax.data import pipeline, sources, tasks
from safejax.models.decoder import DecoderConfig, count_params, flops_per_token
from safejax.train import optim
from safejax.train.trainer import TrainConfig

SCORED_KINDS = ("raw_tagged", *tasks.SCORE_RANGES, *(f"{k}_tagged" for k in tasks.SCORE_RANGES))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Topology:
    """The machines a config is written for (configs/topology/*.gin); unnamed: this machine."""

    name: str = ""
    hosts: int = 0  # JAX processes: TPU VMs, GPU nodes
    devices_per_host: int = 0
    device_kind: str = ""  # as JAX names it, for the published peak (safejax/hardware.py)
    assumed_mfu: float = 0.4  # only for the plan's estimate of the run's time

    def __post_init__(self):
        if self.name and not (isinstance(self.hosts, int) and isinstance(self.devices_per_host, int)
                              and self.hosts > 0 and self.devices_per_host > 0):
            raise errors.UserError(f"Topology {self.name!r} needs positive integers hosts and "
                                   f"devices_per_host, got {self.hosts!r} and {self.devices_per_host!r}")

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host


def named_topology() -> Topology | None:
    topology = Topology()
    return topology if topology.name else None


def this_machine() -> Topology:
    import jax

    return Topology("this machine", jax.process_count(), jax.local_device_count(), jax.devices()[0].device_kind)


def check_runtime() -> None:
    """A run on other hardware than its topology file names is refused (a -1 in MESH_SHAPE would
    otherwise fit any slice silently, with another batch split than planned)."""
    import jax

    topology = named_topology()
    if topology and (jax.process_count(), jax.device_count()) != (topology.hosts, topology.devices):
        raise errors.UserError(f"the config is written for {topology.name} ({topology.hosts} hosts x "
                               f"{topology.devices_per_host} devices) but this job has {jax.process_count()} "
                               f"processes and {jax.device_count()} devices: use the matching configs/topology file")


def check_composition() -> None:
    """An ablation file (data/safety.gin) given before a model file gets its data replaced by the
    model's plain corpus (lm/base.gin sets DataConfig.task): refused, rather than a run that
    trains for weeks on the wrong data."""
    try:
        mixture = gin.query_parameter("%MIXTURE")
    except ValueError:
        return
    task = gin.query_parameter("DataConfig.task")
    if getattr(getattr(task, "configurable", None), "name", None) != "safety_mixture":
        raise errors.UserError(f"the ablation's data (MIXTURE = {mixture!r}) is replaced by a later gin file's "
                               f"DataConfig.task = {task}: give the ablation file after the model and topology files")


def _bound(fn) -> dict:
    """A configurable's arguments as gin would call it: its defaults, then the bindings."""
    defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **gin.get_bindings(fn)}


def _folders(files) -> list[tuple[str, int]]:
    return sorted(collections.Counter(os.path.dirname(f) or "." for f in files).items())


def describe_data(name: str) -> list[dict]:
    """Each member task of a mixture (or the one task): its rate, share, and the files it reads."""
    found = seqio.get_mixture_or_task(name)
    members = ([(t, found.get_rate(t)) for t in found.tasks] if isinstance(found, seqio.Mixture)
               else [(found, 1.0)])
    total = sum(rate for _, rate in members)
    data = gin.get_bindings(tasks.safety_data)
    prefix = data.get("prefix", "")
    shards = [] if data.get("split_dir") or not data.get("scores") else sources.expand_files(data["scores"])
    out = []
    for task, rate in members:
        files = task.source.list_shards("train")
        entry = {"task": task.name, "rate": rate, "share": rate / total, "files": len(files),
                 "folders": _folders(files)}
        if shards and task.name.removeprefix(prefix) in SCORED_KINDS:
            entry["joined_with_scores"] = {"files": len(shards), "folders": _folders(shards)}
        out.append(entry)
    return out


def build(workdir: str) -> dict:
    """The plan of `safejax train` in `workdir` under the bound gin config; errors as UserError."""
    check_composition()
    train, data, model = TrainConfig(), pipeline.DataConfig(), DecoderConfig()  # registers the data
    topology = named_topology() or this_machine()
    shape_spec = tuple(_bound(parallel.build_mesh)["shape"])
    try:
        shape = parallel.resolve_mesh_shape(shape_spec, topology.devices, parallel.MESH_AXES)
        mesh = AbstractMesh(tuple(shape), parallel.MESH_AXES)
        per_device = parallel.per_shard_batch(data.global_batch_size, train.microbatches, mesh,
                                              parallel.logical_rules())
    except errors.UserError as e:
        raise errors.UserError(f"{topology.name} ({topology.devices} devices): {e}") from None
    if data.global_batch_size % topology.hosts:
        raise errors.UserError(f"global batch {data.global_batch_size} is not divisible by the "
                               f"{topology.hosts} hosts of {topology.name}")
    tokens_per_step = data.global_batch_size * data.seq_len
    step_flops = flops_per_token(model, data.seq_len) * tokens_per_step
    peak = hardware.peak_for_kind(topology.device_kind)
    step_s = step_flops / (peak * topology.devices * topology.assumed_mfu) if peak else None
    vocabulary = pipeline.vocabulary(data)
    schedule = _bound(optim.learning_rate_schedule)
    return {
        "workdir": workdir,
        "topology": {"name": topology.name, "hosts": topology.hosts, "devices_per_host": topology.devices_per_host,
                     "devices": topology.devices, "device_kind": topology.device_kind},
        "mesh": {"axes": list(parallel.MESH_AXES), "shape": shape, "configured": list(shape_spec)},
        "model": {"parameters": count_params(model)["total"], "layers": model.num_layers, "d_model": model.d_model,
                  "heads": model.num_heads, "kv_heads": model.kv_heads, "mlp": model.mlp_dim,
                  "vocab_rows": model.vocab_size, "dtype": model.dtype, "remat": model.remat},
        "batch": {"sequences": data.global_batch_size, "seq_len": data.seq_len, "tokens_per_step": tokens_per_step,
                  "per_host": data.global_batch_size // topology.hosts, "microbatches": train.microbatches,
                  "per_device_per_microbatch": per_device},
        "steps": train.steps, "tokens": train.steps * tokens_per_step,
        "schedule": {k: schedule[k] for k in ("kind", "peak", "warmup_steps", "final_fraction")},
        "checkpoints": {"every": train.checkpoint_every, "saves": math.ceil(train.steps / train.checkpoint_every),
                        "keep": train.keep_checkpoints, "path": os.path.join(workdir, "checkpoints")},
        "eval": {"every": train.eval_every, "batches": data.eval_batches},
        "compute": {"flops_per_step": step_flops, "peak_per_device": peak, "assumed_mfu": topology.assumed_mfu,
                    "step_seconds": step_s, "days": step_s * train.steps / 86400 if step_s else None},
        "vocabulary": {"file": vocabulary.sentencepiece_model_file, "pieces": vocabulary.vocab_size},
        "data": {"task": data.task, "members": describe_data(data.task)},
    }


def _count(n: float) -> str:
    """1.812B, 25.31M, 599.8B: four significant digits at the scale a reader compares."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n:g}"


def _reads(folders: list[tuple[str, int]]) -> str:
    shown = ", ".join(f"{n} file{'s' if n > 1 else ''} in {d}" for d, n in folders[:3])
    return shown + (f" and {len(folders) - 3} more folders" if len(folders) > 3 else "")


def format_plan(plan: dict) -> str:
    """The plan as the lines `safejax train --dry-run` prints."""
    t, m, b, c, s = plan["topology"], plan["model"], plan["batch"], plan["checkpoints"], plan["schedule"]
    mesh = " x ".join(f"{a} {n}" for a, n in zip(plan["mesh"]["axes"], plan["mesh"]["shape"]))
    evaluation = (f"every {plan['eval']['every']:,} steps" if plan["eval"]["every"] else "at the end") + \
        f" on {plan['eval']['batches']} batches"
    compute = plan["compute"]
    lines = [
        f"plan for {plan['workdir']} (--dry-run: nothing started or written)",
        f"topology    {t['name']}: {t['hosts']} hosts x {t['devices_per_host']} devices = {t['devices']} "
        f"({t['device_kind']})",
        f"mesh        {mesh} (MESH_SHAPE {tuple(plan['mesh']['configured'])})",
        f"model       {_count(m['parameters'])} parameters: {m['layers']} layers, d_model {m['d_model']}, "
        f"{m['heads']} heads ({m['kv_heads']} K/V), mlp {m['mlp']}, {m['vocab_rows']} vocabulary rows, "
        f"{m['dtype']}, remat {m['remat']}",
        f"batch       {b['sequences']} sequences x {b['seq_len']} tokens = {b['tokens_per_step']:,} tokens a step; "
        f"{b['per_host']} sequences a host, {b['per_device_per_microbatch']} a device "
        + ("in one pass" if b["microbatches"] == 1 else f"in each of {b['microbatches']} microbatches"),
        f"length      {plan['steps']:,} steps = {_count(plan['tokens'])} tokens; lr {s['kind']}, peak {s['peak']:g}, "
        f"warmup {s['warmup_steps']:,} steps, floor {s['final_fraction']:g} of the peak",
        f"checkpoints every {c['every']:,} steps ({c['saves']:,} saves, the last {c['keep']} kept) in {c['path']}; "
        f"held-out loss {evaluation}",
    ]
    if compute["step_seconds"]:
        lines.append(f"compute     {compute['flops_per_step']:.2e} FLOP a step; at {compute['assumed_mfu']:.0%} of "
                     f"{compute['peak_per_device'] / 1e12:.0f} TFLOP/s a device: {compute['step_seconds']:.2f} s a "
                     f"step, {compute['days']:.1f} days")
    vocab = plan["vocabulary"]
    lines.append(f"vocabulary  {vocab['file']}: {vocab['pieces']} pieces"
                 + (f" (the model has {m['vocab_rows']} rows)" if vocab["pieces"] != m["vocab_rows"] else ""))
    members = plan["data"]["members"]
    lines.append(f"data        {plan['data']['task']}: {len(members)} member(s), rate (share) and the files each reads")
    width = max(len(e["task"]) for e in members)
    for e in members:
        line = f"  {e['task']:<{width}}  {e['rate']:<6g} {e['share']:>6.1%}  {_reads(e['folders'])}"
        if "joined_with_scores" in e:
            line += f", joined with the score shards: {_reads(e['joined_with_scores']['folders'])}"
        lines.append(line)
    return "\n".join(lines)
