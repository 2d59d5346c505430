"""Block-sparse metadata: which key blocks each query block visits, and back.

Kernels tile the ``[q_len, kv_len]`` score matrix into ``block_q x block_k``
blocks. For a pattern (and optionally segment ids) every block pair is one of

* ``SKIP = 0``: no visible pair; the kernel never touches it,
* ``PARTIAL = 1``: some pairs visible; the kernel applies the element mask,
* ``FULL = 2``: every pair visible and every token real (not padding); no
  element mask is needed.

Block ``i`` of the queries holds local rows ``[i * block_q, (i + 1) * block_q)``
(absolute positions ``q_offset + row``); rows ``>= q_len`` are padding, and
likewise for keys. A block that holds padding is never FULL.

Format (:class:`BlockMetadata`; numpy on the host, jnp on device)::

  kv_blocks  int32 [Bm, Hm, nq, Wk]  per query block, ascending key blocks to
                                     visit; entries >= kv_counts repeat the last
                                     visited block (0 if none)
  kv_counts  int32 [Bm, Hm, nq]      how many entries of kv_blocks are real
  kv_full    bool  [Bm, Hm, nq, Wk]  entry is FULL (False past the count)
  q_blocks   int32 [Bm, Hm, nk, Wq]  transposed lists for the dK/dV backward:
  q_counts   int32 [Bm, Hm, nk]      per key block, ascending query blocks
  q_full     bool  [Bm, Hm, nk, Wq]

``nq = ceil(q_len / block_q)``, ``nk = ceil(kv_len / block_k)``. ``Bm`` is the
batch size when segment ids were given, else 1; ``Hm`` is the number of query
heads when the pattern is head dependent (``pattern.head_dependent``), else 1:
index with ``[b if Bm > 1 else 0, h if Hm > 1 else 0]``. ``Wk``/``Wq`` are the
largest counts (at least 1) on the host path; on the device path they are the
static bounds passed in (default: the host bound, or nk/nq for traced offsets).

Two paths:

* :func:`block_metadata`: host-side numpy for static patterns and static
  offsets, cached with ``functools.lru_cache``. Exact: blocks that conservative
  bounds leave uncertain are checked element by element.
* :func:`block_metadata_device`: jnp, traceable. Takes traced offsets (ring
  attention) and segment ids (packed documents: a pair of blocks whose segment
  id ranges ``[min, max]`` do not overlap is skipped unless the pattern has
  segment-exempt pairs there, e.g. ``DocumentAnchor``; a pair is FULL only if
  the pattern says FULL and both blocks hold one and the same segment).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from lcjax.attention import patterns as P

SKIP, PARTIAL, FULL = 0, 1, 2

# Pattern types whose block_bounds are exact (no element-level refinement).
_EXACT_TYPES = (P.Full, P.Causal, P.SlidingWindow, P.Sink, P.QueryRange,
                P.DocumentAnchor, P.TilePattern)
_REFINE_BUDGET = 1 << 28  # element evaluations allowed for refinement


class BlockMetadata(NamedTuple):
  """See the module docstring for the layout."""
  kv_blocks: Any
  kv_counts: Any
  kv_full: Any
  q_blocks: Any
  q_counts: Any
  q_full: Any


def num_metadata_heads(pattern: P.Pattern, num_heads: int) -> int:
  """``Hm``: ``num_heads`` for head-dependent patterns, else 1."""
  required = pattern.required_num_heads
  if required is not None and required != num_heads:
    raise ValueError(f"pattern {pattern!r} is written for {required} query "
                     f"heads but the input has num_heads={num_heads}")
  return num_heads if pattern.head_dependent else 1


def _check_args(q_len, kv_len, block_q, block_k, num_heads):
  for name, v in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q),
                  ("block_k", block_k), ("num_heads", num_heads)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name}={v!r} must be a positive int")


def _grid(q_len, kv_len, block_q, block_k, q_offset, kv_offset, num_heads_m, xp):
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  qi, ki = xp.arange(nq), xp.arange(nk)
  q_lo = (q_offset + qi * block_q)[None, :, None]
  q_hi = (q_offset + xp.minimum((qi + 1) * block_q, q_len) - 1)[None, :, None]
  k_lo = (kv_offset + ki * block_k)[None, None, :]
  k_hi = (kv_offset + xp.minimum((ki + 1) * block_k, kv_len) - 1)[None, None, :]
  head = xp.arange(num_heads_m)[:, None, None]
  return P.BlockGrid(q_lo, q_hi, k_lo, k_hi, head, block_q, block_k,
                     q_offset, kv_offset, q_len, kv_len)


def _kind_from_bounds(any_, all_, q_len, kv_len, block_q, block_k, xp):
  """SKIP/PARTIAL/FULL; blocks with padding are at most PARTIAL."""
  nq, nk = any_.shape[-2:]
  q_whole = (xp.arange(nq) + 1) * block_q <= q_len
  k_whole = (xp.arange(nk) + 1) * block_k <= kv_len
  whole = q_whole[:, None] & k_whole[None, :]
  full = all_ & whole
  return xp.where(full, FULL, xp.where(any_, PARTIAL, SKIP)).astype(xp.int8)


def _is_exact(pattern: P.Pattern) -> bool:
  return isinstance(pattern, _EXACT_TYPES)


def _refine(pattern, kind, q_len, kv_len, block_q, block_k, q_offset, kv_offset):
  """Checks uncertain (PARTIAL) blocks element by element; returns exact kinds."""
  h_idx, q_idx, k_idx = np.nonzero(kind == PARTIAL)
  if h_idx.size * block_q * block_k > _REFINE_BUDGET:
    return kind  # conservative is still correct
  kind = kind.copy()
  rq, rk = np.arange(block_q), np.arange(block_k)
  chunk = max(1, (1 << 22) // (block_q * block_k))
  for s in range(0, h_idx.size, chunk):
    h, i, j = h_idx[s:s + chunk], q_idx[s:s + chunk], k_idx[s:s + chunk]
    q_loc = i[:, None, None] * block_q + rq[None, :, None]
    k_loc = j[:, None, None] * block_k + rk[None, None, :]
    valid = (q_loc < q_len) & (k_loc < kv_len)
    vis = np.asarray(pattern.mask(q_offset + q_loc, kv_offset + k_loc,
                                  h[:, None, None])) & valid
    any_ = vis.any(axis=(1, 2))
    whole = valid.all(axis=(1, 2))
    all_ = (vis | ~valid).all(axis=(1, 2)) & whole
    kind[h, i, j] = np.where(all_, FULL, np.where(any_, PARTIAL, SKIP))
  return kind


@functools.lru_cache(maxsize=256)
def _classify_host(pattern, q_len, kv_len, block_q, block_k, q_offset, kv_offset,
                   num_heads, refine=True):
  """(kind, exempt) numpy arrays; ``refine=False`` gives the bare bounds."""
  hm = num_metadata_heads(pattern, num_heads)
  g = _grid(q_len, kv_len, block_q, block_k, q_offset, kv_offset, hm, np)
  any_, all_ = pattern.block_bounds(g)
  shape = (hm, g.q_lo.shape[1], g.k_lo.shape[2])
  any_ = np.broadcast_to(any_, shape)
  all_ = np.broadcast_to(all_, shape) & any_
  kind = _kind_from_bounds(any_, all_, q_len, kv_len, block_q, block_k, np)
  if refine and not _is_exact(pattern):
    kind = _refine(pattern, kind, q_len, kv_len, block_q, block_k, q_offset,
                   kv_offset)
  exempt = np.broadcast_to(pattern.segment_exempt_bounds(g), shape) & (kind > 0)
  kind.setflags(write=False)
  exempt.setflags(write=False)
  return kind, exempt


def classify_blocks(pattern: P.Pattern, q_len: int, kv_len: int, block_q: int,
                    block_k: int, q_offset: int = 0, kv_offset: int = 0,
                    num_heads: int = 1) -> np.ndarray:
  """Exact SKIP/PARTIAL/FULL per block: numpy int8 ``[Hm, nq, nk]`` (cached)."""
  _check_args(q_len, kv_len, block_q, block_k, num_heads)
  return _classify_host(pattern, int(q_len), int(kv_len), int(block_q),
                        int(block_k), int(q_offset), int(kv_offset),
                        int(num_heads))[0]


def visit_lists(visit, full, width: int, xp=np):
  """Ascending indices of True entries of ``visit`` along the last axis.

  Returns ``(indices [..., width], count [...], full flags [..., width])``;
  entries past the count repeat the last index (0 if none).
  """
  count = visit.sum(axis=-1).astype(xp.int32)
  order = xp.argsort(~visit, axis=-1, stable=True)[..., :width].astype(xp.int32)
  n = order.shape[-1]
  if n < width:  # fewer blocks than the requested width
    order = xp.concatenate(
        [order, xp.broadcast_to(order[..., -1:], order.shape[:-1] + (width - n,))],
        axis=-1)
  slot = xp.arange(width, dtype=xp.int32)
  last = xp.take_along_axis(order, xp.maximum(count - 1, 0)[..., None], axis=-1)
  real = slot < count[..., None]
  idx = xp.where(real, order, xp.where(count[..., None] > 0, last, 0))
  is_full = xp.take_along_axis(full, idx, axis=-1) & real
  return idx.astype(xp.int32), count, is_full


def metadata_from_kind(kind, kv_width: int | None = None,
                       q_width: int | None = None) -> BlockMetadata:
  """Builds the visit lists from a ``[Bm, Hm, nq, nk]`` kind array."""
  xp = np if isinstance(kind, np.ndarray) else jnp
  visit, full = kind > SKIP, kind == FULL
  if kv_width is None:
    kv_width = max(1, int(visit.sum(-1).max()))
  if q_width is None:
    q_width = max(1, int(visit.sum(-2).max()))
  kv = visit_lists(visit, full, kv_width, xp)
  q = visit_lists(xp.swapaxes(visit, -1, -2), xp.swapaxes(full, -1, -2), q_width,
                  xp)
  return BlockMetadata(*kv, *q)


@functools.lru_cache(maxsize=256)
def _metadata_host(pattern, q_len, kv_len, block_q, block_k, q_offset, kv_offset,
                   num_heads):
  kind = classify_blocks(pattern, q_len, kv_len, block_q, block_k, q_offset,
                         kv_offset, num_heads)
  meta = metadata_from_kind(kind[None])
  for a in meta:
    a.setflags(write=False)
  return meta


def block_metadata(pattern: P.Pattern, q_len: int, kv_len: int, block_q: int,
                   block_k: int, q_offset: int = 0, kv_offset: int = 0,
                   num_heads: int = 1) -> BlockMetadata:
  """Host-side numpy metadata (``Bm = 1``) for static offsets; cached."""
  _check_args(q_len, kv_len, block_q, block_k, num_heads)
  if not all(isinstance(o, (int, np.integer)) for o in (q_offset, kv_offset)):
    raise TypeError("block_metadata needs static int offsets; use "
                    "block_metadata_device for traced ones")
  return _metadata_host(pattern, int(q_len), int(kv_len), int(block_q),
                        int(block_k), int(q_offset), int(kv_offset),
                        int(num_heads))


def static_int(x) -> int | None:
  """``x`` as a Python int if it is concrete, else None (traced)."""
  if isinstance(x, (int, np.integer)):
    return int(x)
  try:
    return int(x)
  except (jax.errors.ConcretizationTypeError, TypeError):
    return None


def _is_static(x) -> bool:
  return static_int(x) is not None


def _segment_ranges(seg_BxL, length, block):
  """Per block min and max segment id over real tokens: ``[B, n]`` each."""
  n = -(-length // block)
  pad = n * block - length
  valid = jnp.arange(n * block) < length
  seg = jnp.pad(seg_BxL.astype(jnp.int32), ((0, 0), (0, pad)))
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.where(valid, seg, big).reshape(-1, n, block).min(-1)
  hi = jnp.where(valid, seg, -big).reshape(-1, n, block).max(-1)
  return lo, hi


def classify_blocks_device(pattern: P.Pattern, q_len: int, kv_len: int,
                           block_q: int, block_k: int, q_offset=0, kv_offset=0,
                           num_heads: int = 1, q_segment_ids=None,
                           kv_segment_ids=None, exact: bool = True) -> jax.Array:
  """SKIP/PARTIAL/FULL as jnp int8 ``[Bm, Hm, nq, nk]`` (traceable).

  Static offsets with ``exact`` reuse the exact host classification (it
  enters the program as a constant); traced offsets, or ``exact=False``,
  evaluate the patterns' conservative block bounds on device (no constant:
  use this when the arrays are large, e.g. 128K tokens with per-head lists,
  since XLA embeds constants in the program).
  """
  _check_args(q_len, kv_len, block_q, block_k, num_heads)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if exact and _is_static(q_offset) and _is_static(kv_offset):
    kind, exempt = _classify_host(pattern, int(q_len), int(kv_len), int(block_q),
                                  int(block_k), int(q_offset), int(kv_offset),
                                  int(num_heads))
    kind, exempt = jnp.asarray(kind)[None], jnp.asarray(exempt)[None]
  else:
    hm = num_metadata_heads(pattern, num_heads)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    kv_offset = jnp.asarray(kv_offset, jnp.int32)
    g = _grid(q_len, kv_len, block_q, block_k, q_offset, kv_offset, hm, jnp)
    any_, all_ = pattern.block_bounds(g)
    shape = (hm, g.q_lo.shape[1], g.k_lo.shape[2])
    any_ = jnp.broadcast_to(any_, shape)
    all_ = jnp.broadcast_to(all_, shape) & any_
    kind = _kind_from_bounds(any_, all_, q_len, kv_len, block_q, block_k, jnp)[None]
    exempt = (jnp.broadcast_to(pattern.segment_exempt_bounds(g), shape) & any_)[None]
  if q_segment_ids is None:
    return kind
  q_lo, q_hi = _segment_ranges(q_segment_ids, q_len, block_q)
  k_lo, k_hi = _segment_ranges(kv_segment_ids, kv_len, block_k)
  q_lo, q_hi = q_lo[:, None, :, None], q_hi[:, None, :, None]
  k_lo, k_hi = k_lo[:, None, None, :], k_hi[:, None, None, :]
  overlap = (q_lo <= k_hi) & (k_lo <= q_hi)
  one_segment = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
  visit = (kind > SKIP) & (overlap | exempt)
  full = (kind == FULL) & one_segment
  return jnp.where(full, FULL, jnp.where(visit, PARTIAL, SKIP)).astype(jnp.int8)


def block_metadata_device(pattern: P.Pattern, q_len: int, kv_len: int,
                          block_q: int, block_k: int, q_offset=0, kv_offset=0,
                          num_heads: int = 1, q_segment_ids=None,
                          kv_segment_ids=None, kv_width: int | None = None,
                          q_width: int | None = None,
                          exact: bool = True) -> BlockMetadata:
  """Traceable metadata (jnp) for traced offsets and/or segment ids.

  ``kv_width``/``q_width`` are the static list widths; by default the host
  bound for static offsets (segments only remove visits), else ``nk``/``nq``.
  ``exact=False`` computes the classification on device even for static
  offsets (see :func:`classify_blocks_device`).
  """
  kind = classify_blocks_device(pattern, q_len, kv_len, block_q, block_k,
                                q_offset, kv_offset, num_heads, q_segment_ids,
                                kv_segment_ids, exact)
  nq, nk = kind.shape[-2:]
  if kv_width is None or q_width is None:
    if _is_static(q_offset) and _is_static(kv_offset):
      host = _classify_host(pattern, int(q_len), int(kv_len), int(block_q),
                            int(block_k), int(q_offset), int(kv_offset),
                            int(num_heads), exact)[0]
      visit = host > SKIP
      kv_width = max(1, int(visit.sum(-1).max())) if kv_width is None else kv_width
      q_width = max(1, int(visit.sum(-2).max())) if q_width is None else q_width
    else:
      kv_width = nk if kv_width is None else kv_width
      q_width = nq if q_width is None else q_width
  return metadata_from_kind(kind, kv_width, q_width)


def visible_count(pattern: P.Pattern, q_len: int, kv_len: int,
                  num_heads: int = 1, q_offset: int = 0, kv_offset: int = 0,
                  block: int = 64) -> int:
  """Exact number of visible (head, query, key) triples, summed over heads.

  FULL blocks count whole; PARTIAL blocks are evaluated element by element.
  """
  kind = classify_blocks(pattern, q_len, kv_len, block, block, q_offset,
                         kv_offset, num_heads)
  hm = kind.shape[0]
  total = int((kind == FULL).sum()) * block * block
  h_idx, q_idx, k_idx = np.nonzero(kind == PARTIAL)
  r = np.arange(block)
  chunk = max(1, (1 << 22) // (block * block))
  for s in range(0, h_idx.size, chunk):
    h, i, j = h_idx[s:s + chunk], q_idx[s:s + chunk], k_idx[s:s + chunk]
    q_loc = i[:, None, None] * block + r[None, :, None]
    k_loc = j[:, None, None] * block + r[None, None, :]
    valid = (q_loc < q_len) & (k_loc < kv_len)
    vis = np.asarray(pattern.mask(q_offset + q_loc, kv_offset + k_loc,
                                  h[:, None, None])) & valid
    total += int(vis.sum())
  return total * (num_heads // hm)
