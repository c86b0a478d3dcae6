"""The huge-page restart: when it happens, and that it replaces the process with itself."""

import os
import subprocess
import sys

import pytest

from safejax import cli, host_memory

WANTED = dict(environ={}, glibc_version=(2, 36), thp_mode="madvise", accelerator_installed=False)


@pytest.mark.parametrize("change,expected", [
    ({}, True),
    ({"environ": {"SAFEJAX_HUGE_PAGES": "0"}}, False),
    ({"environ": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}}, False),  # the user's choice stands
    ({"environ": {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}}, True),
    ({"glibc_version": (2, 34)}, False),
    ({"glibc_version": None}, False),  # musl, macOS
    ({"thp_mode": "always"}, False),
    ({"thp_mode": "never"}, False),
    ({"thp_mode": None}, False),
    ({"accelerator_installed": True}, False),
    ({"accelerator_installed": True, "environ": {"JAX_PLATFORMS": "cpu"}}, True),
    ({"environ": {"JAX_PLATFORMS": "cuda,cpu"}}, False),
])
def test_should_restart(change, expected):
    assert host_memory.should_restart(**{**WANTED, **change}) is expected


@pytest.mark.parametrize("argv,expected", [
    (["train", "--gin_file=configs/lm/tiny.gin"], True),
    (["-v", "train"], True),
    (["bench", "train", "--configs", "small"], True),
    (["demo", "--quick"], True),
    (["bench", "sample"], False),
    (["score", "--checkpoint", "C"], True),
    (["bench", "score"], True),
    (["data", "--gin_file=configs/data/safety.gin"], False),
    (["sample", "--checkpoint", "train"], False),
    ([], False),
])
def test_only_the_training_scoring_and_demo_commands_restart(argv, expected):
    assert cli.is_huge_page_command(argv) is expected


def test_restart_keeps_the_pid_and_adds_the_tunable():
    """Run in a child: where this machine wants huge pages, the child replaces itself (same pid)
    with the tunable appended to the user's; elsewhere nothing changes."""
    code = ("import os; from safejax import host_memory; host_memory.restart_with_huge_pages(); "
            "print(os.getpid(), os.environ['GLIBC_TUNABLES'])")
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}
    env.pop(host_memory.SWITCH, None)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    pid, tunables = out.split()
    wanted = host_memory.should_restart(env, host_memory._glibc_version(), host_memory._thp_mode(),
                                        host_memory._accelerator_installed())
    assert int(pid) == proc.pid
    expected = "glibc.malloc.tcache_count=7" + (":glibc.malloc.hugetlb=1" if wanted else "")
    assert tunables == expected
