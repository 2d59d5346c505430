"""Bytes each device sends per attention layer, per strategy (computed).

Counts what the implementations in this package actually move, per device
and per layer, forward and backward (the collectives are symmetric, so sent =
received):

* ring / sparse exchange: the plan's K/V transfers (``[2, B, L, K, H]`` in
  the activation dtype plus int32 key segment ids), again in the backward
  (K/V are rotated again, not stored) plus the float32 dK/dV going home; the
  sink of sink + window layers is one all-reduce (``2 (P - 1) / P`` of it).
* all-gather: ``(P - 1)`` K/V shards in; the backward gathers again
  (recomputed) and reduce-scatters dK/dV in the activation dtype.
* Ulysses: all-to-alls of q, K/V (heads repeated when ``num_kv_heads`` does
  not divide), and the output, each moving ``(P - 1) / P`` of the local
  tensor; the backward transposes them (same volume).
* hybrid: Ulysses inside groups of ``U`` plus the ring across ``P / U`` groups.

``python -m lcjax.parallel.comm_volume`` prints the table of
docs/context_parallel.md.
"""
from __future__ import annotations

import argparse
import dataclasses

from lcjax.attention import patterns as P
from lcjax.parallel.layout import SequenceLayout, shard_view
from lcjax.parallel.plan import Plan, build_plan
from lcjax.parallel.ulysses import kv_head_repeats


@dataclasses.dataclass(frozen=True)
class Shape:
  """One layer's attention: per-device batch, global length, heads, dtype."""
  batch: int
  seq_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype_bytes: int = 2
  segment_ids: bool = True


def _kv_bytes(s: Shape, rows: int, kv_heads: int, dtype_bytes: int) -> int:
  return 2 * s.batch * rows * kv_heads * s.head_dim * dtype_bytes


def _plan_bytes(s: Shape, plan: Plan, kv_heads: int, rows: int) -> tuple[int, int]:
  """Busiest device's (forward, backward) bytes for a ring plan."""
  transfers = int(plan.received.max())
  kv = _kv_bytes(s, rows, kv_heads, s.dtype_bytes)
  seg = s.batch * rows * 4 if s.segment_ids else 0
  dkv = _kv_bytes(s, rows, kv_heads, 4)
  forward = transfers * (kv + seg)
  backward = transfers * (kv + seg + dkv)
  if plan.sink is not None:
    n, P_ = plan.sink.num_tokens, plan.view.num_shards
    allreduce = lambda b: 2 * (P_ - 1) * b // P_
    sink = allreduce(_kv_bytes(s, n, kv_heads, s.dtype_bytes) + (
        s.batch * n * 4 if s.segment_ids else 0))
    forward += sink
    backward += sink + allreduce(_kv_bytes(s, n, kv_heads, 4))
  return forward, backward


def _ulysses_bytes(s: Shape, degree: int, rows: int) -> tuple[int, int]:
  repeats = kv_head_repeats(s.num_heads, s.num_kv_heads, degree)
  frac = lambda b: b * (degree - 1) // degree
  q = s.batch * rows * s.num_heads * s.head_dim * s.dtype_bytes
  kv = _kv_bytes(s, rows, s.num_kv_heads * repeats, s.dtype_bytes)
  seg = (degree - 1) * s.batch * rows * 4 if s.segment_ids else 0
  total = frac(2 * q + kv) + seg  # q in, output back, K/V in
  return total, frac(2 * q + kv)   # backward: the transposed all-to-alls


def layer_bytes(strategy: str, s: Shape, num_shards: int,
                pattern: P.Pattern = P.Causal(), load_balance: str = "zigzag",
                ulysses_degree: int = 1) -> tuple[int, int]:
  """``(forward, backward)`` bytes sent by the busiest device for one layer.

  ``strategy``: "ring" (the layer's exchange plan, sparse when the pattern
  allows), "allgather", "ulysses", "hybrid".
  """
  L = s.seq_len // num_shards
  if strategy == "ring":
    layout = SequenceLayout(load_balance, num_shards, s.seq_len)
    return _plan_bytes(s, build_plan(pattern, shard_view(layout), s.num_heads),
                       s.num_kv_heads, L)
  if strategy == "allgather":
    kv = _kv_bytes(s, L, s.num_kv_heads, s.dtype_bytes)
    seg = s.batch * L * 4 if s.segment_ids else 0
    gather = (num_shards - 1) * (kv + seg)
    return gather, gather + (num_shards - 1) * kv
  if strategy == "ulysses":
    return _ulysses_bytes(s, num_shards, L)
  if strategy == "hybrid":
    U = ulysses_degree
    uf, ub = _ulysses_bytes(s, U, L)
    layout = SequenceLayout(load_balance, num_shards, s.seq_len)
    view = shard_view(layout, U)
    repeats = kv_head_repeats(s.num_heads, s.num_kv_heads, U)
    plan = build_plan(pattern, view, s.num_heads, sink_broadcast=False)
    rf, rb = _plan_bytes(s, plan, s.num_kv_heads * repeats // U, U * L)
    return uf + rf, ub + rb
  raise ValueError(f"unknown strategy {strategy!r}; choose ring, allgather, "
                   "ulysses or hybrid")


def table(s: Shape, num_shards: int, ulysses_degree: int,
          layers: dict[str, P.Pattern], load_balance: str = "zigzag") -> str:
  """Markdown table: MiB per device per layer, forward / backward, for the
  path each strategy really takes on each layer (``context.route``)."""
  from lcjax.config import ContextParallelConfig  # pylint: disable=import-outside-toplevel
  from lcjax.parallel.context import route  # pylint: disable=import-outside-toplevel
  mib = lambda b: f"{b / 2**20:,.1f}"
  layout = SequenceLayout(load_balance, num_shards, s.seq_len)
  rows = ["| layer | strategy | runs as | forward MiB | backward MiB | total MiB |",
          "|---|---|---|---:|---:|---:|"]
  for name, pattern in layers.items():
    sparse = build_plan(pattern, shard_view(layout), s.num_heads).is_sparse
    for strategy in ("ring", "allgather", "ulysses", "hybrid"):
      cp = ContextParallelConfig(strategy, load_balance, ulysses_degree)
      how = route(cp, pattern, layout, s.num_heads, s)
      runs_as = how if how != "hybrid" else f"hybrid U={ulysses_degree}"
      if how == "ring" and sparse:
        runs_as = "sparse exchange"
      f, b = layer_bytes(how, s, num_shards, pattern, load_balance, ulysses_degree)
      rows.append(f"| {name} | {strategy} | {runs_as} | {mib(f)} | {mib(b)} | "
                  f"{mib(f + b)} |")
  return "\n".join(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=131072)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--ulysses_degree", type=int, default=2)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--sink", type=int, default=64)
  parser.add_argument("--window", type=int, default=4096)
  parser.add_argument("--load_balance", default="zigzag")
  args = parser.parse_args(argv)
  s = Shape(args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim)
  layers = {"causal": P.Causal(),
            f"sink {args.sink} + window {args.window}": P.SinkWindow(args.sink,
                                                                     args.window),
            "strided 64/16 (head offsets)": P.StridedBlockSparse(64, 16, 1)}
  print(f"{args.devices} devices, seq_len {args.seq_len}, batch {args.batch}, "
        f"{args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, bf16, "
        f"{args.load_balance} layout; MiB sent per device per layer (busiest "
        "device)\n")
  print(table(s, args.devices, args.ulysses_degree, layers, args.load_balance))


if __name__ == "__main__":
  main()
