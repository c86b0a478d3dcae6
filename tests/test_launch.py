"""Tests for the launch scripts in launch/.

The scripts are run with bash in a subprocess. `gcloud` and `safejax` are
replaced by small fake scripts placed first on PATH: the fake gcloud runs its
--command with `bash -c` (standing in for the shell on a TPU worker) and the
fake safejax records its arguments, working directory and environment. So
the tests need neither gcloud, GPUs nor JAX, and they check that arguments
survive every layer of shell quoting exactly.
"""

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"

# Arguments that break naive quoting. All printable, so shlex can parse them.
TRICKY_ARGS = [
    "--gin_file=configs/base.gin",
    "--gin.NAME='it''s here'",
    "--workdir=/tmp/my run",
    '--gin.MSG="a b" $HOME `echo no` ; echo injected && exit 1',
    "",
    "--gin.glob=*[ab]?",
]
# Also control characters, which only a real shell round trip can check.
NASTY_ARGS = TRICKY_ARGS + ["tab\there", "new\nline"]

ENV_VARS = [
    "CUDA_VISIBLE_DEVICES",
    "XLA_FLAGS",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "SAFEJAX_COORDINATOR",
    "SAFEJAX_NUM_PROCESSES",
    "SAFEJAX_PROCESS_ID",
    "JAX_PLATFORMS",
]

FAKE_SAFEJAX = r"""#!/usr/bin/env bash
# Record what we were called with, in files named after the process id.
out="$FAKE_OUT/safejax.${SAFEJAX_PROCESS_ID:-0}"
printf '%s\0' "$@" > "$out.args"
{
  echo "cwd=$PWD"
  echo "pid=$$"
  for v in VARS; do
    if [[ -n ${!v+set} ]]; then echo "$v=${!v}"; fi
  done
} > "$out.tmp"
mv "$out.tmp" "$out.env"
if [[ -n ${FAKE_FAIL_ID-} && $FAKE_FAIL_ID == "${SAFEJAX_PROCESS_ID-}" ]]; then
  # Fail only once process 0 is up, so the test can see it being stopped.
  while [[ ! -e $FAKE_OUT/safejax.0.env ]]; do sleep 0.05; done
  exit 3
fi
if [[ -n ${FAKE_SLEEP-} ]]; then exec sleep "$FAKE_SLEEP"; fi
""".replace("VARS", " ".join(ENV_VARS))

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Run --command the way the remote shell on a TPU worker would.
for a in "$@"; do
  case $a in --command=*) exec bash -c "${a#--command=}" ;; esac
done
echo "fake gcloud: no --command" >&2
exit 9
"""


@pytest.fixture
def env(tmp_path):
    """Environment with the fakes first on PATH and no inherited settings."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("safejax", FAKE_SAFEJAX), ("gcloud", FAKE_GCLOUD)]:
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    (tmp_path / "out").mkdir()
    (tmp_path / "home").mkdir()
    result = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    result.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        HOME=str(tmp_path / "home"),
        FAKE_OUT=str(tmp_path / "out"),
    )
    return result


