"""Mesh construction and the logical-axis rules table."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from safejax import errors, parallel

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"),
         ("kv_heads", "tensor"), ("mlp", "tensor"), ("length", None), ("head_dim", None))


def test_minus_one_fills_the_remaining_devices():
    assert parallel.resolve_mesh_shape((2, -1, 2), 8, parallel.MESH_AXES) == [2, 2, 2]
    assert parallel.resolve_mesh_shape((1, -1, 1), 8, parallel.MESH_AXES) == [1, 8, 1]


@pytest.mark.parametrize("shape,match", [((3, 1, 1), "needs 3 devices"), ((3, -1, 1), "does not divide"),
                                         ((2, 2), "3 sizes"), ((-1, -1, 1), "at most one -1"),
                                         ((0, 8, 1), "positive")])
def test_bad_mesh_shapes_are_one_line_errors(shape, match):
    with pytest.raises(errors.UserError, match=match):
        parallel.resolve_mesh_shape(shape, 8, parallel.MESH_AXES)


def test_parameters_shard_fsdp_and_tensor_while_activations_keep_embed_whole():
    mesh = parallel.build_mesh((2, 2, 2))
    assert parallel.logical_to_spec(("embed", "mlp"), RULES, mesh, (64, 128)) == P("fsdp", "tensor")
    assert parallel.logical_to_spec(("vocab", "embed"), RULES, mesh, (256, 64)) == P("tensor", "fsdp")
    assert parallel.logical_to_spec(("batch", "length", "embed"), RULES, mesh, (8, 16, 64)) == P(("data", "fsdp"), None, None)
    assert parallel.logical_to_spec(("batch", "length", "vocab"), RULES, mesh, (8, 16, 256)) == P(("data", "fsdp"), None, "tensor")


def test_undivisible_dimension_stays_replicated():
    mesh = parallel.build_mesh((1, 2, 4))
    # 2 K/V heads cannot be split 4 ways over tensor: replicate rather than fail.
    assert parallel.logical_to_spec(("embed", "kv_heads", "head_dim"), RULES, mesh, (64, 2, 16)) == P("fsdp", None, None)


def test_data_parallel_size_is_the_batch_axes():
    assert parallel.data_parallel_size(parallel.build_mesh((2, 2, 2)), RULES) == 4
    assert parallel.data_parallel_size(parallel.build_mesh((1, 1, 8)), RULES) == 1


def test_host_batch_becomes_a_global_array_sharded_over_batch():
    import numpy as np

    mesh = parallel.build_mesh((2, 2, 2))
    local = {"tokens": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    out = parallel.host_batch_to_global(local, mesh, RULES, 8)["tokens"]
    assert out.shape == (8, 4)
    assert out.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(out), local["tokens"])
    assert len(jax.devices()) == 8
