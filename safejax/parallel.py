"""Meshes, logical-axis rules and global arrays: the only module that knows about devices.

Models name the axes of every parameter and activation (batch, length, embed, mlp, heads, kv_heads,
head_dim, vocab); one rules table (gin macro LOGICAL_RULES) maps those names to mesh axes (data,
fsdp, tensor). Resolution follows T5X: rules are tried in order and a mesh axis is used at most
once per array, so `embed -> fsdp` shards parameters FSDP-style while activations, whose batch
already took fsdp, keep embed replicated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from safejax import errors

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_active: list[tuple[Mesh, Rules]] = []  # the mesh and rules that `constrain` uses while tracing


@gin.configurable
def build_mesh(shape: Sequence[int] = (1, -1, 1), axes: Sequence[str] = MESH_AXES,
               devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (global) devices; one size may be -1 to take the remaining devices."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(shape, len(devices), axes)
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                         devices=devices)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int, axes: Sequence[str]) -> list[int]:
    if len(shape) != len(axes):
        raise errors.UserError(f"MESH_SHAPE {tuple(shape)} must have {len(axes)} sizes, one for "
                               f"each of the axes {tuple(axes)}")
    shape = list(shape)
    fills = [i for i, s in enumerate(shape) if s == -1]
    if len(fills) > 1 or any(s == 0 or s < -1 for s in shape):
        raise errors.UserError(f"MESH_SHAPE {tuple(shape)}: sizes must be positive, with at most one -1")
    fixed = math.prod(s for s in shape if s != -1)
    if fills:
        if num_devices % fixed:
            raise errors.UserError(f"MESH_SHAPE {tuple(shape)} does not divide the {num_devices} devices")
        shape[fills[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise errors.UserError(f"MESH_SHAPE {tuple(shape)} needs {math.prod(shape)} devices but "
                               f"{num_devices} are available")
    return shape


@gin.configurable
def logical_rules(rules: Rules = gin.REQUIRED) -> Rules:
    """The logical-to-mesh rules table, bound in gin (configs/mesh/rules.gin)."""
    return tuple((name, tuple(m) if isinstance(m, list) else m) for name, m in rules)


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes.

    A dimension that the mesh axes do not divide evenly stays replicated rather than failing
    (e.g. 2 KV heads on a tensor axis of 4).
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        chosen = None
        for rule_name, mesh_axes in rules:
            if rule_name != name:
                continue
            if mesh_axes is None:
                break
            mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            mesh_axes = tuple(a for a in mesh_axes if a not in used)
            if not mesh_axes:
                continue
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape is not None and shape[i] % size:
                continue
            chosen = mesh_axes
            break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def sharding_for(axes, rules: Rules, mesh: Mesh, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


@contextlib.contextmanager
def using(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `constrain` active (while tracing under this context) for `mesh` and `rules`."""
    _active.append((mesh, rules))
    try:
        yield
    finally:
        _active.pop()


def active() -> tuple[Mesh, Rules] | None:
    """The mesh and rules of the innermost `using`, or None outside one (a kernel that must
    be mapped over devices, such as splash attention, reads them while tracing)."""
    return _active[-1] if _active else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Annotates an activation with its logical axes; a no-op outside `using`."""
    if not _active:
        return x
    mesh, rules = _active[-1]
    return jax.lax.with_sharding_constraint(x, sharding_for(axes, rules, mesh, x.shape))


def tree_shardings(logical_axes_tree, shapes_tree, rules: Rules, mesh: Mesh):
    """NamedShardings for a pytree of arrays, given a matching pytree of logical-axes tuples."""
    return jax.tree.map(lambda axes, s: sharding_for(axes, rules, mesh, s.shape),
                        logical_axes_tree, shapes_tree,
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array every device holds whole (scalars, a scorer's params)."""
    return NamedSharding(mesh, PartitionSpec())


def module_shardings(abstract_state, rules: Rules, mesh: Mesh) -> tuple[dict, dict]:
    """(shapes, shardings) as pure dicts for a module's abstract state (`nnx.split` of
    `nnx.eval_shape`): each variable placed by the logical axes it declares."""
    from flax import nnx

    axes = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["logical_axes"], abstract_state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))
    shapes = abstract_state.to_pure_dict()
    return shapes, tree_shardings(axes, shapes, rules, mesh)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch is split: the product of the mesh axes that `batch` maps to."""
    spec = logical_to_spec(("batch",), rules, mesh)[0]
    if spec is None:
        return 1
    names = (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in names)


def per_shard_batch(global_batch_size: int, microbatches: int, mesh, rules: Rules) -> int:
    """Sequences each data shard holds in one microbatch; an error naming the mesh if the global
    batch does not split evenly. `mesh` may be abstract (jax.sharding.AbstractMesh: a plan)."""
    dp = data_parallel_size(mesh, rules)
    per_micro, rem = divmod(global_batch_size, microbatches)
    if rem or per_micro % dp:
        raise errors.UserError(f"global batch {global_batch_size} is not divisible by the {dp} data shards "
                               f"x {microbatches} microbatches of the mesh {dict(mesh.shape)}")
    return per_micro // dp


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules,
                         global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded over `batch`."""
    out = {}
    for name, local in batch.items():
        global_shape = (global_batch_size, *local.shape[1:])
        axes = ("batch",) + ("length",) * (local.ndim - 1)
        sharding = sharding_for(axes, rules, mesh, global_shape)
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def initialize_distributed() -> None:
    """Starts JAX multi-controller when this process is one of several.

    Explicit: SAFEJAX_COORDINATOR (host:port), SAFEJAX_NUM_PROCESSES, SAFEJAX_PROCESS_ID (used by
    launch/local.sh and the tests). Otherwise, on Cloud TPU pods and SLURM clusters, JAX finds the
    coordinator itself. A single plain process does nothing.
    """
    coordinator = os.environ.get("SAFEJAX_COORDINATOR")
    if coordinator:
        try:
            num, pid = int(os.environ["SAFEJAX_NUM_PROCESSES"]), int(os.environ["SAFEJAX_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise errors.UserError("SAFEJAX_COORDINATOR is set, so SAFEJAX_NUM_PROCESSES and "
                                   "SAFEJAX_PROCESS_ID must be integers too") from e
        jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
    elif any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
        jax.distributed.initialize()
    else:
        return
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
