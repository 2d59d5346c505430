"""Block-sparse flash attention for Hopper: Pallas Mosaic GPU forward and backward.

The fast path of ``lcjax.attention.attend`` on H100/H200. Same semantics as
``lcjax.attention.reference.dense_attention`` (GQA, fully-masked rows give zeros
and ``lse = -inf``), restricted by a declarative pattern that is turned into
block lists once per shape (``lcjax.attention.block_mask``):

* forward and dQ: for each 128-row query block, the 128-column key blocks it
  must visit, *full* blocks first, then *partial* ones (the only ones that pay
  for an element mask). Fully-masked blocks are never loaded.
* dK/dV: the transposed lists (for each key block, its query blocks).

Kernel structure (FlashAttention-3, Shah et al. 2024, as expressed by JAX's
``attention_mgpu`` example): per CTA two compute warpgroups of 64 query rows
and one producer warpgroup that streams K/V tiles with TMA into a ring of
shared-memory slots; wgmma with fp32 accumulators; exp2 softmax; ping-pong
scheduling so one warpgroup's softmax overlaps the other's matmuls. What
differs: the loop runs over the block list read from global memory, the
producer fetches the listed tiles, masks are evaluated from the pattern on
absolute positions only on partial tiles, and the backward has a dQ kernel
(per query tile, over its key list; it also computes delta = rowsum(O dO))
and a dK/dV kernel (per key tile, over the
transposed list, summing the GQA group's query heads in registers so K/V are
never repeated in memory).

GPU only (jax 0.11.2 ``plgpu`` API); tested on the H100 by
``tests/attention/test_mosaic_attention.py`` and ``python -m
pallas_kernels.mosaic_check``.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import block_mask

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_META_BLOCK = 128  # Query and key block size of the block lists.
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
_SUPPORTED_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes and CTA scheduling. Block lists are always 128x128."""
  block_q: int = 64          # forward rows per compute warpgroup (2 per CTA)
  block_kv: int = 128        # forward key tile
  stages: int = 2            # forward K/V ring depth
  block_kv_dq: int = 64      # dQ kernel key tile (64 rows of q per warpgroup);
  #   64 leaves room to double-buffer Q/dO across persistent items
  stages_dq: int = 2
  block_q_dkv: int = 64      # dK/dV kernel query tile (64 keys per warpgroup)
  stages_dkv: int = 2
  # Launch order of the CTAs of every kernel: "heaviest" (longest visit list
  # first, over all heads and batch rows) or "grid" (the first version's:
  # head-major, query tiles last-first, key tiles first-first).
  schedule: str = "heaviest"
  # dK/dV work splitting: -1 automatic (key tiles whose transposed lists are
  # far longer than the mean work per SM are split), 0 never, n > 0 split
  # every list longer than n entries into parts of at most n entries.
  dkv_split: int = -1
  # Persistent CTAs for host-built lists: at most ``num_sms`` CTAs, each
  # walks a run of work items and prefetches the next item's tiles while it
  # finishes the current one. False (and device-built lists, e.g. segment
  # ids): one CTA per work item, scheduled by the hardware.
  persistent: bool = True
  num_sms: int = 132         # H100 / H200: CTAs, and the automatic split
  # Order of the FULL query blocks each dK/dV item walks. "descending" lets
  # the long key columns of one head that start together (strided blocks:
  # same work class) read the same Q/dO rows at the same time instead of
  # 16 steps apart: strided 1/16 at 32K fwd+bwd 2.5-5% faster on the H100,
  # others unchanged (docs/mosaic_kernels.md, log item 6).
  dkv_order: str = "descending"
  # Host-built lists: in these kernels ("dq", "dkv") a warpgroup skips the
  # 64x64 quarter of a PARTIAL tile that has no visible pair (the
  # upper-right of a causal diagonal tile) and masks only the others, where
  # ``_quarter_skips_pay`` (sink+window 32K fwd+bwd -3-5% on the H100;
  # docs/mosaic_kernels.md, log item 8).
  skip_empty_quarters: tuple[str, ...] = ("dq", "dkv")
  # Host-built lists: when every PARTIAL tile's mask is the causal one on
  # that tile (strided blocks of 128 tokens, causal), the kernels compare
  # positions instead of evaluating the pattern, and when those tiles are
  # also on the diagonal they take positions and empty quarters from the
  # tile's own index instead of the lists (``_partial_masks``, log item 9).
  causal_partial_masks: bool = True

  def __post_init__(self):
    if 2 * self.block_q != _META_BLOCK or self.block_kv != _META_BLOCK:
      raise ValueError(f"forward tiles must be 2x{_META_BLOCK // 2} by "
                       f"{_META_BLOCK}, got {self}")
    for name in ("block_kv_dq", "block_q_dkv"):
      b = getattr(self, name)
      if b not in (64, 128):
        raise ValueError(f"{name}={b}; allowed: 64, 128")
    if self.schedule not in ("heaviest", "grid"):
      raise ValueError(f"schedule={self.schedule!r}; allowed: 'heaviest', "
                       "'grid'")
    if self.dkv_order not in ("ascending", "descending"):
      raise ValueError(f"dkv_order={self.dkv_order!r}; allowed: 'ascending', "
                       "'descending'")
    if not set(self.skip_empty_quarters) <= {"dq", "dkv"}:
      raise ValueError(f"skip_empty_quarters={self.skip_empty_quarters!r}; "
                       "allowed: a tuple of 'dq' and/or 'dkv'")
    if self.dkv_split < -1:
      raise ValueError(f"dkv_split={self.dkv_split}; allowed: -1 (automatic), "
                       "0 (never) or a positive cap")
    if self.num_sms < 1:
      raise ValueError(f"num_sms={self.num_sms} must be positive")


DEFAULT_CONFIG = Config()


# ----------------------------------------------------------------------------
# Block lists (from lcjax.attention.block_mask), reordered full-first.
# ----------------------------------------------------------------------------


class Lists(NamedTuple):
  """Visit lists of one direction, full blocks first (kernel input).

  ``blocks[b, h, i, :count[b, h, i]]`` are the blocks row block ``i`` visits
  (``b``/``h`` index batch/head when segment ids / head-dependent patterns
  make the lists differ, else have size 1); the first ``num_full`` of them
  need no element mask. ``empty_quarters`` (host lists, or None): for the
  PARTIAL entry ``num_full + p``, bit ``2 * query_half + key_half`` of
  ``empty_quarters[b, h, i, p]`` is set when that 64x64 quarter of the
  128x128 tile has no visible pair (``_empty_quarters``).
  """
  blocks: Any    # int32 [Bm, Hm, rows, width]
  num_full: Any  # int32 [Bm, Hm, rows]
  count: Any     # int32 [Bm, Hm, rows]
  empty_quarters: Any = None  # int32 [Bm, Hm, rows, max PARTIAL] or None


def _full_first(blocks, full, count, descending: bool = False) -> Lists:
  """Stable-sorts each list so that FULL blocks precede PARTIAL ones;
  ``descending`` reverses the (ascending) order of the FULL ones."""
  xp = np if isinstance(blocks, np.ndarray) else jnp
  order = xp.argsort(~full, axis=-1, stable=True)
  num_full = full.sum(-1)
  if descending:
    i = xp.arange(blocks.shape[-1])
    nf = num_full[..., None]
    order = xp.take_along_axis(order, xp.where(i < nf, nf - 1 - i, i), axis=-1)
  blocks = xp.take_along_axis(blocks, order, axis=-1)
  return Lists(blocks.astype(xp.int32), num_full.astype(xp.int32),
               count.astype(xp.int32))


