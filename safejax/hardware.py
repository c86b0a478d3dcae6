"""Peak FLOP/s per device, the denominator of MFU.

Accelerators use their published dense bf16 peaks; the CPU has no such figure, so it is measured:
the best rate of a large fp32 matmul on one device, the same measurement `safejax bench` reports.
"""

from __future__ import annotations

import functools
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


def total_peak_flops(configured_per_device: float | None = None) -> float:
    """Peak FLOP/s of all devices together.

    Simulated CPU devices (--xla_force_host_platform_device_count) share the host's cores, so on
    the CPU the peak is that of each host, not of each simulated device.
    """
    device = jax.devices()[0]
    if configured_per_device:
        per_device = configured_per_device
    else:
        per_device = published_peak(device) or measure_matmul_peak()
    if device.platform == "cpu":
        return per_device * jax.process_count()
    return per_device * jax.device_count()
