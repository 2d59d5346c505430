"""Static exchange plans: which shards' keys each shard needs, step by step.

A ring over ``R`` (virtual) shards has steps ``j = 0 .. R - 1``; at step ``j``
shard ``g`` attends to the keys of shard ``(g - j) mod R``. The pattern is data
(positions in, booleans out), and each shard's rows are known runs of absolute
positions (:class:`~lcjax.parallel.layout.ShardView`), so on the host we can
classify every (destination shard, step, query run, key run) as SKIP, PARTIAL
(attend under the pattern) or FULL (every pair visible: attend without a mask).
From that:

* steps that no shard needs are dropped, and a step's ``ppermute`` only carries
  the shard pairs that need it: a causal window exchanges only the neighbour
  halo, strided block-sparse layers only visit shards holding needed blocks;
* when every shard needs every step, the steps form the classic chained ring
  (each hop passes on what it received, so at most two K/V buffers live);
* sink keys (``SinkWindow``, ``TriShape``) can be split off: the first ``n``
  tokens are broadcast once and every other pair is planned without them, so a
  far-away shard 0 does not drag the whole ring in.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from lcjax.attention import block_mask
from lcjax.attention import patterns as P
from lcjax.parallel.layout import ShardView

SKIP, PARTIAL, FULL = block_mask.SKIP, block_mask.PARTIAL, block_mask.FULL


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
  """One ring step: receive the K/V of shard ``(g - shift) mod R``.

  ``perm``: ``(source device, destination device)`` pairs of the ``ppermute``
  (empty for the local step ``shift = 0``); ``chained``: receive what the
  previous step received from the left neighbour (classic ring) instead of a
  direct send from the source. ``kinds[g, a, b]``: SKIP/PARTIAL/FULL of query
  run ``a`` of destination shard ``g`` against key run ``b``; ``kv_starts[g, b]``
  the attend offset of that key run.
  """
  shift: int
  perm: tuple[tuple[int, int], ...]
  chained: bool
  kinds: np.ndarray
  kv_starts: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class SinkPart:
  """The first ``num_tokens`` keys, broadcast from ``holder`` (device) rows
  ``[row, row + num_tokens)``; ``kinds[g, a]`` for query run ``a`` of shard ``g``
  (SKIP where a ring step already covers those keys)."""
  num_tokens: int
  holder: int
  row: int
  kinds: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  view: ShardView
  steps: tuple[Step, ...]
  sink: SinkPart | None

  @property
  def received(self) -> np.ndarray:
    """``[R]``: K/V shard transfers each (virtual) shard receives."""
    count = np.zeros(self.view.num_shards, np.int64)
    U = self.view.group_size
    for step in self.steps:
      for _, dst in step.perm:
        if dst % U == 0:
          count[dst // U] += 1
    return count

  @property
  def is_dense(self) -> bool:
    """Every shard needs the keys of every other shard."""
    return bool((self.received >= self.view.num_shards - 1).all())

  @property
  def is_sparse(self) -> bool:
    """Even the busiest shard needs the keys of only some other shards."""
    return bool(self.received.max() < self.view.num_shards - 1)

  @property
  def chained(self) -> bool:
    return any(s.chained for s in self.steps)


def pair_kind(pattern: P.Pattern, view: ShardView, q_start: int, kv_start: int,
              num_heads: int, kv_len: int | None = None) -> int:
  """SKIP/PARTIAL/FULL of one run of queries against one run of keys.

  One block per run pair, classified by the pattern's block bounds: exact for
  the primitives (tile patterns use prefix sums over their tiles), and for the
  intersections used here it can only err towards PARTIAL (safe: attend
  applies the mask).
  """
  L = view.run_len
  kv_len = L if kv_len is None else kv_len
  vp = view.view_pattern(pattern)
  hm = block_mask.num_metadata_heads(vp, num_heads)
  arr = lambda x: np.asarray([[[x]]], np.int64)
  g = P.BlockGrid(arr(q_start), arr(q_start + L - 1), arr(kv_start),
                  arr(kv_start + kv_len - 1), np.arange(hm)[:, None, None],
                  L, kv_len, q_start, kv_start, L, kv_len)
  any_, all_ = vp.block_bounds(g)
  any_ = np.broadcast_to(any_, (hm, 1, 1))
  all_ = np.broadcast_to(all_, (hm, 1, 1)) & any_
  if not any_.any():
    return SKIP
  return FULL if all_.all() else PARTIAL


def split_sink(pattern: P.Pattern) -> tuple[int, P.Pattern | None] | None:
  """``(n, rest)`` with ``pattern == rest | (pattern & Sink(n))`` where ``rest``
  has no sink part (None: nothing left), or None if the pattern has no sink."""
  if isinstance(pattern, P.SinkWindow):
    return pattern.sink, P.SlidingWindow(pattern.window, 0)
  if isinstance(pattern, P.TriShape):
    return pattern.sink, (P.SlidingWindow(pattern.window, 0)
                          | (P.QueryRange(pattern.dense_from) & P.Causal()))
  if isinstance(pattern, P.Union):
    def sink_of(p):
      if isinstance(p, P.Sink):
        return p.num_tokens
      if isinstance(p, P.Intersection):
        return max((q.num_tokens for q in p.parts if isinstance(q, P.Sink)),
                   default=0)
      return 0
    sinks = [sink_of(p) for p in pattern.parts]
    if max(sinks) == 0:
      return None
    rest = [p for p, n in zip(pattern.parts, sinks) if n == 0]
    return max(sinks), (None if not rest else rest[0] if len(rest) == 1
                        else P.Union(tuple(rest)))
  return None


def _kind_table(pattern, view, num_heads):
  """``kinds[g, j, a, b]`` for every destination, shift and run pair."""
  R, m = view.num_shards, view.num_runs
  starts = view.starts
  kinds = np.zeros((R, R, m, m), np.int8)
  for g in range(R):
    for j in range(R):
      s = (g - j) % R
      for a in range(m):
        for b in range(m):
          kinds[g, j, a, b] = pair_kind(pattern, view, starts[g][a], starts[s][b],
                                        num_heads)
  return kinds


@functools.lru_cache(maxsize=256)
def build_plan(pattern: P.Pattern, view: ShardView, num_heads: int,
               sink_broadcast: bool = True) -> Plan:
  """The exchange plan of ``pattern`` on ``view`` (cached; host numpy).

  ``sink_broadcast``: split off the sink keys (see the module docstring) when
  that lowers the number of K/V transfers.
  """
  R, m, U = view.num_shards, view.num_runs, view.group_size
  kinds = _kind_table(pattern, view, num_heads)
  visited = kinds != SKIP
  sink = None
  split = (split_sink(pattern) if sink_broadcast and view.striped is None
           and U == 1 else None)
  holder = [(g, b) for g in range(R) for b in range(m) if view.starts[g][b] == 0]
  if split is not None and holder and 0 < split[0] <= view.run_len:
    n, rest = split
    h, b0 = holder[0]
    # Pairs that need keys >= n: ``rest`` covers them (and nothing outside the
    # pattern); the sink keys come from the broadcast instead.
    split_visited = (np.zeros_like(visited) if rest is None
                     else _kind_table(rest, view, num_heads) != SKIP) & visited
    count = lambda v: int(v[:, 1:].any(axis=(2, 3)).sum())
    if count(split_visited) < count(visited):
      sink_kinds = np.zeros((R, m), np.int8)
      for g in range(R):
        j = (g - h) % R
        for a in range(m):
          if not split_visited[g, j, a, b0]:
            sink_kinds[g, a] = pair_kind(pattern, view, view.starts[g][a], 0,
                                         num_heads, kv_len=n)
      kinds = np.where(split_visited, kinds, SKIP).astype(np.int8)
      visited = split_visited
      sink = SinkPart(n, h * U, b0 * view.run_len, sink_kinds)
  needs = visited.any(axis=(2, 3))  # [R, R]
  dense = bool(needs[:, 1:].all())
  steps = []
  for j in range(R):
    if j and not needs[:, j].any():
      continue
    if j == 0:
      perm = ()
    elif dense:  # chained: pass on what the left neighbour received
      perm = tuple((g * U + u, ((g + 1) % R) * U + u)
                   for g in range(R) for u in range(U))
    else:
      perm = tuple((((g - j) % R) * U + u, g * U + u)
                   for g in range(R) if needs[g, j] for u in range(U))
    kv_starts = np.asarray([view.starts[(g - j) % R] for g in range(R)], np.int32)
    steps.append(Step(j, perm, dense and j > 0, kinds[:, j].copy(), kv_starts))
  return Plan(view, tuple(steps), sink)