def _empty_quarters(pattern, lists: Lists, rows_are_queries: bool,
                    q_len: int, kv_len: int, q_offset: int, kv_offset: int,
                    heads: int) -> np.ndarray:
  """``Lists.empty_quarters`` of host lists (FULL entries first).

  The 64x64 classification of the pattern (exact, like the 128x128 one),
  read at each PARTIAL entry's four quarters; quarters past the sequence
  ends count as empty (their rows or keys are padding).
  """
  half = _META_BLOCK // 2
  empty = block_mask.classify_blocks(pattern, q_len, kv_len, half, half,
                                     q_offset, kv_offset,
                                     heads) == block_mask.SKIP
  rows, width = lists.blocks.shape[2:]
  nq, nk = 2 * -(-q_len // _META_BLOCK), 2 * -(-kv_len // _META_BLOCK)
  empty = np.pad(empty, [(0, 0), (0, nq - empty.shape[1]),
                         (0, nk - empty.shape[2])], constant_values=True)
  n_partial = max(1, int((lists.count - lists.num_full).max()))
  p = np.arange(n_partial)
  entry = np.minimum(lists.num_full[..., None] + p, width - 1)
  other = np.take_along_axis(lists.blocks, entry, axis=-1)   # [Bm,Hm,rows,P]
  row = np.arange(rows)[None, None, :, None]
  qi, ki = (row, other) if rows_are_queries else (other, row)
  h = np.arange(lists.blocks.shape[1])[None, :, None, None]
  h = h if empty.shape[0] > 1 else 0 * h
  bits = np.zeros(other.shape, np.int32)
  for qh in range(2):
    for kh in range(2):
      bits |= empty[h, 2 * qi + qh, 2 * ki + kh].astype(np.int32) << (
          2 * qh + kh)
  real = lists.num_full[..., None] + p < lists.count[..., None]
  return np.where(real, bits, 0).astype(np.int32)


def _quarter_skips_pay(lists: Lists, min_len: int) -> bool:
  """Whether a kernel walking ``lists`` should skip empty quarters.

  The branch slows every step a little (dense causal dQ +6% on the H100),
  so PARTIAL entries must be at least 1/32 of all; and most of them must
  sit in lists of ``min_len``+ entries: items of one or two entries (the
  diagonal dK/dV items of strided patterns) are bound by their own loads,
  and there the branch cost more than the quarter saved (dK/dV +6%).
  """
  partial = lists.count - lists.num_full
  n_partial = int(partial.sum())
  in_long = int((partial * (lists.count >= min_len)).sum())
  return 32 * n_partial >= int(lists.count.sum()) and 2 * in_long >= n_partial


def _quarters_empty(bits, q_half, k_half):
  """Whether the quarters ``(q_half, k_half)`` of ``Lists.empty_quarters``
  bits are all empty (in-kernel; a half of None means both halves)."""
  empty = None
  for qh in (0, 1) if q_half is None else (q_half,):
    for kh in (0, 1) if k_half is None else (k_half,):
      bit = lax.shift_right_logical(bits, 2 * qh + kh) & 1 == 1
      empty = bit if empty is None else empty & bit
  return empty


@dataclasses.dataclass(frozen=True)
class PartialMasks:
  """How the kernels mask PARTIAL tiles (static; decided on the host).

  ``kind``: "pattern" evaluates ``pattern.mask`` on positions; "causal"
  compares ``q_pos >= k_pos`` (every PARTIAL tile shows exactly the causal
  pairs); "diagonal" also knows each PARTIAL tile is the diagonal one, key
  tile = query tile + ``shift``, so a masked step computes the other tile's
  positions from its own tile index instead of reading the block list, and
  the empty 64x64 quarter (query half 0, key half 1) needs no bits.
  ``skips``: kernels ("dq", "dkv") that skip that quarter in diagonal mode.
  """
  kind: str = "pattern"
  shift: int = 0
  skips: tuple[str, ...] = ()


def _partial_masks(pattern, kind, q_len: int, kv_len: int, q_offset: int,
                   kv_offset: int) -> PartialMasks:
  """``PartialMasks`` of the PARTIAL tiles of ``kind`` (``[Hm, nq, nk]``,
  128x128), checked element by element on the host, once per shape.

  The pattern's mask arithmetic (e.g. strided block-sparse: block ids,
  stride phase, per-head offset) costs about 4% of strided 1/16 at 32K
  (log item 7); a position comparison almost nothing.
  """
  heads, qi, ki = np.nonzero(kind == block_mask.PARTIAL)
  if not len(heads):
    return PartialMasks()
  b = _META_BLOCK
  q_last = np.minimum(qi * b + b, q_len) - 1 + q_offset
  if (q_last < ki * b + kv_offset).any():
    return PartialMasks()  # a PARTIAL tile above the diagonal: not causal
  rows = np.arange(b)
  for h in np.unique(heads):
    tiles = np.nonzero(heads == h)[0]
    for chunk in np.array_split(tiles, -(-len(tiles) // 256)):
      q_loc = qi[chunk, None, None] * b + rows[:, None]
      k_loc = ki[chunk, None, None] * b + rows[None, :]
      q_pos, k_pos = q_loc + q_offset, k_loc + kv_offset
      visible = np.asarray(pattern.mask(q_pos, k_pos, int(h)))
      real = (q_loc < q_len) & (k_loc < kv_len)
      if (real & (visible != (q_pos >= k_pos))).any():
        return PartialMasks()
  shift, rem = divmod(q_offset - kv_offset, b)
  if rem == 0 and (ki - qi == shift).all():
    return PartialMasks("diagonal", int(shift))
  return PartialMasks("causal")


def _step_skippable(st: "_Statics", kernel: str, masked: bool, bits,
                    q_half, k_half):
  """In-kernel: whether a warpgroup may skip this step (its 64x64 quarter
  of a PARTIAL tile is empty), or None when the step never skips.

  ``bits()`` reads the entry's ``Lists.empty_quarters`` bits (None when the
  lists carry none); in diagonal mode the quarter follows from the halves.
  """
  if not masked:
    return None
  if bits is not None:
    return _quarters_empty(bits(), q_half, k_half)
  if kernel in st.partial.skips:
    return _diagonal_quarter_empty(q_half, k_half)
  return None


def _diagonal_quarter_empty(q_half, k_half):
  """In-kernel: whether the 64x64 quarter of an aligned causal diagonal tile
  is empty (queries 0-63 against keys 64-127); None: both halves."""
  if q_half is None or k_half is None:
    return None  # a query or key half that is never empty: no skip
  return (q_half == 0) & (k_half == 1)


def _lists(meta: block_mask.BlockMetadata, cfg: Config) -> tuple[Lists, Lists]:
  return (_full_first(meta.kv_blocks, meta.kv_full, meta.kv_counts),
          _full_first(meta.q_blocks, meta.q_full, meta.q_counts,
                      descending=cfg.dkv_order == "descending"))


# ----------------------------------------------------------------------------
# CTA schedules: which (batch, head, tile) each CTA runs, heaviest first, and
# the dK/dV work split.
# ----------------------------------------------------------------------------

# Fixed cost of one CTA (launch, first loads, epilogue) in units of one list
# entry (a 128x128 block): ~6 us vs ~3.5 us per dK/dV entry on the H100.
_ITEM_OVERHEAD = 2
_MIN_PART = 8  # automatic split: no part shorter than this many entries


class KvSchedule(NamedTuple):
  """dK/dV work items (kernel input) and the merge of split key tiles.

  Item ``i`` is ``items[i] = (b, kv head, key tile, start, end, slot)``: the
  CTA walks entries ``[start, end)`` of the concatenation of the GQA group's
  transposed lists (query head ``kvh * G + 0``'s list, then ``+ 1``'s, ...)
  for that key tile. ``slot < 0``: the item is the whole tile and writes dK/dV
  directly; else it writes float32 partial sums to partial slot ``slot`` =
  ``tile_index * max_parts + part``, and ``merge_tiles[tile_index]`` names the
  split tile, ``merge_valid[tile_index, part]`` says which parts exist.
  Without split tiles both merge arrays are empty and the kernel has no
  partial outputs. Items are in per-CTA order (see ``CtaWork``).
  """
  items: Any        # int32 [n_items, 6]
  bounds: Any       # int32 [num_ctas + 1]
  merge_tiles: Any  # int32 [n_split, 3]: b, kv head, key tile
  merge_valid: Any  # bool  [n_split, max_parts]


class CtaWork(NamedTuple):
  """Work items in per-CTA order: CTA ``c`` runs ``items[bounds[c]:bounds[c + 1]]``."""
  items: Any   # int32 [n_items, k]
  bounds: Any  # int32 [num_ctas + 1]


def _assign_to_ctas(items, work, cfg: Config) -> CtaWork:
  """Groups ``items`` (with ``work`` in list entries each) into CTA runs.

  Host (numpy) work with ``cfg.persistent``: ``min(num_sms, n)`` CTAs, by
  greedy list scheduling in the given order (heaviest classes first, grid
  order inside): each item goes to the CTA with the least work so far (fixed
  cost per item included). That is what the hardware's CTA scheduler does
  with one CTA per item, so CTAs running at the same time still work on
  neighbouring tiles of one head (shared K/V or Q/dO in L2); an exact
  longest-first order spread them over all heads and made dense causal 13%
  slower on the H100. ``schedule="grid"``: plain round robin instead.

  Device (traced) work, or ``persistent=False``: one CTA per item. A static
  deal of device-built lists (the count per CTA must be static, so round
  robin) measured slower than the hardware's dynamic scheduling on the H100:
  packed 4K documents at 32K +23% forward, strided 1/16 at 128K +8% fwd+bwd.
  """
  n = items.shape[0]
  if not cfg.persistent or n <= 1 or not isinstance(work, np.ndarray):
    xp = np if isinstance(work, np.ndarray) else jnp
    return CtaWork(items, xp.arange(n + 1, dtype=xp.int32))
  num_ctas = min(cfg.num_sms, n)
  if cfg.schedule == "grid":
    owner = np.arange(n) % num_ctas
  else:
    cost = work.astype(np.float64) + _ITEM_OVERHEAD
    owner = np.empty(n, np.int64)
    heap = [(0.0, c) for c in range(num_ctas)]
    for i in range(n):
      load, c = heapq.heappop(heap)
      owner[i] = c
      heapq.heappush(heap, (load + cost[i], c))
  # Each CTA's items, in the given order, one CTA after the other.
  by_cta = np.argsort(owner, kind="stable")
  bounds = np.concatenate([[0], np.cumsum(np.bincount(owner,
                                                      minlength=num_ctas))])
  return CtaWork(items[by_cta], bounds.astype(np.int32))


def _grid_order(shape, reverse_last: bool, xp):
  """Index arrays (a, tile, b) of ``shape = (A, n, B)`` in the first version's
  launch order: ``A`` slowest, tiles (reversed if asked), batch fastest."""
  a, t, b = xp.meshgrid(*(xp.arange(n, dtype=xp.int32) for n in shape),
                        indexing="ij")
  if reverse_last:
    t = shape[1] - 1 - t
  return a.reshape(-1), t.reshape(-1), b.reshape(-1)


def _heaviest_first(work, xp):
  """Stable permutation that launches CTAs heaviest first, by classes of
  work within a factor of 2 (``work`` + fixed cost, in entries).

  The classes keep the grid order inside (head-major, neighbouring tiles
  together), so CTAs running at the same time still share the K/V (or Q/dO)
  tiles of one head in L2 as in the grid order, while no CTA more than twice
  as long as another starts after it: a long list cannot start late and run
  alone at the end (the tail that made the dK/dV kernel of strided and
  sink+window patterns slow; the grid order launches the last head's heavy
  tiles last).
  """
  fp = work.astype(xp.float32) + _ITEM_OVERHEAD
  return xp.argsort(-xp.frexp(fp)[1], stable=True)


def _row_schedule(counts, batch: int, heads: int, cfg: Config) -> CtaWork:
  """Forward / dQ work: int32 rows (b, head, query tile) per CTA.

  ``counts [Bm, Hm, n]``: list lengths per query tile (numpy or jnp); see
  ``_heaviest_first`` for the ``"heaviest"`` order and ``_assign_to_ctas``.
  """
  xp = np if isinstance(counts, np.ndarray) else jnp
  n = counts.shape[-1]
  h, t, b = _grid_order((heads, n, batch), True, xp)
  work = xp.broadcast_to(counts, (batch, heads, n))[b, h, t]
  if cfg.schedule == "heaviest":
    order = _heaviest_first(work, xp)
    h, t, b, work = h[order], t[order], b[order], work[order]
  rows = xp.stack([b, h, t], axis=-1).astype(xp.int32)
  return _assign_to_ctas(rows, work, cfg)


def _group_counts(counts, batch: int, heads: int, kv_heads: int):
  """Total transposed-list length per (b, kv head, key tile): ``[B, KH, nk]``."""
  xp = np if isinstance(counts, np.ndarray) else jnp
  nk = counts.shape[-1]
  c = xp.broadcast_to(counts, (batch, heads, nk))
  return c.reshape(batch, kv_heads, heads // kv_heads, nk).sum(2)


def _split_sizes(total, cfg: Config) -> tuple[float, int]:
  """(threshold, part size): lists longer than the threshold are split.

  Automatic: a list heavier than the mean work per SM (3/4 of it with one
  CTA per item, where a launch order cannot keep a CTA free for it) would end
  late even when started first, so it is cut into parts of at most half the
  mean (never shorter than ``_MIN_PART`` entries). Lists below the threshold
  stay whole: splitting costs a float32 partial write and read per part, and
  the shared memory of their staging buffer, which otherwise double-buffers
  K/V across persistent items (without it each short item waits for its
  store and then for its K/V load: ~15 us per one-entry item on the H100).
  """
  if cfg.dkv_split == 0:
    return math.inf, 0
  if cfg.dkv_split > 0:
    return cfg.dkv_split, cfg.dkv_split
  w = np.asarray(total, np.float64)
  mean = (w.sum() + w.size * _ITEM_OVERHEAD) / cfg.num_sms
  threshold = mean if cfg.persistent else 0.75 * mean
  return max(_MIN_PART, threshold), max(_MIN_PART, int(0.5 * mean))


def _kv_schedule(counts, batch: int, heads: int, kv_heads: int,
                 cfg: Config) -> KvSchedule:
  """dK/dV work items from transposed-list lengths ``counts [Bm, Hm, nk]``.

  Host (numpy) counts may split long lists; device (traced) counts give one
  item per key tile (the number of items must be static), ordered only.
  """
  xp = np if isinstance(counts, np.ndarray) else jnp
  total = _group_counts(counts, batch, heads, kv_heads)  # [B, KH, nk]
  nk = total.shape[-1]
  kvh, kt, b = _grid_order((kv_heads, nk, batch), False, xp)
  w = total[b, kvh, kt]
  threshold, size = (_split_sizes(total, cfg) if xp is np else (math.inf, 0))
  split = w > threshold
  if xp is np and split.any():
    parts = np.where(split, -(-w // max(size, 1)), 1)
    max_parts = int(parts.max())
    tile_index = np.cumsum(split) - 1
    rep = np.repeat(np.arange(w.size), parts)       # item -> tile (grid order)
    part = np.arange(rep.size) - np.repeat(np.cumsum(parts) - parts, parts)
    n = parts[rep]
    start = (part * w[rep]) // n
    end = ((part + 1) * w[rep]) // n
    slot = np.where(split[rep], tile_index[rep] * max_parts + part, -1)
    items = np.stack([b[rep], kvh[rep], kt[rep], start, end, slot], axis=-1)
    merge_tiles = np.stack([b, kvh, kt], axis=-1)[split]
    merge_valid = np.arange(max_parts)[None, :] < parts[split][:, None]
  else:
    zero = xp.zeros_like(w)
    items = xp.stack([b, kvh, kt, zero, w, zero - 1], axis=-1)
    merge_tiles = np.zeros((0, 3), np.int32)
    merge_valid = np.zeros((0, 1), bool)
  items = items.astype(xp.int32)
  if cfg.schedule == "heaviest":
    items = items[_heaviest_first(items[:, 4] - items[:, 3], xp)]
  work = _assign_to_ctas(items, items[:, 4] - items[:, 3], cfg)
  return KvSchedule(work.items, work.bounds, merge_tiles.astype(np.int32),
                    merge_valid)


def _merge_split_tiles(d, partials, sched: KvSchedule):
  """Writes the sums of the float32 parts of split key tiles into ``d``.

  ``d [B, S, KH, H]`` holds the unsplit tiles (the kernel leaves split tiles
  unwritten); ``partials [n_split * max_parts, 128, H]``.
  """
  n_split, max_parts = sched.merge_valid.shape
  if n_split == 0:
    return d
  B, S, KH, H = d.shape
  parts = partials.reshape(n_split, max_parts, _META_BLOCK, H)
  tiles = jnp.where(sched.merge_valid[:, :, None, None], parts, 0.0).sum(1)
  b, kvh, kt = (sched.merge_tiles[:, i] for i in range(3))
  d5 = d.reshape(B, S // _META_BLOCK, _META_BLOCK, KH, H)
  d5 = d5.at[b, kt, :, kvh, :].set(tiles.astype(d.dtype))
  return d5.reshape(B, S, KH, H)


def _item_bounds(start, end, offset, num_full, count):
  """The part of an item's range ``[start, end)`` (over the concatenated
  lists of a GQA group) that falls in one head's list, which occupies
  ``[offset, offset + count)`` and has ``num_full`` FULL entries first.

  Returns ``(lo, mid, hi)`` in entries of that head's list: FULL entries
  ``[lo, mid)``, PARTIAL entries ``[mid, hi)``. Works on ints and traced
  int32 scalars (kernel and emulation share it).
  """
  lo = jnp.minimum(jnp.maximum(start - offset, 0), count)
  hi = jnp.minimum(jnp.maximum(end - offset, 0), count)
  mid = jnp.minimum(jnp.maximum(num_full, lo), hi)
  return lo, mid, hi


# ----------------------------------------------------------------------------
# Support check.
# ----------------------------------------------------------------------------


def supports(q_shape, k_shape, dtype, pattern, has_segments: bool,
             softcap: float | None) -> str | None:
  """None if ``mosaic_attention`` can run this, else the reason it cannot."""
  del has_segments, softcap  # Both supported.
  if len(q_shape) != 4 or len(k_shape) != 4:
    return f"q{tuple(q_shape)} / k{tuple(k_shape)} must be 4-D [B, L, heads, D]"
  _, t, n, h = q_shape
  _, s, kh, _ = k_shape
  if jnp.dtype(dtype) not in map(jnp.dtype, _SUPPORTED_DTYPES):
    return f"dtype {jnp.dtype(dtype).name} not in (bfloat16, float16)"
  if h not in _SUPPORTED_HEAD_DIMS:
    return f"head_dim {h} not in {_SUPPORTED_HEAD_DIMS}"
  if n % kh:
    return f"num_heads {n} is not a multiple of num_kv_heads {kh}"
  if not pattern.in_kernel_mask:
    meta = block_mask.block_metadata(pattern, t, s, _META_BLOCK, _META_BLOCK,
                                     num_heads=n)
    if (meta.kv_full.sum(-1) < meta.kv_counts).any():
      return (f"{type(pattern).__name__} is a table lookup that does not tile "
              f"into {_META_BLOCK}x{_META_BLOCK} blocks")
  try:
    _gpu_modules()
  except ImportError as e:  # pragma: no cover - depends on the jax build
    return f"Mosaic GPU Pallas is unavailable: {e}"
  device = jax.devices()[0]
  if device.platform != "gpu":
    return f"Mosaic GPU kernel needs a GPU, default device is {device.platform}"
  cc = str(getattr(device, "compute_capability", "9.0"))
  if not cc.startswith("9"):
    return f"needs a Hopper GPU (sm_90), found compute capability {cc}"
  return None


@functools.lru_cache(maxsize=1)
def _gpu_modules():
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  return pl, plgpu


# ----------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Statics:
  """Everything a kernel specialises on besides shapes."""
  pattern: Any
  scale: float
  softcap: float | None
  cfg: Config
  kv_len: int          # real keys; later ones are padding (masked)
  has_partial: bool    # False: no element mask anywhere (masked loop omitted)
  has_segments: bool
  partial: PartialMasks = PartialMasks()


def _compiler_params(plgpu):
  return plgpu.CompilerParams(
      approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _smem_transforms(plgpu):
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _logits(s, st: _Statics):
  """Scaled (and soft-capped) logits in log2 units, and tanh for the VJP."""
  if st.softcap is None:
    return s * (st.scale * _LOG2E), None
  t = jnp.tanh(s * (st.scale / st.softcap))
  return t * (st.softcap * _LOG2E), t


def _visible(st: _Statics, plgpu, shape, q_axis: int, q_local0, k_local0,
             offsets, head, q_seg=None, kv_seg=None):
  """Visibility of a tile whose axis ``q_axis`` runs over queries.

  ``q_local0``/``k_local0``: first query/key row of the tile (0-based);
  ``offsets``: absolute position of row 0 (q, kv); ``q_seg``/``kv_seg``:
  segment ids along the query/key axis of the tile.
  """
  wgmma = plgpu.Layout.WGMMA
  q_loc = plgpu.broadcasted_iota(jnp.int32, shape, q_axis, layout=wgmma)
  k_loc = plgpu.broadcasted_iota(jnp.int32, shape, 1 - q_axis, layout=wgmma)
  q_loc = q_loc + q_local0
  k_loc = k_loc + k_local0
  q_pos, k_pos = q_loc + offsets[0], k_loc + offsets[1]
  if st.partial.kind != "pattern":
    vis = q_pos >= k_pos
  else:
    vis = st.pattern.mask(q_pos, k_pos, head)
  if st.has_segments:
    same = (lax.broadcast_in_dim(q_seg, shape, [q_axis])
            == lax.broadcast_in_dim(kv_seg, shape, [1 - q_axis]))
    if st.pattern.has_segment_exemptions:
      same = same | st.pattern.segment_exempt(q_pos, k_pos, head)
    vis = vis & same
  if st.kv_len % _META_BLOCK:
    vis = vis & (k_loc < st.kv_len)
  return vis


def _mask_logits(s, st: _Statics, plgpu, q_axis: int, q_local0, k_local0,
                 offsets, head, own_seg, other_seg_ref):
  """Logits ``s`` of a PARTIAL tile with its invisible pairs set to -inf.

  ``q_axis``: the axis of ``s`` that runs over queries; ``own_seg``: segment
  ids of the item's own rows (queries in the forward and dQ, keys in dK/dV;
  loaded once per item); ``other_seg_ref()``: the ref of the ids along the
  tile's other axis, loaded here. Both are unused without segment ids.
  """
  other_seg = None
  if st.has_segments:
    other_seg = plgpu.load(other_seg_ref(),
                           layout=plgpu.Layout.WGMMA.reduce(0),
                           optimized=False)
  q_seg, kv_seg = ((own_seg, other_seg) if q_axis == 0
                   else (other_seg, own_seg))
  vis = _visible(st, plgpu, s.shape, q_axis, q_local0, k_local0, offsets,
                 head, q_seg, kv_seg)
  return jnp.where(vis, s, -jnp.inf)


def _list_index(lists_shape, b, h):
  """Batch / head index into lists with broadcast (size-1) dimensions."""
  bm = b if lists_shape[0] > 1 else 0
  hm = h if lists_shape[1] > 1 else 0
  return bm, hm


# Shared memory per CTA on sm_90 (227 KiB) less a reserve for what Mosaic
# adds to our buffers (barriers, alignment): the forward with a 3-deep ring
# (224.5 KiB of buffers) overflowed by 120 bytes.
_SMEM_LIMIT = 227 * 1024 - 4096


def _num_buffers(fixed_bytes: int, per_item_bytes: int) -> int:
  """2 if the per-item inputs fit twice (the next item's inputs then load
  while this one runs), else 1."""
  return 2 if fixed_bytes + 2 * per_item_bytes <= _SMEM_LIMIT else 1


def _item_loop(first, last, num_buffers: int, load, body, init):
  """Runs ``carry = body(idx, buf, carry)`` over a CTA's items ``[first, last)``.

  ``load(idx, buf)`` issues the TMA loads of item ``idx``'s own inputs (Q
  rows, or K/V rows) into buffer ``buf``; an item stages its output in the
  buffer of its inputs. Before an item starts, the previous item's output
  store must have read its staging buffer; with two buffers the next item's
  inputs are loaded while this one runs, with one they are loaded first.
  Waits for every store at the end.
  """
  pl, plgpu = _gpu_modules()
  if num_buffers == 2:
    pl.when(first < last)(lambda: load(first, 0))

  def item(idx, carry):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    if num_buffers == 1:
      load(idx, 0)
      return body(idx, 0, carry)
    buf = lax.rem(idx - first, jnp.int32(2))
    pl.when(idx + 1 < last)(lambda: load(idx + 1, 1 - buf))
    return body(idx, buf, carry)

  carry = lax.fori_loop(first, last, item, init)
  plgpu.wait_smem_to_gmem(0)
  return carry


def _ring_load(step, stages: int, copies) -> None:
  """Producer side of a ring of ``stages`` shared-memory slots.

  Step ``step`` of the CTA (counted across its items) loads into slot
  ``step % stages``; every load but the CTA's first ``stages`` first waits
  until the consumers have freed the slot. ``copies()`` gives the
  (gmem source, smem ring, full barriers, free barriers) of the step; a copy
  whose free barriers are None waits for nothing of its own (an earlier copy
  of the step waited for the slot), and copies that share full barriers
  arrive on them together (barriers with one arrival per copy: one wait
  covers them all).
  """
  pl, plgpu = _gpu_modules()
  slot = lax.rem(step, jnp.int32(stages))
  for src, smem, bar, free in copies():
    if free is not None:
      @pl.when(step >= stages)
      def _():
        plgpu.barrier_wait(free.at[slot])  # pylint: disable=cell-var-from-loop
    plgpu.copy_gmem_to_smem(src, smem.at[slot], bar.at[slot])


def _forward(q, k, v, q_seg, kv_seg, offsets, rows: CtaWork, lists: Lists,
             st: _Statics):
  """Returns (out [B,T,N,H], lse [B,N,T] float32, natural log).

  Each CTA walks its run of ``rows`` ((b, head, query tile) items); the K/V
  ring's step counter runs on across items, so the producer streams the
  next item's tiles while the consumers finish the current one.
  """
  pl, plgpu = _gpu_modules()
  B, T, N, H = q.shape
  KH = k.shape[2]
  G = N // KH
  cfg = st.cfg
  bq, bk, ns = cfg.block_q, cfg.block_kv, cfg.stages
  dtype = q.dtype
  f32 = jnp.float32
  ROW = plgpu.Layout.WGMMA.reduce(1)
  WGMMA = plgpu.Layout.WGMMA
  size = jnp.dtype(dtype).itemsize
  nbuf = _num_buffers(2 * ns * bk * H * size + 2 * bq * 4, 2 * bq * H * size)

  def kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, off_ref, rows_ref,
             bounds_ref, blk_ref, nfull_ref, cnt_ref, _quarters_ref, out_ref,
             lse_ref, q_smems, k_smem, v_smem, lse_smem2, kv_bar, q_bar,
             k_free, v_free, sched):
    cta = lax.axis_index("ctas")
    first, last = bounds_ref[cta], bounds_ref[cta + 1]
    wg = lax.axis_index("wg")

    def item_info(idx):
      b, h, qt = (rows_ref[idx, i] for i in range(3))
      bm, hm = _list_index(blk_ref.shape, b, h)
      return b, h, qt, bm, hm

    def sched_barrier():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      lse_smem = lse_smem2.at[wg]
      offs = (off_ref[0], off_ref[1])

      def load_q(idx, buf):
        b, h, qt, _, _ = item_info(idx)
        q_row0 = qt * (2 * bq) + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_row0, bq), h],
                                q_smems.at[2 * buf + wg],
                                q_bar.at[2 * buf + wg])

      def run_item(idx, buf, g0):
        b, h, qt, bm, hm = item_info(idx)
        n_full = nfull_ref[bm, hm, qt]
        n_tot = cnt_ref[bm, hm, qt]
        q_smem = q_smems.at[2 * buf + wg]
        q_row0 = qt * (2 * bq) + wg * bq
        q_seg = None
        if st.has_segments and st.has_partial:
          q_seg = plgpu.load(qseg_ref.at[b, pl.ds(q_row0, bq)], layout=ROW,
                             optimized=False)
        plgpu.barrier_wait(q_bar.at[2 * buf + wg])
        m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, f32), ROW)
        l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, f32), ROW)
        acc = plgpu.layout_cast(jnp.full((bq, H), 0.0, f32), WGMMA)

        @pl.when(n_tot > 0)
        def _():
          plgpu.barrier_wait(kv_bar.at[lax.rem(g0, jnp.int32(ns))])

        pl.when(wg == 1)(sched_barrier)

        def step(t, carry, masked: bool):
          acc, m_i, l_i = carry
          slot = lax.rem(g0 + t, jnp.int32(ns))

          def compute_qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
            sched_barrier()
            return acc_ref[...]

          s = pl.run_scoped(compute_qk, plgpu.ACC((bq, bk), f32))
          plgpu.barrier_arrive(k_free.at[slot])
          s, _ = _logits(s, st)
          if masked:
            if st.partial.kind == "diagonal":
              k_row0 = (qt + st.partial.shift) * bk
            else:
              k_row0 = blk_ref[bm, hm, qt, t] * bk
            s = _mask_logits(s, st, plgpu, 0, q_row0, k_row0, offs, h, q_seg,
                             lambda: kvseg_ref.at[b, pl.ds(k_row0, bk)])
          m_new = jnp.maximum(m_i, s.max(axis=1))
          if masked:  # A row may have seen no visible key yet.
            m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new)
          else:
            m_sub = m_new
          alpha = jnp.exp2(m_i - m_sub)
          p = jnp.exp2(s - lax.broadcast_in_dim(m_sub, s.shape, [0]))
          acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
          l_i *= alpha
          p16 = p.astype(dtype)
          l_i += p.sum(axis=1)
          acc, l_i, m_new, p16 = lax.optimization_barrier(
              (acc, l_i, m_new, p16))
          plgpu.barrier_arrive(sched)
          plgpu.barrier_wait(sched)

          def compute_pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
            nxt = t + 1

            @pl.when(nxt < n_tot)
            def _():
              plgpu.barrier_wait(kv_bar.at[lax.rem(g0 + nxt, jnp.int32(ns))])

          acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
          plgpu.barrier_arrive(v_free.at[slot])
          return acc, m_new, l_i

        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False),
                              carry)
        if st.has_partial:
          carry = lax.fori_loop(n_full, n_tot,
                                functools.partial(step, masked=True), carry)
        acc, m_i, l_i = carry
        pl.when(wg == 0)(sched_barrier)

        empty = l_i == 0.0
        l_safe = jnp.where(empty, 1.0, l_i)
        acc *= lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
        q_smem[...] = acc.astype(dtype)
        lse_smem[...] = jnp.where(empty, -jnp.inf, m_i * _LN2 + jnp.log(l_safe))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(q_row0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_row0, bq)])
        return g0 + n_tot

      _item_loop(first, last, nbuf, load_q, run_item, jnp.int32(0))

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def run_item(idx, g0):
        b, h, qt, bm, hm = item_info(idx)
        n_tot = cnt_ref[bm, hm, qt]
        kvh = lax.div(h, jnp.int32(G))

        @pl.loop(0, n_tot)
        def _(t):
          def copies():
            rows = (b, pl.ds(blk_ref[bm, hm, qt, t] * bk, bk), kvh)
            return ((k_ref.at[rows], k_smem, kv_bar, k_free),
                    (v_ref.at[rows], v_smem, kv_bar, v_free))
          _ring_load(g0 + t, ns, copies)

        return g0 + n_tot

      lax.fori_loop(first, last, run_item, jnp.int32(0))

  tr = _smem_transforms(plgpu)
  scratch = [
      plgpu.SMEM((2 * nbuf, bq, H), dtype, transforms=tr),
      plgpu.SMEM((ns, bk, H), dtype, transforms=tr),
      plgpu.SMEM((ns, bk, H), dtype, transforms=tr),
      plgpu.SMEM((2, bq), f32),
      # One barrier per ring slot for its K and V tiles (one arrival per
      # copy; log item 19); they are freed separately, K after QK^T.
      plgpu.Barrier(num_arrivals=2, num_barriers=ns),
      plgpu.Barrier(num_barriers=2 * nbuf),
      plgpu.Barrier(num_arrivals=2, num_barriers=ns),
      plgpu.Barrier(num_arrivals=2, num_barriers=ns),
      plgpu.Barrier(num_arrivals=2),
  ]
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((B, N, T), f32)],
      scratch_types=scratch,
      grid=(rows.bounds.shape[0] - 1,),
      grid_names=("ctas",),
      num_threads=3,
      thread_name="wg",
      kernel_name="lcjax_attention_fwd",
      compiler_params=_compiler_params(plgpu),
  )(q, k, v, q_seg, kv_seg, offsets, rows.items, rows.bounds, *lists)


