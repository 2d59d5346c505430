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


def back_to_back_ms(fn: Callable, args: tuple, repeats: int = 5, calls: int = 10,
                    warmup: int = 2) -> float:
  """Median over ``repeats`` of the wall time per call of ``calls`` calls queued
  without synchronising in between (one sync after the last).

  What a call costs inside a larger program such as a training step, where the
  host queues work ahead of the GPU: the launch and synchronisation latency
  that ``median_ms`` pays once per call (~0.2-0.5 ms on the H100 machine) is
  paid once per ``calls`` calls.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) * 1e3 / calls)
  return statistics.median(times)
