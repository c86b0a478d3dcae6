"""Transparent huge pages for the host heap of CPU runs, chosen before the process starts.

XLA:CPU gives each execution its temporaries as one block (2 GB for `small`'s train step),
which glibc maps fresh from the kernel and unmaps when the step ends. With 4 KiB pages the
kernel faults in and zeroes ~500,000 pages a step: 1.0 s of system CPU in a 4.5 s step on the
2-core CPU of benchmarks/PEERS.md. glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35)
makes malloc advise transparent huge pages on what it maps, which cuts that to ~2,000 faults
and 0.18 s. Tunables are read only when a process starts, so the console script restarts
itself once with the tunable set (same pid, same arguments), for the subcommands that
train (`cli.HUGE_PAGE_COMMANDS`).

Only where it helps and was measured: Linux with glibc >= 2.35, the kernel's THP mode
`madvise` (with `always` the pages are huge already, with `never` the advice is ignored), and
a run that JAX will place on the CPU. SAFEJAX_HUGE_PAGES=0 turns it off.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys

SWITCH = "SAFEJAX_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def should_restart(environ, glibc_version: tuple[int, ...] | None, thp_mode: str | None,
                   accelerator_installed: bool) -> bool:
    """Whether to restart with the tunable, from the facts `restart_with_huge_pages` gathers."""
    if environ.get(SWITCH, "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False  # turned off, or already set (by the user or by the restart itself)
    if glibc_version is None or glibc_version < (2, 35) or thp_mode != "madvise":
        return False
    platforms = environ.get("JAX_PLATFORMS", "")
    return platforms.split(",")[0] == "cpu" if platforms else not accelerator_installed


def restart_with_huge_pages() -> None:
    """Replaces this process with itself under `glibc.malloc.hugetlb=1` when `should_restart`."""
    if not sys.executable or not should_restart(os.environ, _glibc_version(), _thp_mode(),
                                                 _accelerator_installed()):
        return  # (an embedded interpreter has no executable to restart)
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), f"{TUNABLE}=1"]))
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.executable, not orig_argv[0]: a bare "python" would be looked up on PATH again.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # not Linux, or not glibc
        return None


def _thp_mode() -> str | None:
    """The bracketed choice of e.g. 'always [madvise] never'."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.find("[") + 1: text.find("]")] if "[" in text else None


def _accelerator_installed() -> bool:
    """A TPU runtime or a JAX PJRT plugin (CUDA, ROCm, ...) is installed: JAX would not run on
    the CPU by default. Looked up without importing JAX, which would start its runtime."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    plugins = importlib.util.find_spec("jax_plugins")
    return plugins is not None and next(pkgutil.iter_modules(plugins.submodule_search_locations), None) is not None