def _backward_dq(q, k, v, do, out, lse2, dlse, q_seg, kv_seg, offsets,
                 rows: CtaWork, lists: Lists, st: _Statics):
  """dQ: per 128-row query tile (items of ``rows``), over its key list.

  Persistent like ``_forward``. Also computes delta = rowsum(out * do) - dlse
  (``dlse`` may be None) for the dK/dV kernel: the producer streams each
  item's ``out`` rows through the K/V ring as one extra step, where they
  meet ``do`` already in shared memory, instead of an XLA pass reading
  ``out`` and ``do`` from HBM again. Returns (dq [B,T,N,H], delta [B,N,T]).
  """
  pl, plgpu = _gpu_modules()
  B, T, N, H = q.shape
  KH = k.shape[2]
  G = N // KH
  cfg = st.cfg
  bq = _META_BLOCK // 2
  bk, ns = cfg.block_kv_dq, cfg.stages_dq
  split = _META_BLOCK // bk
  dtype = q.dtype
  f32 = jnp.float32
  ROW = plgpu.Layout.WGMMA.reduce(1)
  WGMMA = plgpu.Layout.WGMMA
  size = jnp.dtype(dtype).itemsize
  nbuf = _num_buffers(2 * ns * bk * H * size,
                      2 * (2 * bq * H * size + 2 * bq * 4))
  n_inputs = 3 if dlse is None else 4  # Q, dO, lse (and dlse) per item

  def o_ring(smem):
    """The K or V ring's first 64 rows per slot, which hold a warpgroup's
    ``out`` in an item's first step."""
    return smem if bk == bq else smem.at[:, pl.ds(0, bq)]

  def kernel(q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, dlse_ref, qseg_ref,
             kvseg_ref, off_ref, rows_ref, bounds_ref, blk_ref, nfull_ref,
             cnt_ref, quarters_ref, dq_ref, delta_ref, q_smems, do_smems,
             lse_smems, delta_smems, k_smem, v_smem, in_bar, kv_bar, kv_free):
    cta = lax.axis_index("ctas")
    first, last = bounds_ref[cta], bounds_ref[cta + 1]
    wg = lax.axis_index("wg")

    def item_info(idx):
      b, h, qt = (rows_ref[idx, i] for i in range(3))
      bm, hm = _list_index(blk_ref.shape, b, h)
      return b, h, qt, bm, hm

    def kv_row0(bm, hm, qt, t):
      blk = blk_ref[bm, hm, qt, lax.div(t, jnp.int32(split))]
      return blk * _META_BLOCK + lax.rem(t, jnp.int32(split)) * bk

    def masked_kv_row0(bm, hm, qt, t):
      if st.partial.kind != "diagonal":
        return kv_row0(bm, hm, qt, t)
      return ((qt + st.partial.shift) * _META_BLOCK
              + lax.rem(t, jnp.int32(split)) * bk)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      offs = (off_ref[0], off_ref[1])
      # Per item and warpgroup; delta_smems holds dlse on the way in (with an
      # lse cotangent) and the item's delta on the way out.
      smems = (q_smems, do_smems, lse_smems, delta_smems)

      def load_inputs(idx, buf):
        b, h, qt, _, _ = item_info(idx)
        rows = pl.ds(qt * _META_BLOCK + wg * bq, bq)
        srcs = (q_ref.at[b, rows, h], do_ref.at[b, rows, h],
                lse_ref.at[b, h, rows])
        if dlse_ref is not None:
          srcs += (dlse_ref.at[b, h, rows],)
        for src, dst in zip(srcs, smems):
          plgpu.copy_gmem_to_smem(src, dst.at[2 * buf + wg],
                                  in_bar.at[2 * buf + wg])

      def run_item(idx, buf, g0):
        b, h, qt, bm, hm = item_info(idx)
        n_full = nfull_ref[bm, hm, qt] * split
        n_tot = cnt_ref[bm, hm, qt] * split
        q_smem, do_smem, lse_smem, delta_smem = (s.at[2 * buf + wg]
                                                 for s in smems)
        q_row0 = qt * _META_BLOCK + wg * bq
        rows = pl.ds(q_row0, bq)
        q_seg = None
        if st.has_segments and st.has_partial:
          q_seg = plgpu.load(qseg_ref.at[b, rows], layout=ROW, optimized=False)
        plgpu.barrier_wait(in_bar.at[2 * buf + wg])
        lse = plgpu.load(lse_smem, layout=ROW)

        # Step 0 of the item: its ``out`` rows, warpgroup 0's in the K slot,
        # warpgroup 1's in the V slot; delta = <out, dO> per row.
        slot0 = lax.rem(g0, jnp.int32(ns))
        plgpu.barrier_wait(kv_bar.at[slot0])

        def row_dot(o_smem):
          o = o_smem[...].astype(f32)
          return (o * do_smem[...].astype(f32)).sum(axis=1)

        delta = lax.cond(wg == 0, lambda: row_dot(o_ring(k_smem).at[slot0]),
                         lambda: row_dot(o_ring(v_smem).at[slot0]))
        plgpu.barrier_arrive(kv_free.at[slot0])
        delta = plgpu.layout_cast(delta, ROW)
        if dlse_ref is not None:
          delta = delta - plgpu.load(delta_smem, layout=ROW)
        delta_smem[...] = delta
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(delta_smem, delta_ref.at[b, h, rows])
        dq = plgpu.layout_cast(jnp.full((bq, H), 0.0, f32), WGMMA)

        def step(t, dq, masked: bool):
          slot = lax.rem(g0 + 1 + t, jnp.int32(ns))
          plgpu.barrier_wait(kv_bar.at[slot])  # K and V

          def probs(s):
            s, tanh = _logits(s, st)
            if masked:
              k_row0 = masked_kv_row0(bm, hm, qt, t)
              s = _mask_logits(s, st, plgpu, 0, q_row0, k_row0, offs, h, q_seg,
                               lambda: kvseg_ref.at[b, pl.ds(k_row0, bk)])
            return jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0])), tanh

          # S and dP in one wgmma group: one wait per step fewer than S,
          # softmax, dP (H100: dQ kernel 5-12% faster, log item 6).
          def accumulate(dq):
            def compute_s_dp(refs):
              s_ref, dp_ref = refs
              plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
              plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].T)
              return s_ref[...], dp_ref[...]

            s, dp = pl.run_scoped(compute_s_dp, (plgpu.ACC((bq, bk), f32),
                                                 plgpu.ACC((bq, bk), f32)))
            p, tanh = probs(s)
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            if tanh is not None:
              ds = ds * (1.0 - tanh * tanh)

            def compute_dq(acc_ref):
              plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

            return pl.run_state(compute_dq)(plgpu.ACC.init(dq))

          # This warpgroup's query half against the step's key half(s).
          bits = None if quarters_ref is None else (
              lambda: quarters_ref[bm, hm, qt, lax.div(t - n_full, split)])
          empty = _step_skippable(
              st, "dq", masked, bits, q_half=wg,
              k_half=lax.rem(t, jnp.int32(2)) if split == 2 else None)
          if empty is not None:
            dq = lax.cond(empty, lambda dq: dq, accumulate, dq)
          else:
            dq = accumulate(dq)
          plgpu.barrier_arrive(kv_free.at[slot])
          return dq

        dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False),
                           dq)
        if st.has_partial:
          dq = lax.fori_loop(n_full, n_tot,
                             functools.partial(step, masked=True), dq)
        q_smem[...] = (dq * st.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
        return g0 + 1 + n_tot

      _item_loop(first, last, nbuf, load_inputs, run_item, jnp.int32(0))

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def run_item(idx, g0):
        b, h, qt, bm, hm = item_info(idx)
        n_tot = cnt_ref[bm, hm, qt] * split
        kvh = lax.div(h, jnp.int32(G))

        def out_copies():
          o_src = lambda w: o_ref.at[b, pl.ds(qt * _META_BLOCK + w * bq, bq), h]
          return ((o_src(0), o_ring(k_smem), kv_bar, kv_free),
                  (o_src(1), o_ring(v_smem), kv_bar, None))
        _ring_load(g0, ns, out_copies)

        @pl.loop(0, n_tot)
        def _(t):
          def copies():
            rows = (b, pl.ds(kv_row0(bm, hm, qt, t), bk), kvh)
            return ((k_ref.at[rows], k_smem, kv_bar, kv_free),
                    (v_ref.at[rows], v_smem, kv_bar, None))
          _ring_load(g0 + 1 + t, ns, copies)

        return g0 + 1 + n_tot

      lax.fori_loop(first, last, run_item, jnp.int32(0))

  tr = _smem_transforms(plgpu)
  scratch = [
      plgpu.SMEM((2 * nbuf, bq, H), dtype, transforms=tr),
      plgpu.SMEM((2 * nbuf, bq, H), dtype, transforms=tr),
      plgpu.SMEM((2 * nbuf, bq), f32),
      plgpu.SMEM((2 * nbuf, bq), f32),
      plgpu.SMEM((ns, bk, H), dtype, transforms=tr),
      plgpu.SMEM((ns, bk, H), dtype, transforms=tr),
      # One barrier per buffer for all of an item's inputs, one per ring slot
      # for its K and V tiles (one arrival per copy): one wait each.
      plgpu.Barrier(num_arrivals=n_inputs, num_barriers=2 * nbuf),
      plgpu.Barrier(num_arrivals=2, num_barriers=ns),
      plgpu.Barrier(num_arrivals=2, num_barriers=ns),  # freed by both WGs
  ]
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((B, N, T), f32)),
      scratch_types=scratch,
      grid=(rows.bounds.shape[0] - 1,),
      grid_names=("ctas",),
      num_threads=3,
      thread_name="wg",
      kernel_name="lcjax_attention_dq",
      compiler_params=_compiler_params(plgpu),
  )(q, k, v, do, out, lse2, dlse, q_seg, kv_seg, offsets, rows.items,
    rows.bounds, *lists)


