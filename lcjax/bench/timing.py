"""The one timer of the benchmarks: median wall time after warm-up."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def median_ms(fn: Callable, args: tuple, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall time in ms of ``fn(*args)``, synchronised after every call;
  the ``warmup`` calls first compile and warm up (not timed)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)
