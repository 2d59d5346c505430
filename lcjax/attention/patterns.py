"""Declarative attention patterns: which (query, key) pairs may attend.

A pattern is a frozen, hashable dataclass written in terms of *absolute token
positions* and the *query head index*. Because it is data (not a mask array),
the same pattern drives the dense reference, the block-sparse metadata of the
kernels (:mod:`lcjax.attention.block_mask`) and context-parallel code, whatever
the sequence layout (offsets for chunked prefill, shards for ring attention).

Every pattern answers three questions:

* ``mask(q_pos, k_pos, head)``: element visibility. The arguments are integer
  arrays that broadcast against each other (numpy on the host, jnp in jitted
  code and inside Pallas kernels); the result is a boolean array of their
  broadcast shape (or broadcastable to it). Masks use only arithmetic,
  comparison and logical operators, so one definition serves all three places.
* ``segment_exempt(q_pos, k_pos, head)``: pairs that stay visible across packed
  documents (the AnchorAttention anchor). With segment ids the visibility is
  ``mask & (same_segment | segment_exempt)``. An exemption anywhere in a
  composed pattern applies to the whole pattern.
* ``block_bounds(grid)``: for every (head, query block, key block) a
  conservative pair ``(maybe_any, surely_all)``; exact for the primitives.

Composition: ``a | b`` (union) and ``a & b`` (intersection); ``PerHead`` gives
each head its own pattern. Packed documents are data (segment ids passed to
``attend``), not a pattern.

Window convention (the same as ``jax.nn.dot_product_attention``'s
``local_window_size``): ``SlidingWindow(left, right)`` lets query ``q`` see keys
``q - left <= k <= q + right``, so ``left=1023`` is a 1024-token causal window.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import numpy as np
import jax.numpy as jnp

Array = Any  # numpy or jax array of integer positions / booleans


def _true(*arrays):
  """A boolean array of the broadcast shape of ``arrays`` that is all True."""
  out = arrays[0] == arrays[0]
  for a in arrays[1:]:
    out = out & (a == a)
  return np.bool_(out) if isinstance(out, bool) else out


def _false(*arrays):
  return ~_true(*arrays)


def _xp(x):
  return np if isinstance(x, (np.ndarray, np.generic, int)) else jnp


class BlockGrid(NamedTuple):
  """The block grid that :meth:`Pattern.block_bounds` classifies.

  ``q_lo``/``q_hi`` ``[1, nq, 1]`` and ``k_lo``/``k_hi`` ``[1, 1, nk]`` are the
  absolute positions of each block's first and last *valid* token (inclusive);
  ``head`` is ``[H, 1, 1]`` (query heads). ``q_start``/``k_start`` are the
  absolute positions of the first query/key (ints, or traced scalars), and
  ``q_len``/``k_len`` the valid lengths.
  """
  q_lo: Array
  q_hi: Array
  k_lo: Array
  k_hi: Array
  head: Array
  block_q: int
  block_k: int
  q_start: Any
  k_start: Any
  q_len: int
  k_len: int


@dataclasses.dataclass(frozen=True)
class Pattern:
  """Base class. Subclasses implement :meth:`mask` and :meth:`block_bounds`."""

  def mask(self, q_pos: Array, k_pos: Array, head: Array = 0) -> Array:
    raise NotImplementedError

  def segment_exempt(self, q_pos: Array, k_pos: Array, head: Array = 0) -> Array:
    """Pairs visible even across different segments (default: none)."""
    return _false(q_pos, k_pos)

  def segment_exempt_bounds(self, g: BlockGrid) -> Array:
    """Per block: may it contain a segment-exempt pair (conservative)?"""
    return _false(g.q_lo, g.k_lo)

  def block_bounds(self, g: BlockGrid) -> tuple[Array, Array]:
    """``(maybe_any, surely_all)`` visibility per (head, q block, k block)."""
    raise NotImplementedError

  @property
  def has_segment_exemptions(self) -> bool:
    return False

  @property
  def head_dependent(self) -> bool:
    """Whether the mask differs between heads (metadata is then per head)."""
    return False

  @property
  def required_num_heads(self) -> int | None:
    """The number of query heads the pattern is written for (None: any)."""
    return None

  @property
  def in_kernel_mask(self) -> bool:
    """Whether ``mask`` is pure arithmetic (evaluable inside a GPU kernel)."""
    return True

  def dense_mask(self, q_len: int, k_len: int, q_offset: int = 0,
                 k_offset: int = 0, num_heads: int = 1) -> np.ndarray:
    """Dense numpy ``[num_heads, q_len, k_len]`` boolean mask (for tests)."""
    q_pos = q_offset + np.arange(q_len, dtype=np.int64)[None, :, None]
    k_pos = k_offset + np.arange(k_len, dtype=np.int64)[None, None, :]
    head = np.arange(num_heads, dtype=np.int64)[:, None, None]
    return np.broadcast_to(np.asarray(self.mask(q_pos, k_pos, head)),
                           (num_heads, q_len, k_len))

  def __or__(self, other: Pattern) -> Pattern:
    return Union((self, other))

  def __and__(self, other: Pattern) -> Pattern:
    return Intersection((self, other))


def _check_int(name: str, value, minimum: int = 0, allow_none: bool = False):
  if value is None and allow_none:
    return
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
    raise ValueError(f"{name}={value!r} is not allowed; expected {allowed}")


# ----------------------------------------------------------------- primitives


@dataclasses.dataclass(frozen=True)
class Full(Pattern):
  """Every query sees every key (bidirectional)."""

  def mask(self, q_pos, k_pos, head=0):
    return _true(q_pos, k_pos)

  def block_bounds(self, g):
    t = _true(g.q_lo, g.k_lo)
    return t, t


@dataclasses.dataclass(frozen=True)
class Causal(Pattern):
  """A query sees keys at the same or earlier positions."""

  def mask(self, q_pos, k_pos, head=0):
    return k_pos <= q_pos

  def block_bounds(self, g):
    return g.k_lo <= g.q_hi, g.k_hi <= g.q_lo


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Pattern):
  """Query ``q`` sees keys ``q - left <= k <= q + right`` (None: unbounded).

  ``SlidingWindow(left=W - 1)`` is a causal window of ``W`` tokens (Longformer,
  Mistral); ``right > 0`` makes it bidirectional.
  """
  left: int | None
  right: int | None = 0

  def __post_init__(self):
    _check_int("SlidingWindow.left", self.left, allow_none=True)
    _check_int("SlidingWindow.right", self.right, allow_none=True)

  def mask(self, q_pos, k_pos, head=0):
    out = _true(q_pos, k_pos)
    if self.left is not None:
      out = out & (q_pos - k_pos <= self.left)
    if self.right is not None:
      out = out & (k_pos - q_pos <= self.right)
    return out

  def block_bounds(self, g):
    d_min = g.q_lo - g.k_hi  # smallest q - k in the block
    d_max = g.q_hi - g.k_lo
    any_ = _true(g.q_lo, g.k_lo)
    all_ = any_
    if self.left is not None:
      any_ = any_ & (d_min <= self.left)
      all_ = all_ & (d_max <= self.left)
    if self.right is not None:
      any_ = any_ & (d_max >= -self.right)
      all_ = all_ & (d_min >= -self.right)
    return any_, all_


@dataclasses.dataclass(frozen=True)
class Sink(Pattern):
  """Keys at positions ``< num_tokens`` (attention sinks, Xiao et al. 2023).

  Not causal by itself: combine with ``Causal()``, or use :class:`SinkWindow`.
  """
  num_tokens: int

  def __post_init__(self):
    _check_int("Sink.num_tokens", self.num_tokens)

  def mask(self, q_pos, k_pos, head=0):
    return _true(q_pos) & (k_pos < self.num_tokens)

  def block_bounds(self, g):
    t = _true(g.q_lo, g.k_lo)
    return t & (g.k_lo < self.num_tokens), t & (g.k_hi < self.num_tokens)


@dataclasses.dataclass(frozen=True)
class QueryRange(Pattern):
  """Queries at positions ``start <= q < stop`` see every key (stop None: no end).

  Intersect with ``Causal()`` for dense causal rows (tri-shape's last queries).
  """
  start: int
  stop: int | None = None

  def __post_init__(self):
    _check_int("QueryRange.start", self.start)
    _check_int("QueryRange.stop", self.stop, allow_none=True)

  def mask(self, q_pos, k_pos, head=0):
    out = (q_pos >= self.start) & _true(k_pos)
    if self.stop is not None:
      out = out & (q_pos < self.stop)
    return out

  def block_bounds(self, g):
    t = _true(g.q_lo, g.k_lo)
    any_, all_ = t & (g.q_hi >= self.start), t & (g.q_lo >= self.start)
    if self.stop is not None:
      any_, all_ = any_ & (g.q_lo < self.stop), all_ & (g.q_hi < self.stop)
    return any_, all_


@dataclasses.dataclass(frozen=True)
class DocumentAnchor(Pattern):
  """The first ``num_tokens`` keys are visible (causally) to every document.

  AnchorAttention (Wang et al., 2024): in packed sequences the anchor token at
  position 0 is shared by all documents, so these pairs ignore segment ids.
  Use as ``Causal() | DocumentAnchor()``.
  """
  num_tokens: int = 1

  def __post_init__(self):
    _check_int("DocumentAnchor.num_tokens", self.num_tokens, minimum=1)

  def mask(self, q_pos, k_pos, head=0):
    return (k_pos < self.num_tokens) & (k_pos <= q_pos)

  def segment_exempt(self, q_pos, k_pos, head=0):
    return self.mask(q_pos, k_pos, head)

  def segment_exempt_bounds(self, g):
    return (g.k_lo < self.num_tokens) & (g.k_lo <= g.q_hi)

  def block_bounds(self, g):
    any_ = (g.k_lo < self.num_tokens) & (g.k_lo <= g.q_hi)
    all_ = (g.k_hi < self.num_tokens) & (g.k_hi <= g.q_lo)
    return any_, all_

  @property
  def has_segment_exemptions(self) -> bool:
    return True


# ------------------------------------------------------------ tile patterns


@dataclasses.dataclass(frozen=True)
class TilePattern(Pattern):
  """A mask that is constant on ``tile_q x tile_k`` tiles of absolute positions.

  Subclasses define ``tile_mask(q_tile, k_tile, head)`` on tile indices.
  Block bounds enumerate the tiles a kernel block overlaps, or use 2-D prefix
  sums over the tile grid when a block spans many tiles.
  """

  @property
  def tile_shape(self) -> tuple[int, int]:
    raise NotImplementedError

  def tile_mask(self, q_tile, k_tile, head):
    raise NotImplementedError

  def mask(self, q_pos, k_pos, head=0):
    tq, tk = self.tile_shape
    return self.tile_mask(q_pos // tq, k_pos // tk, head)

  def block_bounds(self, g):
    tq, tk = self.tile_shape
    span_q = (g.block_q - 1) // tq + 2
    span_k = (g.block_k - 1) // tk + 2
    if span_q * span_k <= 16:
      return self._bounds_by_enumeration(g, span_q, span_k)
    return self._bounds_by_prefix_sums(g)

  def _bounds_by_enumeration(self, g, span_q, span_k):
    tq, tk = self.tile_shape
    any_ = _false(g.q_lo, g.k_lo, g.head)
    all_ = _true(g.q_lo, g.k_lo, g.head)
    for dq in range(span_q):
      qt = g.q_lo // tq + dq
      q_valid = qt <= g.q_hi // tq
      for dk in range(span_k):
        kt = g.k_lo // tk + dk
        valid = q_valid & (kt <= g.k_hi // tk)
        m = self.tile_mask(qt, kt, g.head)
        any_ = any_ | (valid & m)
        all_ = all_ & (~valid | m)
    return any_, all_

  def _bounds_by_prefix_sums(self, g):
    xp = _xp(g.q_lo)
    tq, tk = self.tile_shape
    q0, k0 = g.q_start // tq, g.k_start // tk
    n_tq = (g.q_len + tq - 1) // tq + 1
    n_tk = (g.k_len + tk - 1) // tk + 1
    qt = q0 + xp.arange(n_tq)[None, :, None]
    kt = k0 + xp.arange(n_tk)[None, None, :]
    tiles = self.tile_mask(qt, kt, g.head)
    tiles = xp.broadcast_to(tiles, (tiles.shape[0], n_tq, n_tk)).astype(xp.int32)
    sums = xp.cumsum(xp.cumsum(tiles, axis=1), axis=2)
    sums = xp.pad(sums, ((0, 0), (1, 0), (1, 0)))
    a1, a2 = g.q_lo // tq - q0, g.q_hi // tq - q0 + 1
    b1, b2 = g.k_lo // tk - k0, g.k_hi // tk - k0 + 1
    a1, a2, b1, b2 = a1[0], a2[0], b1[0], b2[0]  # [nq, 1], [1, nk]
    count = (sums[:, a2, b2] - sums[:, a1, b2] - sums[:, a2, b1]
             + sums[:, a1, b1])
    area = (a2 - a1) * (b2 - b1)
    return count > 0, count == area


@dataclasses.dataclass(frozen=True)
class StridedBlocks(TilePattern):
  """Tile part of :class:`StridedBlockSparse` (not causal by itself).

  Key block ``j`` is visible from query block ``i`` if ``i - j < local_blocks``
  or ``j`` is on the head's stride: ``j % stride == head % stride`` (with
  ``head_offsets``; else ``j % stride == 0``). Heads in ``dense_heads`` see all.
  """
  block_size: int
  stride: int
  local_blocks: int = 1
  head_offsets: bool = True
  dense_heads: tuple[int, ...] = ()

  def __post_init__(self):
    _check_int("block_size", self.block_size, minimum=1)
    _check_int("stride", self.stride, minimum=1)
    _check_int("local_blocks", self.local_blocks, minimum=0)
    for h in self.dense_heads:
      _check_int("dense_heads entry", h)

  @property
  def tile_shape(self):
    return self.block_size, self.block_size

  def tile_mask(self, q_tile, k_tile, head):
    local = q_tile - k_tile < self.local_blocks
    if self.head_offsets:
      phase = (k_tile + self.stride - head % self.stride) % self.stride
    else:
      phase = k_tile % self.stride
    out = local | (phase == 0)
    for h in self.dense_heads:
      out = out | (head == h)
    return out

  @property
  def head_dependent(self):
    return self.head_offsets or bool(self.dense_heads)


@dataclasses.dataclass(frozen=True)
class ShiftedGroups(TilePattern):
  """LongLoRA's shifted sparse attention S²-Attn (Chen et al., 2023).

  Tokens attend within groups of ``group_size``; heads ``>= num_heads // 2``
  use groups shifted by half a group, so information flows between groups.
  (Positions are not rolled around the sequence end: the first shifted group
  is the half group ``[0, group_size / 2)``.) Not causal: ``& Causal()``.
  """
  group_size: int
  num_heads: int

  def __post_init__(self):
    _check_int("ShiftedGroups.group_size", self.group_size, minimum=2)
    if self.group_size % 2:
      raise ValueError(f"ShiftedGroups.group_size={self.group_size} must be even")
    _check_int("ShiftedGroups.num_heads", self.num_heads, minimum=2)

  @property
  def tile_shape(self):
    return self.group_size // 2, self.group_size // 2

  def tile_mask(self, q_tile, k_tile, head):
    shifted = head >= self.num_heads // 2
    unshifted = head < self.num_heads // 2
    plain = q_tile // 2 == k_tile // 2
    moved = (q_tile + 1) // 2 == (k_tile + 1) // 2
    return (shifted & moved) | (unshifted & plain)

  @property
  def head_dependent(self):
    return True

  @property
  def required_num_heads(self):
    return self.num_heads


@dataclasses.dataclass(frozen=True)
class BlockMask(TilePattern):
  """An explicit block mask: ``blocks[(head,) q // block_q, k // block_k]``.

  Build with :meth:`from_array`. Positions outside the table are masked. The
  mask is a table lookup, so the Pallas kernels accept it only when their
  blocks tile it exactly (every visited kernel block is then full).
  """
  block_q: int
  block_k: int
  shape: tuple[int, ...]
  data: bytes

  @classmethod
  def from_array(cls, blocks, block_q: int, block_k: int) -> BlockMask:
    blocks = np.asarray(blocks, dtype=bool)
    if blocks.ndim not in (2, 3):
      raise ValueError(f"BlockMask blocks must be [nq, nk] or [heads, nq, nk]; "
                       f"got shape {blocks.shape}")
    _check_int("BlockMask.block_q", block_q, minimum=1)
    _check_int("BlockMask.block_k", block_k, minimum=1)
    return cls(block_q, block_k, tuple(blocks.shape), np.packbits(blocks).tobytes())

  @functools.cached_property
  def table(self) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(self.data, np.uint8))
    table = bits[:int(np.prod(self.shape))].reshape(self.shape).astype(bool)
    return table if table.ndim == 3 else table[None]

  @property
  def tile_shape(self):
    return self.block_q, self.block_k

  def tile_mask(self, q_tile, k_tile, head):
    xp = _xp(q_tile)
    table = xp.asarray(self.table)
    h_n, nq, nk = table.shape
    inside = (q_tile >= 0) & (q_tile < nq) & (k_tile >= 0) & (k_tile < nk)
    h = head % h_n if h_n > 1 else head * 0
    vals = table[h, xp.clip(q_tile, 0, nq - 1), xp.clip(k_tile, 0, nk - 1)]
    return inside & vals

  @property
  def head_dependent(self):
    return len(self.shape) == 3 and self.shape[0] > 1

  @property
  def required_num_heads(self):
    return self.shape[0] if self.head_dependent else None

  @property
  def in_kernel_mask(self):
    return False


# --------------------------------------------------------------- composition


def _common_num_heads(parts) -> int | None:
  counts = {p.required_num_heads for p in parts} - {None}
  if len(counts) > 1:
    raise ValueError(f"composed patterns disagree on num_heads: {sorted(counts)}")
  return counts.pop() if counts else None


@dataclasses.dataclass(frozen=True)
class _Combination(Pattern):
  parts: tuple[Pattern, ...]

  def __post_init__(self):
    flat = []
    for p in self.parts:
      if not isinstance(p, Pattern):
        raise TypeError(f"cannot combine {p!r}: not a Pattern")
      flat.extend(p.parts if type(p) is type(self) else (p,))
    object.__setattr__(self, "parts", tuple(flat))
    _common_num_heads(self.parts)

  def segment_exempt(self, q_pos, k_pos, head=0):
    out = _false(q_pos, k_pos)
    for p in self.parts:
      if p.has_segment_exemptions:
        out = out | p.segment_exempt(q_pos, k_pos, head)
    return out

  def segment_exempt_bounds(self, g):
    out = _false(g.q_lo, g.k_lo)
    for p in self.parts:
      if p.has_segment_exemptions:
        out = out | p.segment_exempt_bounds(g)
    return out

  @property
  def has_segment_exemptions(self):
    return any(p.has_segment_exemptions for p in self.parts)

  @property
  def head_dependent(self):
    return any(p.head_dependent for p in self.parts)

  @property
  def required_num_heads(self):
    return _common_num_heads(self.parts)

  @property
  def in_kernel_mask(self):
    return all(p.in_kernel_mask for p in self.parts)


@dataclasses.dataclass(frozen=True)
class Union(_Combination):
  """Visible if any part says visible (``a | b``)."""

  def mask(self, q_pos, k_pos, head=0):
    out = self.parts[0].mask(q_pos, k_pos, head)
    for p in self.parts[1:]:
      out = out | p.mask(q_pos, k_pos, head)
    return out

  def block_bounds(self, g):
    any_, all_ = self.parts[0].block_bounds(g)
    for p in self.parts[1:]:
      a, b = p.block_bounds(g)
      any_, all_ = any_ | a, all_ | b  # all_: conservative
    return any_, all_


@dataclasses.dataclass(frozen=True)
class Intersection(_Combination):
  """Visible if every part says visible (``a & b``)."""

  def mask(self, q_pos, k_pos, head=0):
    out = self.parts[0].mask(q_pos, k_pos, head)
    for p in self.parts[1:]:
      out = out & p.mask(q_pos, k_pos, head)
    return out

  def block_bounds(self, g):
    any_, all_ = self.parts[0].block_bounds(g)
    for p in self.parts[1:]:
      a, b = p.block_bounds(g)
      any_, all_ = any_ & a, all_ & b  # any_: conservative
    return any_, all_


@dataclasses.dataclass(frozen=True)
class PerHead(Pattern):
  """Head ``h`` uses ``patterns[h]`` (e.g. dense retrieval heads + local heads)."""
  patterns: tuple[Pattern, ...]

  def __post_init__(self):
    object.__setattr__(self, "patterns", tuple(self.patterns))
    if not self.patterns:
      raise ValueError("PerHead needs at least one pattern")
    for p in self.patterns:
      if not isinstance(p, Pattern):
        raise TypeError(f"PerHead entry {p!r} is not a Pattern")
      if p.required_num_heads not in (None, len(self.patterns)):
        raise ValueError(f"PerHead has {len(self.patterns)} heads but {p!r} "
                         f"is written for {p.required_num_heads}")

  def _groups(self):
    groups: dict[Pattern, list[int]] = {}
    for h, p in enumerate(self.patterns):
      groups.setdefault(p, []).append(h)
    return groups.items()

  def _select(self, fn, default, head):
    out = default
    for p, heads in self._groups():
      is_h = head == heads[0]
      for h in heads[1:]:
        is_h = is_h | (head == h)
      out = out | (is_h & fn(p))
    return out

  def mask(self, q_pos, k_pos, head=0):
    return self._select(lambda p: p.mask(q_pos, k_pos, head),
                        _false(q_pos, k_pos), head)

  def segment_exempt(self, q_pos, k_pos, head=0):
    return self._select(lambda p: p.segment_exempt(q_pos, k_pos, head),
                        _false(q_pos, k_pos), head)

  def segment_exempt_bounds(self, g):
    return self._select(lambda p: p.segment_exempt_bounds(g),
                        _false(g.q_lo, g.k_lo), g.head)

  def block_bounds(self, g):
    bounds = {p: p.block_bounds(g) for p, _ in self._groups()}
    f = _false(g.q_lo, g.k_lo)
    return (self._select(lambda p: bounds[p][0], f, g.head),
            self._select(lambda p: bounds[p][1], f, g.head))

  @property
  def has_segment_exemptions(self):
    return any(p.has_segment_exemptions for p in self.patterns)

  @property
  def head_dependent(self):
    return True

  @property
  def required_num_heads(self):
    return len(self.patterns)

  @property
  def in_kernel_mask(self):
    return all(p.in_kernel_mask for p in self.patterns)


# -------------------------------------------------- named (expanded) patterns


@dataclasses.dataclass(frozen=True)
class _Named(Pattern):
  """A pattern defined by an expression of the primitives above."""

  def expand(self) -> Pattern:
    raise NotImplementedError

  @functools.cached_property
  def _expr(self) -> Pattern:
    return self.expand()

  def mask(self, q_pos, k_pos, head=0):
    return self._expr.mask(q_pos, k_pos, head)

  def segment_exempt(self, q_pos, k_pos, head=0):
    return self._expr.segment_exempt(q_pos, k_pos, head)

  def segment_exempt_bounds(self, g):
    return self._expr.segment_exempt_bounds(g)

  def block_bounds(self, g):
    return self._expr.block_bounds(g)

  @property
  def has_segment_exemptions(self):
    return self._expr.has_segment_exemptions

  @property
  def head_dependent(self):
    return self._expr.head_dependent

  @property
  def required_num_heads(self):
    return self._expr.required_num_heads

  @property
  def in_kernel_mask(self):
    return self._expr.in_kernel_mask


@dataclasses.dataclass(frozen=True)
class SinkWindow(_Named):
  """Causal sliding window of ``window`` earlier keys plus ``sink`` sink keys.

  StreamingLLM (Xiao et al., 2023); the "A-shape" of MInference / SCBench.
  Query ``q`` sees ``k <= q`` with ``q - k <= window`` or ``k < sink``.
  """
  sink: int
  window: int

  def __post_init__(self):
    _check_int("SinkWindow.sink", self.sink)
    _check_int("SinkWindow.window", self.window)

  def expand(self):
    return SlidingWindow(self.window, 0) | (Sink(self.sink) & Causal())


AShape = SinkWindow


@dataclasses.dataclass(frozen=True)
class TriShape(_Named):
  """A-shape (sink + window) plus dense causal rows for queries ``>= dense_from``.

  SCBench's tri-shape (Li et al., 2024): the last queries (e.g. the question
  after a long context) see the whole prefix.
  """
  sink: int
  window: int
  dense_from: int

  def __post_init__(self):
    _check_int("TriShape.sink", self.sink)
    _check_int("TriShape.window", self.window)
    _check_int("TriShape.dense_from", self.dense_from)

  def expand(self):
    return (SlidingWindow(self.window, 0) | (Sink(self.sink) & Causal())
            | (QueryRange(self.dense_from) & Causal()))


@dataclasses.dataclass(frozen=True)
class StridedBlockSparse(_Named):
  """Causal strided block-sparse attention (LongGen; S2-Attention).

  Keys are grouped in blocks of ``block_size``; query block ``i`` sees key
  blocks ``i - local_blocks < j <= i`` and every ``stride``-th block. With
  ``head_offsets`` head ``h`` takes the blocks ``j % stride == h % stride``,
  so ``stride`` heads together cover every block (S2-Attention's sharding of
  the context across heads); ``dense_heads`` are plain causal heads.
  """
  block_size: int = 64
  stride: int = 16
  local_blocks: int = 1
  head_offsets: bool = True
  dense_heads: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "dense_heads", tuple(self.dense_heads))
    self.expand()  # validates the arguments

  def expand(self):
    return Causal() & StridedBlocks(self.block_size, self.stride,
                                    self.local_blocks, self.head_offsets,
                                    self.dense_heads)


@dataclasses.dataclass(frozen=True)
class CausalShiftedGroups(_Named):
  """LongLoRA S²-Attn with causal masking inside groups (its LM training form)."""
  group_size: int
  num_heads: int

  def __post_init__(self):
    self.expand()  # validates the arguments

  def expand(self):
    return Causal() & ShiftedGroups(self.group_size, self.num_heads)


def pattern_density(pattern: Pattern, q_len: int, k_len: int,
                    num_heads: int = 1) -> float:
  """Fraction of visible (query, key) pairs, averaged over heads (exact)."""
  from lcjax.attention import block_mask  # local: block_mask imports patterns
  return block_mask.visible_count(pattern, q_len, k_len, num_heads) / (
      num_heads * q_len * k_len)
