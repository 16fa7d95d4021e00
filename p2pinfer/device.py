"""What this device can offer: memory and a measured compute score."""

from __future__ import annotations

import time

import numpy as np


def memory_info() -> tuple[int, int]:
    """(total, available) bytes of RAM, from /proc/meminfo."""
    values = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def measure_compute(n: int = 384, seconds: float = 0.25) -> float:
    """GFLOP/s of an f32 matmul, measured now: a real figure for this device, not a lookup table."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up BLAS threads and caches
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or reps < 3:
        a @ b
        reps += 1
    return round(2 * n**3 * reps / elapsed / 1e9, 2)