def run(script, *args, env, timeout=30):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def dry_run(script, *args, env):
    proc = run(script, "--dry-run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout.splitlines()


def recorded(env, process_id=0):
    """(args, settings) the fake safejax recorded for one process."""
    out = Path(env["FAKE_OUT"])
    args = (out / f"safejax.{process_id}.args").read_bytes().decode()
    settings = dict(
        line.split("=", 1)
        for line in (out / f"safejax.{process_id}.env").read_text().splitlines()
    )
    return args.split("\0")[:-1], settings


def bash_c(command, env):
    proc = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=env, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


def assert_usage_error(proc):
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "error" in lines[0], proc.stderr


# --- tpu_pod.sh ---------------------------------------------------------------

TPU = ["--tpu", "my-tpu", "--zone", "us-central2-b"]


def remote_command(argv):
    commands = [a for a in argv if a.startswith("--command=")]
    assert len(commands) == 1
    return commands[0][len("--command=") :]


def test_tpu_dry_run_prints_gcloud_ssh_to_all_workers(env):
    lines = dry_run("tpu_pod.sh", *TPU, "--project", "proj", "--", *TRICKY_ARGS, env=env)
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--zone=us-central2-b" in argv
    assert "--project=proj" in argv
    assert "--worker=all" in argv
    remote = shlex.split(remote_command(argv))
    train = remote.index("train")
    assert remote[train - 4 : train + 1] == ["cd", "safejax", "&&", "safejax", "train"]
    assert remote[train + 1 :] == TRICKY_ARGS


def test_tpu_project_is_optional(env):
    (line,) = dry_run("tpu_pod.sh", *TPU, "--", "--workdir=/tmp/x", env=env)
    assert not any(a.startswith("--project") for a in shlex.split(line))


def test_tpu_printed_command_round_trips_through_two_shells(env, tmp_path):
    repo = tmp_path / "my repo's dir"
    repo.mkdir()
    (line,) = dry_run("tpu_pod.sh", *TPU, "--repo-dir", str(repo), "--", *NASTY_ARGS, env=env)
    bash_c(line, env)  # fake gcloud -> bash -c on the "worker" -> fake safejax
    args, settings = recorded(env)
    assert args == ["train", *NASTY_ARGS]
    assert settings["cwd"] == str(repo)


def test_tpu_without_dry_run_runs_gcloud(env, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    proc = run("tpu_pod.sh", *TPU, "--repo-dir", str(repo), "--", *NASTY_ARGS, env=env)
    assert proc.returncode == 0, proc.stderr
    args, settings = recorded(env)
    assert args == ["train", *NASTY_ARGS]
    assert settings["cwd"] == str(repo)


def test_tpu_setup_installs_the_tpu_extra_on_all_workers_first(env):
    lines = dry_run("tpu_pod.sh", *TPU, "--setup", "--", "--workdir=/tmp/x", env=env)
    assert len(lines) == 2
    setup, train = (shlex.split(line) for line in lines)
    assert "--worker=all" in setup and "--worker=all" in train
    assert shlex.split(remote_command(setup))[-6:] == ["python3", "-m", "pip", "install", "-e", ".[tpu]"]
    assert "cd safejax" in remote_command(setup)
    assert "safejax train --workdir=/tmp/x" in remote_command(train)


def test_tpu_train_dry_run_prints_the_plan_on_worker_0_only(env):
    (line,) = dry_run("tpu_pod.sh", *TPU, "--", "--workdir=/tmp/x", "--dry-run", env=env)
    argv = shlex.split(line)
    assert "--worker=0" in argv and "--worker=all" not in argv
    assert "safejax train --workdir=/tmp/x --dry-run" in remote_command(argv)


@pytest.mark.parametrize(
    "args",
    [
        ["--zone", "z", "--", "--workdir=/tmp/x"],  # no --tpu
        ["--tpu", "t", "--", "--workdir=/tmp/x"],  # no --zone
        ["--tpu", "t", "--zone", "z"],  # no train args
        ["--tpu", "t", "--zone", "z", "--"],  # empty train args
        ["--tpu", "t", "--zone", "z", "--workdir=/tmp/x"],  # missing --
        ["--tpu"],  # flag without its value
    ],
)
def test_tpu_usage_errors(env, args):
    assert_usage_error(run("tpu_pod.sh", "--dry-run", *args, env=env))


# --- gpu.sh -------------------------------------------------------------------

FLAG = "--xla_gpu_enable_latency_hiding_scheduler=true"


def test_gpu_dry_run_sets_cuda_visible_devices(env):
    lines = dry_run("gpu.sh", "--gpus", "0,1,3", "--", *TRICKY_ARGS, env=env)
    assert "export CUDA_VISIBLE_DEVICES=0,1,3" in lines
    assert shlex.split(lines[-1]) == ["safejax", "train", *TRICKY_ARGS]


def test_gpu_dry_run_defaults(env):
    lines = dry_run("gpu.sh", "--", "--workdir=/tmp/x", env=env)
    assert not any("CUDA_VISIBLE_DEVICES" in line for line in lines)
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in lines
    assert f"export XLA_FLAGS={FLAG}" in lines
    assert lines[-1] == "safejax train --workdir=/tmp/x"


def test_gpu_dry_run_output_is_a_script_that_reproduces_the_run(env):
    env.update(XLA_FLAGS="--xla_dump_to=/tmp/d", XLA_PYTHON_CLIENT_MEM_FRACTION="0.5")
    lines = dry_run("gpu.sh", "--gpus", "2", "--", *NASTY_ARGS, env=env)
    clean = {k: v for k, v in env.items() if not k.startswith("XLA_")}
    bash_c("\n".join(lines), clean)
    args, settings = recorded(env)
    assert args == ["train", *NASTY_ARGS]
    assert settings["CUDA_VISIBLE_DEVICES"] == "2"
    assert settings["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"  # caller's value kept
    assert settings["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {FLAG}"


def test_gpu_setup_installs_this_checkout_with_the_cuda_extra_first(env):
    lines = dry_run("gpu.sh", "--setup", "--", "--workdir=/tmp/x", "--dry-run", env=env)
    assert shlex.split(lines[0]) == ["python3", "-m", "pip", "install", "-e", f"{LAUNCH.parent}[cuda]"]
    assert lines[-1] == "safejax train --workdir=/tmp/x --dry-run"


def test_gpu_keeps_an_explicit_scheduler_choice(env):
    env["XLA_FLAGS"] = "--xla_gpu_enable_latency_hiding_scheduler=false"
    lines = dry_run("gpu.sh", "--", "x", env=env)
    assert "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false" in lines


def test_gpu_without_dry_run_execs_safejax(env):
    proc = run("gpu.sh", "--gpus", "0,1", "--", *NASTY_ARGS, env=env)
    assert proc.returncode == 0, proc.stderr
    args, settings = recorded(env)
    assert args == ["train", *NASTY_ARGS]
    assert settings["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert settings["XLA_FLAGS"] == FLAG


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--"],
        ["--gpus"],
        ["--gpus", "0 1", "--", "x"],
        ["--bogus", "--", "x"],
    ],
)
def test_gpu_usage_errors(env, args):
    assert_usage_error(run("gpu.sh", "--dry-run", *args, env=env))


# --- local.sh -----------------------------------------------------------------


def test_local_dry_run_prints_one_command_per_process(env):
    lines = dry_run("local.sh", "--processes", "3", "--port", "23456", "--", *TRICKY_ARGS, env=env)
    assert len(lines) == 3
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[:4] == [
            "SAFEJAX_COORDINATOR=127.0.0.1:23456",
            "SAFEJAX_NUM_PROCESSES=3",
            f"SAFEJAX_PROCESS_ID={i}",
            "JAX_PLATFORMS=cpu",
        ]
        assert argv[4:] == ["safejax", "train", *TRICKY_ARGS]


def test_local_printed_commands_round_trip_through_bash(env):
    lines = dry_run("local.sh", "--processes", "2", "--", *NASTY_ARGS, env=env)
    for i, line in enumerate(lines):
        bash_c(line, env)
        args, settings = recorded(env, i)
        assert args == ["train", *NASTY_ARGS]
        assert settings["SAFEJAX_PROCESS_ID"] == str(i)
        assert settings["SAFEJAX_NUM_PROCESSES"] == "2"
        assert settings["JAX_PLATFORMS"] == "cpu"


def test_local_runs_all_processes(env):
    proc = run("local.sh", "--processes", "3", "--", *NASTY_ARGS, env=env)
    assert proc.returncode == 0, proc.stderr
    for i in range(3):
        args, settings = recorded(env, i)
        assert args == ["train", *NASTY_ARGS]
        assert settings["SAFEJAX_PROCESS_ID"] == str(i)
        assert settings["SAFEJAX_COORDINATOR"].startswith("127.0.0.1:")


def test_local_failure_stops_the_other_processes(env):
    env.update(FAKE_FAIL_ID="1", FAKE_SLEEP="30")
    start = time.monotonic()
    proc = run("local.sh", "--processes", "2", "--", "x", env=env, timeout=25)
    assert proc.returncode == 3
    assert "process 1" in proc.stderr
    assert time.monotonic() - start < 20
    _, settings = recorded(env, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(int(settings["pid"]), 0)


@pytest.mark.parametrize(
    "args",
    [
        ["--", "x"],  # no --processes
        ["--processes", "0", "--", "x"],
        ["--processes", "two", "--", "x"],
        ["--processes", "2", "--port", "70000", "--", "x"],
        ["--processes", "2"],
        ["--processes"],
    ],
)
def test_local_usage_errors(env, args):
    assert_usage_error(run("local.sh", "--dry-run", *args, env=env))


# --- beam_dataflow.sh ---------------------------------------------------------

DATAFLOW = ["--project", "p", "--region", "us-central1", "--bucket", "gs://b/", "--package", "dist/s.whl"]


@pytest.mark.parametrize("job", [
    ["data", "cache", "ablation_full", "--cache_dir", "gs://b/cache", "--gin.SCORES=['gs://b/s/*']"],
    ["score", "--beam", "--checkpoint", "gs://b/m", "--input", "gs://b/c/*", "--output", "gs://b/s"],
    ["synth", "rephrase", "--beam", "--input", "gs://b/split", "--output", "/mnt/shared/synth"],
])
def test_dataflow_dry_run_prints_the_job_with_dataflow_options(env, job):
    proc = run("beam_dataflow.sh", *DATAFLOW, "--workers", "4", "--job", "j1", "--dry-run", "--",
               *job, env=env)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert words[: len(job) + 2] == ["safejax", *job, "--"]
    for option in ("--runner=DataflowRunner", "--project=p", "--region=us-central1",
                   "--temp_location=gs://b/tmp", "--max_num_workers=4", "--extra_package=dist/s.whl",
                   "--job_name=j1"):
        assert option in words[len(job) + 2:]


def test_dataflow_runs_safejax_with_the_arguments_intact(env, tmp_path):
    package = tmp_path / "s.whl"
    package.write_text("")
    args = [a if a != "dist/s.whl" else str(package) for a in DATAFLOW]
    proc = run("beam_dataflow.sh", *args, "--", "data", "cache", *TRICKY_ARGS, env=env)
    assert proc.returncode == 0, proc.stderr
    recorded = (Path(env["FAKE_OUT"]) / "safejax.0.args").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in recorded[:3 + len(TRICKY_ARGS)]] == ["data", "cache", *TRICKY_ARGS, "--"]


@pytest.mark.parametrize("args", [
    ["--", "data", "cache", "x"],  # no project
    DATAFLOW[:6] + ["--", "data", "cache", "x"],  # no package
    ["--project", "p", "--region", "r", "--bucket", "b", "--package", "w", "--", "data", "cache"],  # not gs://
    DATAFLOW,  # no --
    DATAFLOW + ["--"],  # nothing after --
    DATAFLOW + ["--", "train", "--workdir", "x"],  # not a Beam job
    DATAFLOW + ["--workers", "0", "--", "data", "cache", "x"],
    DATAFLOW + ["--", "data", "cache", "x"],  # the package does not exist
])
def test_dataflow_usage_errors(env, args):
    proc = run("beam_dataflow.sh", *args, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("beam_dataflow.sh: error:")


# --- all scripts --------------------------------------------------------------


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu.sh", "local.sh", "beam_dataflow.sh"])
def test_help(env, script):
    proc = run(script, "--help", env=env)
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"Usage: {script}")


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu.sh", "local.sh", "beam_dataflow.sh"])
def test_help_examples_name_existing_gin_files(env, script):
    from safejax import config

    text = run(script, "--help", env=env).stdout
    examples = text[text.index("Example"):]
    for path in re.findall(r"--gin_file[= ](\S+)", examples):
        assert os.path.isfile(LAUNCH.parent / path) or os.path.isfile(os.path.join(config.CONFIG_DIR, path)), path
    assert "configs/base.gin" not in text


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu.sh", "local.sh", "beam_dataflow.sh"])
def test_scripts_are_executable(script):
    assert os.access(LAUNCH / script, os.X_OK)
