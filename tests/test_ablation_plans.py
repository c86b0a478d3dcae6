"""The paper's ablations at scale resolve under `safejax train --dry-run`: every ablation x scale x
topology parses, registers its mixture over small fixture data, and gets a mesh and batch split that
the named topology's devices fill; the plan needs no device of that topology."""

import itertools
import math
import os
import re
import subprocess
import sys

import pytest

import safety_fixtures as fx
from conftest import REPO
from safejax import cli, config, errors
from safejax.data import tasks
from safejax.train import plan

ABLATIONS = sorted(name.removeprefix("ablation_") for name in tasks.ABLATIONS)
TOPOLOGIES = {"tpu_v5p_128": (16, 64), "tpu_v6e_256": (64, 256), "gpu_8": (1, 8)}  # hosts, devices
SCALES = {"1_7b": (1.75e9, 1.85e9, 600e9), "360m": (340e6, 380e6, 60e9)}  # parameters, tokens


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fx.make(str(tmp_path_factory.mktemp("ablation_data")), documents=60)


def resolve(files, data, *extra):
    config.parse(files, fx.bindings(data) + list(extra))
    return plan.build("gs://bucket/run")


def stack(scale, topology, ablation):
    return [f"scale/{scale}.gin", f"topology/{topology}.gin", f"ablations/{ablation}.gin"]


@pytest.mark.parametrize("scale,topology,ablation", itertools.product(SCALES, TOPOLOGIES, ABLATIONS))
def test_every_ablation_resolves_at_every_scale_and_topology(scale, topology, ablation, data):
    p = resolve(stack(scale, topology, ablation), data)
    hosts, devices = TOPOLOGIES[topology]
    assert (p["topology"]["hosts"], p["topology"]["devices"]) == (hosts, devices)
    assert math.prod(p["mesh"]["shape"]) == devices
    batch = p["batch"]
    assert batch["per_device_per_microbatch"] * batch["microbatches"] * devices == batch["sequences"] == 1024
    assert batch["per_host"] * hosts == 1024 and batch["tokens_per_step"] == 1024 * 2048
    assert p["data"]["task"] == f"ablation_{ablation}"
    assert [m["task"] for m in p["data"]["members"]] == sorted(tasks.ABLATIONS[f"ablation_{ablation}"])
    assert all(m["files"] >= 1 for m in p["data"]["members"])
    low, high, tokens = SCALES[scale]
    assert low < p["model"]["parameters"] < high
    assert p["tokens"] == pytest.approx(tokens, rel=1e-3)


def test_1_7b_has_the_papers_training_setup(data):
    import gin

    p = resolve(stack("1_7b", "tpu_v5p_128", "full"), data)
    assert (p["batch"]["seq_len"], p["batch"]["sequences"], p["model"]["dtype"]) == (2048, 1024, "bfloat16")
    assert p["schedule"]["peak"] == 5e-4 and gin.query_parameter("adamw.weight_decay") == 0.01
    assert gin.query_parameter("TrainConfig.seed") == 42
    assert p["checkpoints"]["every"] == 1000 and p["checkpoints"]["saves"] == 286
    # 2.4e16 FLOP a step on 64 chips of 459 TFLOP/s at 40%: about 2 s a step, about a week.
    assert 1.5 < p["compute"]["step_seconds"] < 2.5 and 5 < p["compute"]["days"] < 8


def test_scored_kinds_say_which_score_shards_they_join(data):
    p = resolve(stack("360m", "gpu_8", "tags"), data)
    joined = {m["task"] for m in p["data"]["members"] if "joined_with_scores" in m}
    assert joined == {"score_0", "score_1_3_tagged", "score_4_5_tagged"}
    assert all(m["joined_with_scores"]["files"] == 2 for m in p["data"]["members"] if m["task"] in joined)


@pytest.mark.parametrize("extra,message", [
    (["MESH_SHAPE = (1, 16, 1)"], r"8x NVIDIA H100 \(8 devices\): MESH_SHAPE \(1, 16, 1\) needs 16 devices"),
    (["MESH_SHAPE = (3, -1, 1)"], r"does not divide the 8 devices"),
    (["BATCH_SIZE = 1000"], r"global batch 1000 is not divisible by the 8 data shards x 16 microbatches"),
    (["Topology.hosts = 0"], r"needs positive integers hosts"),
    (["SCORES = None"], r"data 'ablation_tags' is not available: needs task score_0"),
])
def test_a_plan_that_cannot_run_is_a_one_line_error(data, extra, message):
    with pytest.raises(errors.UserError, match=message):
        resolve(stack("360m", "gpu_8", "tags"), data, *extra)


def test_an_ablation_given_before_the_model_is_refused(data):
    with pytest.raises(errors.UserError, match="give the ablation file after the model and topology"):
        resolve(["ablations/full.gin", "scale/360m.gin", "topology/gpu_8.gin"], data)


def test_a_real_run_checks_its_topology_against_the_devices(data):
    resolve(stack("360m", "gpu_8", "raw"), data)
    plan.check_runtime()  # the tests' 8 simulated devices in one process are an 8-GPU node's shape
    resolve(stack("360m", "tpu_v5p_128", "raw"), data)
    with pytest.raises(errors.UserError, match=r"written for TPU v5p-128 \(16 hosts x 4 devices\) but this job "
                                                 r"has 1 processes and 8 devices"):
        plan.check_runtime()


def test_train_dry_run_prints_the_plan_and_writes_nothing(data, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["train", "--dry-run", *(f"--gin_file={f}" for f in stack("1_7b", "tpu_v6e_256", "moral")),
            *("--gin." + b.replace(" = ", "=", 1) for b in fx.bindings(data)), f"--workdir={workdir}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "topology    TPU v6e-256: 64 hosts x 4 devices = 256" in out
    assert "mesh        data 4 x fsdp 64 x tensor 1 (MESH_SHAPE (4, 64, 1))" in out
    assert "2,097,152 tokens a step; 16 sequences a host, 4 a device in one pass" in out
    assert "286,000 steps = 599.8B tokens" in out
    assert f"every 1,000 steps (286 saves, the last 3 kept) in {workdir}/checkpoints" in out
    for kind in ("score_0", "rephrased", "refuseweb", "moral_education"):
        assert re.search(rf"^  {kind} +[0-9.]+ +[0-9.]+%  1 file in {re.escape(os.path.dirname(data['corpus']))}",
                         out, re.M), kind
    assert not workdir.exists()


def test_dry_run_for_a_named_topology_starts_no_jax_backend(data):
    """In a fresh process: the plan for 256 TPU chips is arithmetic; no backend (not even the CPU's) starts."""
    args = ["train", "--dry-run", *(f"--gin_file={f}" for f in stack("360m", "tpu_v6e_256", "full")),
            *("--gin." + b.replace(" = ", "=", 1) for b in fx.bindings(data)), "--workdir=/runs/x"]
    script = ("import sys; from safejax import cli; rc = cli.main(sys.argv[1:]); "
              "from jax._src import xla_bridge; print('backends', sorted(xla_bridge._backends)); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "topology    TPU v6e-256: 64 hosts x 4 devices = 256" in proc.stdout
    assert proc.stdout.rstrip().endswith("backends []")