def _backward_dkv(q, k, v, do, lse2, delta, q_seg, kv_seg, offsets,
                  lists: Lists, sched: KvSchedule, st: _Statics):
  """dK, dV per work item of ``sched``: a key tile of 128 rows and a range of
  its transposed lists over the GQA group's query heads. Persistent like
  ``_forward`` (the Q/dO ring's step counter runs on across items).

  Returns (dk, dv, dk_parts, dv_parts): dk/dv [B,S,KH,H] hold the tiles of
  unsplit items (split tiles are left unwritten); the parts are float32
  ``[n_split * max_parts, 128, H]`` partial sums of split tiles, or None when
  nothing is split (then the kernel has no partial outputs at all).
  """
  pl, plgpu = _gpu_modules()
  B, T, N, H = q.shape
  KH = k.shape[2]
  G = N // KH
  cfg = st.cfg
  bk = _META_BLOCK // 2
  bq, ns = cfg.block_q_dkv, cfg.stages_dkv
  split = _META_BLOCK // bq
  n_slots = int(np.prod(sched.merge_valid.shape))
  dtype = q.dtype
  f32 = jnp.float32
  ROW = plgpu.Layout.WGMMA.reduce(1)
  COL = plgpu.Layout.WGMMA.reduce(0)
  WGMMA = plgpu.Layout.WGMMA
  size = jnp.dtype(dtype).itemsize
  ring_bytes = ns * 2 * (bq * H * size + bq * 4)
  part_bytes = 2 * bk * H * 4 if n_slots else 0
  nbuf = _num_buffers(ring_bytes + part_bytes, 2 * 2 * bk * H * size)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
             kvseg_ref, off_ref, items_ref, bounds_ref, blk_ref, nfull_ref,
             cnt_ref, quarters_ref, *outs_and_scratch):
    if n_slots:
      dk_ref, dv_ref, dkp_ref, dvp_ref, *scratch = outs_and_scratch
      part_smem2, *scratch = scratch
    else:
      dk_ref, dv_ref, *scratch = outs_and_scratch
    (k_smems, v_smems, q_smem, do_smem, lse_smem, delta_smem,
     kv_bar, in_bar, in_free) = scratch
    cta = lax.axis_index("ctas")
    first, last = bounds_ref[cta], bounds_ref[cta + 1]
    wg = lax.axis_index("wg")

    def item_info(idx):
      return tuple(items_ref[idx, i] for i in range(6))

    def head_lists(b, kvh, kt, g):
      hq = kvh * G + g
      bm, hm = _list_index(blk_ref.shape, b, hq)
      return hq, bm, hm, nfull_ref[bm, hm, kt], cnt_ref[bm, hm, kt]

    def q_row0(bm, hm, kt, j):
      blk = blk_ref[bm, hm, kt, lax.div(j, jnp.int32(split))]
      return blk * _META_BLOCK + lax.rem(j, jnp.int32(split)) * bq

    def masked_q_row0(bm, hm, kt, j):
      if st.partial.kind != "diagonal":
        return q_row0(bm, hm, kt, j)
      return ((kt - st.partial.shift) * _META_BLOCK
              + lax.rem(j, jnp.int32(split)) * bq)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      offs = (off_ref[0], off_ref[1])
      zeros = plgpu.layout_cast(jnp.full((bk, H), 0.0, f32), WGMMA)

      def load_kv(idx, buf):
        b, kvh, kt, *_ = item_info(idx)
        rows = pl.ds(kt * _META_BLOCK + wg * bk, bk)
        for ref, smems in ((k_ref, k_smems), (v_ref, v_smems)):
          plgpu.copy_gmem_to_smem(ref.at[b, rows, kvh], smems.at[2 * buf + wg],
                                  kv_bar.at[2 * buf + wg])

      def run_item(idx, buf, t0):
        b, kvh, kt, start, end, part_slot = item_info(idx)
        k_smem, v_smem = k_smems.at[2 * buf + wg], v_smems.at[2 * buf + wg]
        k_row0 = kt * _META_BLOCK + wg * bk
        rows = pl.ds(k_row0, bk)
        kv_seg = None
        if st.has_segments and st.has_partial:
          kv_seg = plgpu.load(kvseg_ref.at[b, rows], layout=ROW,
                              optimized=False)
        plgpu.barrier_wait(kv_bar.at[2 * buf + wg])

        def step(j, carry, hq, bm, hm, n_full, masked: bool):
          dk, dv, t = carry
          slot = lax.rem(t, jnp.int32(ns))
          plgpu.barrier_wait(in_bar.at[slot])  # Q, dO, lse and delta

          def probs_t(s_t):
            s_t, tanh = _logits(s_t, st)
            if masked:
              q0 = masked_q_row0(bm, hm, kt, j)
              s_t = _mask_logits(s_t, st, plgpu, 1, q0, k_row0, offs, hq,
                                 kv_seg, lambda: qseg_ref.at[b, pl.ds(q0, bq)])
            lse = plgpu.load(lse_smem.at[slot], layout=COL)
            lse_t = lax.broadcast_in_dim(lse, s_t.shape, [1])
            return jnp.exp2(s_t - lse_t), tanh

          def accumulate(dk_dv):
            dk, dv = dk_dv

            def compute_st(acc_ref):
              plgpu.wgmma(acc_ref, k_smem, q_smem.at[slot].T)
              return acc_ref[...]

            s_t = pl.run_scoped(compute_st, plgpu.ACC((bk, bq), f32))

            # The softmax of S^T runs while dP^T = V dO^T is in flight (H100:
            # dK/dV kernel 5-9% faster than in between, log item 6).
            def compute_dpt_and_p(acc_ref):
              plgpu.wgmma(acc_ref, v_smem, do_smem.at[slot].T)
              p_t, tanh = probs_t(s_t)
              return acc_ref[...], p_t, tanh

            dp_t, p_t, tanh = pl.run_scoped(compute_dpt_and_p,
                                            plgpu.ACC((bk, bq), f32))
            delta = plgpu.load(delta_smem.at[slot], layout=COL)
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
            if tanh is not None:
              ds_t = ds_t * (1.0 - tanh * tanh)

            def compute_dv_dk(refs):
              dv_ref, dk_ref = refs
              plgpu.wgmma(dv_ref, p_t.astype(dtype), do_smem.at[slot])
              plgpu.wgmma(dk_ref, ds_t.astype(dtype), q_smem.at[slot])

            dv, dk = pl.run_state(compute_dv_dk)(
                (plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
            return dk, dv

          # The step's query half(s) against this warpgroup's key half.
          bits = None if quarters_ref is None else (
              lambda: quarters_ref[bm, hm, kt,
                                   lax.div(j, jnp.int32(split)) - n_full])
          empty = _step_skippable(
              st, "dkv", masked, bits,
              q_half=lax.rem(j, jnp.int32(2)) if split == 2 else None,
              k_half=wg)
          if empty is not None:
            dk, dv = lax.cond(empty, lambda dk_dv: dk_dv, accumulate, (dk, dv))
          else:
            dk, dv = accumulate((dk, dv))
          plgpu.barrier_arrive(in_free.at[slot])
          return dk, dv, t + 1

        def head(g, carry):
          dk, dv, t, offset = carry
          hq, bm, hm, n_full, n_tot = head_lists(b, kvh, kt, g)
          lo, mid, hi = _item_bounds(start, end, offset, n_full, n_tot)
          body = functools.partial(step, hq=hq, bm=bm, hm=hm, n_full=n_full)
          acc = (dk, dv, t)
          acc = lax.fori_loop(lo * split, mid * split,
                              functools.partial(body, masked=False), acc)
          if st.has_partial:
            acc = lax.fori_loop(mid * split, hi * split,
                                functools.partial(body, masked=True), acc)
          return (*acc, offset + n_tot)

        dk, dv, t, _ = lax.fori_loop(
            0, G, head, (zeros, zeros, t0, jnp.int32(0)))
        dk = dk * st.scale

        def store_tile():
          k_smem[...] = dk.astype(dtype)
          v_smem[...] = dv.astype(dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, rows, kvh],
                                  commit_group=False)
          plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, rows, kvh],
                                  commit_group=False)
          plgpu.commit_smem_to_gmem_group()

        if not n_slots:
          store_tile()
          return t
        pl.when(part_slot < 0)(store_tile)

        @pl.when(part_slot >= 0)
        def _store_part():  # float32, one staging buffer: dK, then dV
          part_smem = part_smem2.at[wg]
          part_rows = pl.ds(wg * bk, bk)
          for acc, dst in ((dk, dkp_ref), (dv, dvp_ref)):
            part_smem[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(part_smem, dst.at[part_slot, part_rows])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        return t

      _item_loop(first, last, nbuf, load_kv, run_item, jnp.int32(0))

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def head(g, carry, b, kvh, kt, start, end):
        t, offset = carry
        hq, bm, hm, n_full, n_tot = head_lists(b, kvh, kt, g)
        lo, _, hi = _item_bounds(start, end, offset, n_full, n_tot)

        def issue(j, t):
          def copies():
            cols = pl.ds(q_row0(bm, hm, kt, j), bq)
            return ((q_ref.at[b, cols, hq], q_smem, in_bar, in_free),
                    (lse_ref.at[b, hq, cols], lse_smem, in_bar, None),
                    (do_ref.at[b, cols, hq], do_smem, in_bar, None),
                    (delta_ref.at[b, hq, cols], delta_smem, in_bar, None))
          _ring_load(t, ns, copies)
          return t + 1

        return lax.fori_loop(lo * split, hi * split, issue, t), offset + n_tot

      def run_item(idx, t):
        b, kvh, kt, start, end, _ = item_info(idx)
        item_head = functools.partial(head, b=b, kvh=kvh, kt=kt, start=start,
                                      end=end)
        return lax.fori_loop(0, G, item_head, (t, jnp.int32(0)))[0]

      lax.fori_loop(first, last, run_item, jnp.int32(0))

  tr = _smem_transforms(plgpu)
  scratch = [
      plgpu.SMEM((2 * nbuf, bk, H), dtype, transforms=tr),
      plgpu.SMEM((2 * nbuf, bk, H), dtype, transforms=tr),
      plgpu.SMEM((ns, bq, H), dtype, transforms=tr),
      plgpu.SMEM((ns, bq, H), dtype, transforms=tr),
      plgpu.SMEM((ns, bq), f32),
      plgpu.SMEM((ns, bq), f32),
      # One barrier per buffer for an item's K and V, one per ring slot for
      # a step's Q, dO, lse and delta (one arrival per copy): one wait each.
      plgpu.Barrier(num_arrivals=2, num_barriers=2 * nbuf),
      plgpu.Barrier(num_arrivals=4, num_barriers=ns),
      plgpu.Barrier(num_arrivals=2, num_barriers=ns),  # freed by both WGs
  ]
  kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
  out_type = [kv_type, kv_type]
  if n_slots:
    part_type = jax.ShapeDtypeStruct((n_slots, _META_BLOCK, H), f32)
    out_type += [part_type, part_type]
    f32_tr = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
    scratch.insert(0, plgpu.SMEM((2, bk, H), f32, transforms=f32_tr))
  outs = plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=scratch,
      grid=(sched.bounds.shape[0] - 1,),
      grid_names=("ctas",),
      num_threads=3,
      thread_name="wg",
      kernel_name="lcjax_attention_dkv",
      compiler_params=_compiler_params(plgpu),
  )(q, k, v, do, lse2, delta, q_seg, kv_seg, offsets, sched.items,
    sched.bounds, *lists)
  return tuple(outs) if n_slots else (*outs, None, None)


