"""Peak FLOP/s, the denominator of MFU: a stable figure, so MFU compares across runs.

- Accelerators: the chip's published dense bf16 peak (PUBLISHED_PEAKS), source "published".
- CPUs: cores x clock x fp32 FLOPs per cycle and core, source "cpu_formula": cores are the
  logical CPUs this process may run on; the clock is cpufreq's maximum, else /proc/cpuinfo's
  "cpu MHz" (a VM's constant TSC rate; on bare metal without cpufreq the current rate); FLOPs
  per cycle from the vector flags (FLOPS_PER_CYCLE: two FMA pipes x lanes x 2; AMD's AVX-512
  (Zen 4) runs on 256-bit pipes, so it counts as AVX2).
- `TrainConfig.peak_flops_per_device` overrides both (source "configured"); a CPU whose flags
  cannot be read falls back to a timed matmul (source "measured", which varied 2x between runs).
Metrics rows and the training summary carry `peak_flops` and `peak_source`.
"""

from __future__ import annotations

import functools
import os
import re
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PUBLISHED_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def published_peak(device: jax.Device) -> float | None:
    return peak_for_kind(device.device_kind)


def peak_for_kind(kind: str) -> float | None:
    """The published peak of a device kind as JAX names it (also a planned topology's)."""
    for name, peak in PUBLISHED_PEAKS.items():
        if kind.startswith(name):
            return peak
    return None


@functools.cache
def measure_matmul_peak(size: int = 1536, repeats: int = 4) -> float:
    """Best observed FLOP/s of fp32 (size x size) matmuls on the first device; once per process."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    chain = 2  # several matmuls in one program, so dispatch overhead does not count

    @jax.jit
    def run(x):
        for _ in range(chain):
            x = (x @ a) * (1.0 / size)
        return x

    run(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * chain / best


# fp32 FLOPs per cycle and core: 2 FMA pipes x fp32 lanes x 2 (multiply and add).
FLOPS_PER_CYCLE = {"avx512": 64, "avx2_fma": 32, "sse": 8}


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def cpu_clock_hz(cpuinfo: str) -> float | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", encoding="utf-8") as f:
            return float(f.read()) * 1e3  # kHz
    except (OSError, ValueError):
        pass
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE)
    return round(float(match.group(1))) * 1e6 if match else None


def vector_width(cpuinfo: str) -> str | None:
    """The FLOPS_PER_CYCLE key of the CPU's widest fp32 FMA path, from its flags."""
    match = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    if not match:
        return None
    flags = set(match.group(1).split())
    if "avx512f" in flags and "AuthenticAMD" not in cpuinfo:
        return "avx512"
    return "avx2_fma" if {"avx2", "fma"} <= flags else "sse"


def cpu_formula_peak(cpuinfo: str | None = None, cores: int | None = None) -> float | None:
    """cores x clock x FLOPs per cycle for this host, or None when /proc/cpuinfo says too little."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    cores = cores or len(os.sched_getaffinity(0))
    clock, width = cpu_clock_hz(cpuinfo), vector_width(cpuinfo)
    return cores * clock * FLOPS_PER_CYCLE[width] if clock and width else None


def peak_flops(configured_per_device: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of all devices together, its source: configured | published | cpu_formula |
    measured). Simulated CPU devices (--xla_force_host_platform_device_count) share the host's
    cores, so on the CPU the peak is each host's, not each simulated device's."""
    device = jax.devices()[0]
    if configured_per_device:
        per_device, source = configured_per_device, "configured"
    elif published_peak(device):
        per_device, source = published_peak(device), "published"
    elif device.platform == "cpu" and cpu_formula_peak():
        per_device, source = cpu_formula_peak(), "cpu_formula"
    else:
        per_device, source = measure_matmul_peak(), "measured"
    count = jax.process_count() if device.platform == "cpu" else jax.device_count()
    return per_device * count, source


def total_peak_flops(configured_per_device: float | None = None) -> float:
    return peak_flops(configured_per_device)[0]
