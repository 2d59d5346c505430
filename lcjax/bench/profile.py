"""Where the time goes: per-kernel device time of a jitted call, from JAX's profiler.

    from lcjax.bench.profile import kernel_times, format_kernel_times
    print(format_kernel_times(kernel_times(jitted_fn, *args)))

Runs the call (already compiled and warmed up by the caller) ``repeats`` times
under ``jax.profiler.trace`` with a Perfetto trace, and sums the duration of
every event on the GPU's streams by kernel name (on CPU, where there are no
device streams, every traced event is counted). Used to break a benchmark's
time into kernels (e.g. forward, dQ and dK/dV kernels of attention, or the
parts of a decode step) without Nsight.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
from typing import Any, Callable

import jax


def _device_pids(events: list[dict[str, Any]]) -> set[int]:
  """Process ids of the trace's GPU device timelines."""
  pids = set()
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      name = str(e.get("args", {}).get("name", ""))
      if "/device:gpu" in name.lower() or "GPU:" in name:
        pids.add(e["pid"])
  return pids


def kernel_times(fn: Callable[..., Any], *args: Any, repeats: int = 3,
                 trace_dir: str | None = None,
                 queued: bool = False) -> dict[str, float]:
  """Microseconds per call of each device kernel of ``fn(*args)``, by name.

  ``queued``: the ``repeats`` calls are issued without a sync in between (one
  at the end), so the GPU runs them back to back. On the H100 this is the
  steadier measure for comparing kernels: strided 1/16 32K fwd+bwd kernels
  varied 1% between processes this way against 5-9% with a sync after each
  call (docs/mosaic_kernels.md, log item 18).
  """
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="lcjax_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    if queued:
      for _ in range(repeats):
        out = fn(*args)
      jax.block_until_ready(out)
    else:
      for _ in range(repeats):
        jax.block_until_ready(fn(*args))
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    raise RuntimeError(f"the profiler wrote no Perfetto trace under {trace_dir}")
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = _device_pids(events)
  totals: dict[str, float] = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and (not pids or e.get("pid") in pids):
      totals[e["name"]] += float(e.get("dur", 0.0)) / repeats
  return dict(totals)


def format_kernel_times(times: dict[str, float], top: int = 15, title: str = "") -> str:
  """The ``top`` kernels by time, with their share of the total."""
  total = sum(times.values()) or 1.0
  lines = [f"{title} device time {total / 1e3:.3f} ms"] if title else []
  for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"  {us / 1e3:8.3f} ms {100 * us / total:5.1f}%  {name[:90]}")
  return "\n".join(lines)