# ----------------------------------------------------------------------------
# Public entry point with a custom VJP.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=128)
def _attention_fn(st: _Statics):
  """custom_vjp attention on block-padded inputs for fixed statics.

  ``plan = (fwd_lists, bwd_lists, rows, kv_sched)``: the block lists, the
  forward / dQ launch order and the dK/dV work items (integer arrays).
  """

  @jax.custom_vjp
  def attn(q, k, v, q_seg, kv_seg, offsets, plan):
    fwd_lists, _, rows, _ = plan
    out, lse = _forward(q, k, v, q_seg, kv_seg, offsets, rows, fwd_lists, st)
    return out, lse  # a tuple, as attn_fwd returns it (custom_vjp compares)

  def attn_fwd(q, k, v, q_seg, kv_seg, offsets, plan):
    fwd_lists, _, rows, _ = plan
    out, lse = _forward(q, k, v, q_seg, kv_seg, offsets, rows, fwd_lists, st)
    return (out, lse), (q, k, v, q_seg, kv_seg, offsets, plan, out, lse)

  def attn_bwd(res, cotangents):
    q, k, v, q_seg, kv_seg, offsets, plan, out, lse = res
    do, dlse = cotangents
    dq, dk, dv = _backward(st, q, k, v, q_seg, kv_seg, offsets, plan, out, lse,
                           do, dlse)
    nones = lambda tree: jax.tree.map(lambda _: None, tree)
    return (dq, dk, dv, nones(q_seg), nones(kv_seg), None, nones(plan))

  attn.defvjp(attn_fwd, attn_bwd)
  return attn


