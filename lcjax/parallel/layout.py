"""Sequence layouts for context parallelism: which tokens each shard holds.

With ``P`` shards along the mesh's ``sequence`` axis a causal mask gives the
shard holding the end of the sequence ``2P - 1`` times the work of the first
one if shards are contiguous. A layout is a static permutation of the sequence,
applied once in the data path (tokens, targets, RoPE positions, segment ids and
loss mask alike), after which shard ``r`` holds rows ``[r L, (r + 1) L)`` of the
permuted sequence:

* ``"none"``: contiguous; shard ``r`` holds positions ``[r L, (r + 1) L)``.
* ``"zigzag"`` (dual-chunk swap; ring-flash-attention, Llama 3 context
  parallelism): the sequence is cut into ``2P`` chunks and shard ``r`` holds
  chunks ``r`` and ``2P - 1 - r``, so every shard has the same causal work.
* ``"striped"`` (Striped Attention, Brandon et al., 2023): shard ``r`` holds
  positions ``r, r + P, r + 2P, ...``.

Attention masks are written on absolute positions (``lcjax.attention.patterns``);
:attr:`SequenceLayout.positions` says which absolute position every local row
holds. Positions of striped shards are not contiguous, so attention on them goes
through :class:`StripedView`, a pattern over *encoded* positions.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from lcjax.attention import patterns as P

LOAD_BALANCE = ("none", "zigzag", "striped")


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  """``seq_len`` tokens over ``num_shards`` shards in one of :data:`LOAD_BALANCE`."""
  kind: str
  num_shards: int
  seq_len: int

  def __post_init__(self):
    if self.kind not in LOAD_BALANCE:
      raise ValueError(f"unknown load balancing {self.kind!r}; choose one of "
                       f"{LOAD_BALANCE}")
    if not isinstance(self.num_shards, int) or self.num_shards < 1:
      raise ValueError(f"num_shards={self.num_shards!r} must be a positive int")
    if self.seq_len % self.granularity:
      raise ValueError(
          f"seq_len={self.seq_len} is not divisible by {self.granularity}: the "
          f"{self.kind!r} layout over {self.num_shards} shards needs a multiple of "
          f"{self.granularity}")

  @property
  def granularity(self) -> int:
    """The sequence length must be a multiple of this."""
    return 2 * self.num_shards if self.kind == "zigzag" else self.num_shards

  @property
  def shard_len(self) -> int:
    return self.seq_len // self.num_shards

  @property
  def is_identity(self) -> bool:
    return self.kind == "none" or self.num_shards == 1

  @functools.cached_property
  def positions(self) -> np.ndarray:
    """``[num_shards, shard_len]`` absolute position of every local row."""
    n, L, T = self.num_shards, self.shard_len, self.seq_len
    if self.kind == "none":
      pos = np.arange(T).reshape(n, L)
    elif self.kind == "zigzag":
      chunks = np.arange(T).reshape(2 * n, L // 2)
      pos = np.concatenate([chunks[:n], chunks[n:][::-1]], axis=1)
    else:
      pos = np.arange(T).reshape(L, n).T
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    pos.setflags(write=False)
    return pos

  @functools.cached_property
  def order(self) -> np.ndarray:
    """``[seq_len]``: row ``i`` of the permuted sequence is position ``order[i]``."""
    return self.positions.reshape(-1)

  @functools.cached_property
  def inverse(self) -> np.ndarray:
    """``[seq_len]``: position ``p`` sits at row ``inverse[p]`` of the permuted one."""
    inv = np.argsort(self.order, kind="stable")
    inv.setflags(write=False)
    return inv

  def permute(self, x: Any, axis: int = 1) -> Any:
    """Natural order -> layout order along ``axis`` (numpy or jax arrays)."""
    return x if self.is_identity else _take(x, self.order, axis)

  def unpermute(self, x: Any, axis: int = 1) -> Any:
    """Layout order -> natural order along ``axis``."""
    return x if self.is_identity else _take(x, self.inverse, axis)


def _take(x, index, axis):
  if isinstance(x, np.ndarray):
    return np.take(x, index, axis=axis)
  return jnp.take(x, jnp.asarray(index, jnp.int32), axis=axis,
                  unique_indices=True, indices_are_sorted=False)


def permute_batch(batch: dict[str, Any], layout: SequenceLayout | None
                  ) -> dict[str, Any]:
  """Every ``[..., seq_len]`` array of a batch in layout order (last axis).

  Tokens, targets, positions, segment ids and loss mask move together, so RoPE
  still sees each token's original position and the summed loss is unchanged.
  """
  if layout is None or layout.is_identity:
    return batch
  out = {}
  for key, value in batch.items():
    if value is None:
      out[key] = None
      continue
    if value.shape[-1] != layout.seq_len:
      raise ValueError(f"batch[{key!r}] has shape {value.shape}; its last axis "
                       f"must be the sequence of length {layout.seq_len}")
    out[key] = layout.permute(value, axis=value.ndim - 1)
  return out


# ------------------------------------------------------------- shard views


@dataclasses.dataclass(frozen=True)
class ShardView:
  """How attention sees the local rows of each of ``num_shards`` (virtual) shards.

  Shard ``g`` holds ``num_runs`` runs of ``run_len`` rows (in local row order);
  run ``a`` starts at attend offset ``starts[g][a]``. For contiguous runs the
  offsets are absolute positions and ``striped`` is None; for striped layouts
  there is one run per shard, its offsets are encoded positions and the pattern
  must be wrapped with :meth:`view_pattern`.

  ``group_order`` is the local reordering that turns the concatenated rows of a
  group of ``group_size`` consecutive device shards (Ulysses inside a group)
  into this run order (None: identity).
  """
  num_shards: int
  run_len: int
  starts: tuple[tuple[int, ...], ...]
  striped: tuple[int, int] | None  # (total device shards, width) or None
  group_size: int
  group_order: tuple[int, ...] | None

  @property
  def num_runs(self) -> int:
    return len(self.starts[0])

  @property
  def shard_len(self) -> int:
    return self.run_len * self.num_runs

  @functools.cached_property
  def starts_array(self) -> np.ndarray:
    return np.asarray(self.starts, np.int32)

  def view_pattern(self, pattern: P.Pattern) -> P.Pattern:
    if self.striped is None:
      return pattern
    total, width = self.striped
    return StripedView(pattern, total // width, width, self.shard_len)


def _runs(pos: np.ndarray) -> list[tuple[int, int]]:
  """Maximal runs ``(start, length)`` of consecutive positions."""
  breaks = np.nonzero(np.diff(pos) != 1)[0] + 1
  return [(int(seg[0]), len(seg)) for seg in np.split(pos, breaks)]


@functools.lru_cache(maxsize=64)
def shard_view(layout: SequenceLayout, group_size: int = 1,
               max_runs: int = 4) -> ShardView:
  """The view of ``num_shards / group_size`` groups of consecutive shards.

  ``group_size > 1`` is the hybrid strategy: after the Ulysses all-to-all each
  device of a group holds all rows of the group (for some heads), and the ring
  runs between groups.
  """
  n = layout.num_shards
  if group_size < 1 or n % group_size:
    raise ValueError(f"group size {group_size} must divide the number of "
                     f"sequence shards {n}")
  groups = layout.positions.reshape(n // group_size, -1)  # [R, U * L]
  order = np.argsort(groups[0], kind="stable")
  sorted_pos = np.take_along_axis(groups, order[None].repeat(len(groups), 0), 1)
  same_order = layout.kind != "striped" and all(
      np.array_equal(np.argsort(g, kind="stable"), order) for g in groups)
  identity = bool(np.array_equal(order, np.arange(len(order))))
  group_order = None if identity else tuple(int(i) for i in order)
  if same_order:
    runs = [_runs(p) for p in sorted_pos]
    # Cut maximal runs into pieces of one common length (zigzag's middle shard
    # holds two adjacent chunks) so that every shard has the same structure.
    size = math.gcd(*[length for r in runs for _, length in r])
    starts = tuple(tuple(s + i for s, length in r for i in range(0, length, size))
                   for r in runs)
    if len(starts[0]) <= max_runs:
      return ShardView(len(groups), size, starts, None, group_size, group_order)
  if layout.kind == "striped":
    # group g holds residues [g U, (g + 1) U) of every period of n tokens:
    # in t-major order its rows are width-U blocks with stride n.
    L = layout.shard_len
    order = np.arange(group_size * L).reshape(group_size, L).T.reshape(-1)
    M = group_size * L
    starts = tuple((g * M,) for g in range(n // group_size))
    identity = group_size == 1
    return ShardView(n // group_size, M, starts, (n, group_size), group_size,
                     None if identity else tuple(int(i) for i in order))
  raise ValueError(f"layout {layout.kind!r} with groups of {group_size} shards "
                   "gives no usable run structure")


# --------------------------------------------------- striped (encoded) pattern


def _contains_tiles(p: P.Pattern) -> bool:
  if isinstance(p, P.TilePattern):
    return True
  if isinstance(p, P._Combination):
    return any(_contains_tiles(q) for q in p.parts)
  if isinstance(p, P.PerHead):
    return any(_contains_tiles(q) for q in p.patterns)
  if isinstance(p, P._Named):
    return _contains_tiles(p._expr)
  if isinstance(p, StripedView):
    return _contains_tiles(p.base)
  return False


@dataclasses.dataclass(frozen=True)
class StripedView(P.Pattern):
  """``base`` on the rows of a striped layout, addressed by encoded positions.

  Encoded position ``e = g * shard_len + i`` is row ``i`` of shard ``g`` of
  ``num_shards``, which holds absolute position
  ``(i // width) * num_shards * width + g * width + i % width``. Calling
  ``attend`` with ``q_offset = g * shard_len`` (and likewise for keys) makes any
  pattern exact on striped shards; the gathered rows of all shards are the
  contiguous encoded range ``[0, num_shards * shard_len)``.
  """
  base: P.Pattern
  num_shards: int
  width: int
  shard_len: int

  def decode(self, e):
    g, i = e // self.shard_len, e % self.shard_len
    return (i // self.width) * (self.num_shards * self.width) + g * self.width + (
        i % self.width)

  def mask(self, q_pos, k_pos, head=0):
    return self.base.mask(self.decode(q_pos), self.decode(k_pos), head)

  def segment_exempt(self, q_pos, k_pos, head=0):
    return self.base.segment_exempt(self.decode(q_pos), self.decode(k_pos), head)

  def _interval(self, lo, hi):
    """An absolute interval holding the positions of encoded rows [lo, hi].

    Within one shard ``decode`` is increasing; a block that crosses shards
    also covers the first row of the next shard and the last of the previous.
    """
    xp = P._xp(lo)
    M = self.shard_len
    cross = lo // M != hi // M
    abs_lo = xp.where(cross, xp.minimum(self.decode(lo),
                                        self.decode((lo // M + 1) * M)),
                      self.decode(lo))
    abs_hi = xp.where(cross, xp.maximum(self.decode(hi),
                                        self.decode((hi // M) * M - 1)),
                      self.decode(hi))
    return abs_lo, abs_hi

  def _grid(self, g: P.BlockGrid) -> P.BlockGrid:
    # Bounds on the absolute intervals are conservative for the strided
    # subsets the blocks really hold (tile patterns are not mapped).
    q_lo, q_hi = self._interval(g.q_lo, g.q_hi)
    k_lo, k_hi = self._interval(g.k_lo, g.k_hi)
    return g._replace(q_lo=q_lo, q_hi=q_hi, k_lo=k_lo, k_hi=k_hi)

  def block_bounds(self, g):
    if _contains_tiles(self.base):  # tile bounds need contiguous blocks
      t = P._true(g.q_lo, g.k_lo, g.head)
      return t, ~t
    return self.base.block_bounds(self._grid(g))

  def segment_exempt_bounds(self, g):
    if _contains_tiles(self.base):
      return P._true(g.q_lo, g.k_lo) & self.base.has_segment_exemptions
    return self.base.segment_exempt_bounds(self._grid(g))

  @property
  def has_segment_exemptions(self):
    return self.base.has_segment_exemptions

  @property
  def head_dependent(self):
    return self.base.head_dependent

  @property
  def required_num_heads(self):
    return self.base.required_num_heads

  @property
  def in_kernel_mask(self):
    return self.base.in_kernel_mask