def _backward(st: _Statics, q, k, v, q_seg, kv_seg, offsets, plan, out, lse, do,
              dlse):
  """dQ and dK/dV kernels on block-padded inputs, given the rows' ``out``/``lse``."""
  fwd_lists, bwd_lists, rows, kv_sched = plan
  do = do.astype(q.dtype)
  # The dQ kernel computes delta_i = sum_j p_ij dp_ij = <o_i, do_i>. A
  # cotangent on lse_i adds p_ij * dlse_i to ds_ij, i.e. subtracts dlse_i
  # from delta_i.
  if dlse is not None:
    dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0).astype(jnp.float32)
  # lse in log2 units; +inf on rows that see no key so that p = 0 there.
  lse2 = jnp.where(jnp.isfinite(lse), lse * _LOG2E, jnp.inf)
  dq, delta = _backward_dq(q, k, v, do, out.astype(q.dtype), lse2, dlse, q_seg,
                           kv_seg, offsets, rows, fwd_lists, st)
  dk, dv, dk_parts, dv_parts = _backward_dkv(
      q, k, v, do, lse2, delta, q_seg, kv_seg, offsets, bwd_lists, kv_sched,
      st)
  if dk_parts is not None:
    dk = _merge_split_tiles(dk, dk_parts, kv_sched)
    dv = _merge_split_tiles(dv, dv_parts, kv_sched)
  return dq, dk, dv


# Host tables enter the jitted program as constants, which XLA embeds in the
# program; above this size the lists are built on device instead (e.g. 128K
# tokens with per-head strided lists: 64 MiB of transposed lists).
_MAX_CONSTANT_TABLE_BYTES = 8 << 20


def _plan(meta: block_mask.BlockMetadata, batch: int, heads: int,
          kv_heads: int, cfg: Config):
  """(forward lists, transposed lists, forward/dQ rows, dK/dV schedule)."""
  fwd_lists, bwd_lists = _lists(meta, cfg)
  return (fwd_lists, bwd_lists,
          _row_schedule(fwd_lists.count, batch, heads, cfg),
          _kv_schedule(bwd_lists.count, batch, heads, kv_heads, cfg))


@functools.lru_cache(maxsize=64)
def _host_plan(pattern, q_len: int, kv_len: int, q_offset: int,
               kv_offset: int, batch: int, heads: int, kv_heads: int,
               cfg: Config):
  """(numpy plan, has_partial, PartialMasks) for static offsets, or None if
  the tables are too large to embed."""
  kind = block_mask.classify_blocks(pattern, q_len, kv_len, _META_BLOCK,
                                    _META_BLOCK, q_offset, kv_offset, heads)
  visit = kind > block_mask.SKIP
  hm, nq, nk = visit.shape
  widths = max(1, visit.sum(-1).max()), max(1, visit.sum(-2).max())
  if 5 * hm * (nq * widths[0] + nk * widths[1]) > _MAX_CONSTANT_TABLE_BYTES:
    return None  # int32 blocks + bool FULL flags per entry
  meta = block_mask.block_metadata(pattern, q_len, kv_len, _META_BLOCK,
                                   _META_BLOCK, q_offset, kv_offset, heads)
  has_partial = bool((meta.kv_full.sum(-1) < meta.kv_counts).any())
  fwd_lists, bwd_lists, *rest = _plan(meta, batch, heads, kv_heads, cfg)
  where = (q_len, kv_len, q_offset, kv_offset, heads)
  masks = PartialMasks()
  if has_partial and cfg.causal_partial_masks:
    masks = _partial_masks(pattern, kind, *where[:4])
  skip = cfg.skip_empty_quarters if has_partial and pattern.in_kernel_mask else ()
  skips = tuple(name for name, lists, min_len in (("dq", fwd_lists, 1),
                                                  ("dkv", bwd_lists, 4))
                if name in skip and _quarter_skips_pay(lists, min_len))
  if masks.kind == "diagonal":  # the quarters follow from the tile index
    return ((fwd_lists, bwd_lists, *rest), has_partial,
            dataclasses.replace(masks, skips=skips))
  if "dq" in skips:
    fwd_lists = fwd_lists._replace(empty_quarters=_empty_quarters(
        pattern, fwd_lists, True, *where))
  if "dkv" in skips:
    bwd_lists = bwd_lists._replace(empty_quarters=_empty_quarters(
        pattern, bwd_lists, False, *where))
  return (fwd_lists, bwd_lists, *rest), has_partial, masks


def _pad_to(x, axis: int, size: int):
  if x is None or x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _prepare(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern, *, q_segment_ids,
             kv_segment_ids, q_offset, kv_offset, scale, softcap, config: Config):
  """Checks a call; returns ``(statics, plan, padded q/k/v/segments/offsets)``
  shared by the forward and :func:`mosaic_attention_backward`."""
  q, k, v = q_BxTxNxH, k_BxSxKxH, v_BxSxKxH
  has_segments = q_segment_ids is not None
  if has_segments != (kv_segment_ids is not None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if k.shape != v.shape:
    raise ValueError(f"k{k.shape} and v{v.shape} must have the same shape")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"batch and head_dim of q{q.shape} and k{k.shape} differ")
  reason = supports(q.shape, k.shape, q.dtype, pattern, has_segments, softcap)
  if reason is not None:
    raise ValueError(f"mosaic_attention cannot run this input: {reason}")
  B, T, N, H = q.shape
  S = k.shape[1]
  KH = k.shape[2]
  q_off, kv_off = block_mask.static_int(q_offset), block_mask.static_int(kv_offset)
  host = None
  if q_off is not None and kv_off is not None and not has_segments:
    host = _host_plan(pattern, T, S, q_off, kv_off, B, N, KH, config)
  partial = PartialMasks()
  if host is not None:
    plan, has_partial, partial = host
  else:
    # Traced offsets or segment ids: lists built on device. Static offsets
    # without segments come here only when the tables are too large to embed;
    # exact=False then classifies on device too (no host constant).
    meta = block_mask.block_metadata_device(
        pattern, T, S, _META_BLOCK, _META_BLOCK, q_offset, kv_offset, N,
        q_segment_ids, kv_segment_ids, exact=has_segments)
    plan, has_partial = _plan(meta, B, N, KH, config), True
  if has_partial and not pattern.in_kernel_mask:
    raise ValueError(f"{type(pattern).__name__} has blocks that need an element "
                     "mask, but its mask is a table lookup the Mosaic kernel "
                     "cannot evaluate; use the portable kernel")
  plan = jax.tree.map(jnp.asarray, plan)
  t_pad = -(-T // _META_BLOCK) * _META_BLOCK
  s_pad = -(-S // _META_BLOCK) * _META_BLOCK
  q_p = _pad_to(q, 1, t_pad)
  k_p, v_p = _pad_to(k, 1, s_pad), _pad_to(v, 1, s_pad)
  q_seg = kv_seg = None
  if has_segments:
    q_seg = _pad_to(q_segment_ids.astype(jnp.int32), 1, t_pad)
    kv_seg = _pad_to(kv_segment_ids.astype(jnp.int32), 1, s_pad)
  offsets = jnp.stack([jnp.asarray(q_offset, jnp.int32),
                       jnp.asarray(kv_offset, jnp.int32)])
  st = _Statics(pattern=pattern, scale=H ** -0.5 if scale is None else float(scale),
                softcap=None if softcap is None else float(softcap),
                cfg=config, kv_len=S, has_partial=has_partial,
                has_segments=has_segments, partial=partial)
  return st, plan, (q_p, k_p, v_p, q_seg, kv_seg, offsets)


def mosaic_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    pattern: Any,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    config: Config = DEFAULT_CONFIG,
):
  """Block-sparse attention on Hopper with the semantics of ``dense_attention``.

  Differentiable in q, k, v (and through ``lse`` when ``return_lse``). Static
  offsets and no segment ids use cached host metadata; traced offsets or
  segment ids build the block lists on device.
  """
  st, plan, padded = _prepare(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_offset=kv_offset,
      scale=scale, softcap=softcap, config=config)
  T = q_BxTxNxH.shape[1]
  out, lse = _attention_fn(st)(*padded, plan)
  out, lse = out[:, :T], lse[..., :T]
  return (out, lse) if return_lse else out


def mosaic_attention_backward(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    pattern: Any,
    out_BxTxNxH: jax.Array,
    lse_BxNxT: jax.Array,
    d_out_BxTxNxH: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float | None = None,
    config: Config = DEFAULT_CONFIG,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(dq, dk, dv)`` from the backward kernels alone, given the rows' final
  ``out``/``lse`` (see ``lcjax.attention.attend_backward``): no forward pass."""
  st, plan, (q, k, v, q_seg, kv_seg, offsets) = _prepare(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_offset=kv_offset,
      scale=scale, softcap=softcap, config=config)
  T, S = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
  t_pad = q.shape[1]
  lse = jnp.pad(lse_BxNxT.astype(jnp.float32), ((0, 0), (0, 0), (0, t_pad - T)),
                constant_values=-jnp.inf)
  dq, dk, dv = _backward(st, q, k, v, q_seg, kv_seg, offsets, plan,
                         _pad_to(out_BxTxNxH, 1, t_pad), lse,
                         _pad_to(d_out_BxTxNxH, 1, t_pad), None)
  return dq[:, :T], dk[:, :S], dv[:, :S]
