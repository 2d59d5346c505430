"""KV caches per attention kind, and attention of new tokens against them.

A cache is a dict ``{"k", "v": [B, S, K, H], "pos": [B, P, S] int32, "end": [B]
int32}`` of ``S`` *slots*. ``pos`` is the absolute position of the token in a
slot (``-1``: empty; ``P`` is 1, or ``K`` when kv heads keep different tokens)
and ``end`` the number of tokens written so far. A *layout* decides which slot a
position goes to and which tokens are kept at all -- only those that later
queries can ever see under the layer's pattern:

* :class:`FullLayout` (full layers, and any pattern without a smaller layout):
  slot = position.
* :class:`RingLayout` (``SinkWindow(sink, window)``, StreamingLLM): ``sink``
  fixed slots and a ring of ``window + 1`` slots for the most recent tokens.
* :class:`StridedLayout` (``StridedBlockSparse``, LongGen): a ring of the
  ``local_blocks`` most recent blocks, plus the blocks on the strides of the
  query heads that share a kv head (with per-head offsets, a kv head whose
  ``G`` query heads sit on ``G`` of the ``stride`` residues keeps ``G/stride``
  of the blocks).

Visibility is always the pattern's own ``mask`` evaluated on the stored
positions, so a layout can never change the result, only the memory; stale
slots left in a ring are exactly the pairs the pattern masks.

:func:`cached_attention` is what ``SelfAttention`` runs when a ``"cache"``
collection is present. A decode step (one token), and a prefill chunk on a
full cache, writes its keys and values first and then attends over the cache
(the decode-attention kernel), so the cache is updated in place. A prefill
chunk on a ring or strided cache attends to the cache as it was and to itself
(``lcjax.attention.attend``), merges the two by log-sum-exp and is written
last, which lets a chunk of any size use a ring smaller than the chunk.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import Pattern, attend
from lcjax.attention.block_mask import static_int
from lcjax.attention.patterns import SinkWindow, StridedBlockSparse
from lcjax.config import ModelConfig

Cache = dict[str, jax.Array]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# ------------------------------------------------------------------ layouts


@dataclasses.dataclass(frozen=True)
class FullLayout:
  """Every token in slot ``position``."""
  num_slots: int
  name = "full"
  per_kv_head = False

  def slots(self, pos_BxT, valid_BxT, num_kv_heads):
    keep = valid_BxT & (pos_BxT < self.num_slots)
    return jnp.where(keep, pos_BxT, self.num_slots)[..., None]

  def bound(self, end_B):
    return jnp.minimum(end_B, self.num_slots)


@dataclasses.dataclass(frozen=True)
class RingLayout:
  """Positions ``< sink`` in their own slot; later ones in a ring of ``ring`` slots."""
  sink: int
  ring: int
  name = "ring"
  per_kv_head = False

  @property
  def num_slots(self) -> int:
    return self.sink + self.ring

  def slots(self, pos_BxT, valid_BxT, num_kv_heads):
    in_sink = pos_BxT < self.sink
    # Of a chunk longer than the ring only the last ``ring`` tokens survive.
    last_B1 = jnp.max(jnp.where(valid_BxT, pos_BxT, -1), axis=1, keepdims=True)
    keep = valid_BxT & (in_sink | (pos_BxT > last_B1 - self.ring))
    slot = jnp.where(in_sink, pos_BxT, self.sink + (pos_BxT - self.sink) % self.ring)
    return jnp.where(keep, slot, self.num_slots)[..., None]

  def bound(self, end_B):
    return jnp.minimum(end_B, self.num_slots)


@dataclasses.dataclass(frozen=True)
class StridedLayout:
  """Slots ``[ring of local blocks | kept strided blocks]``, chosen per kv head.

  ``residues[g]`` are the block residues (``block % stride``) that kv head ``g``'s
  query heads attend to beyond their local blocks; such blocks are stored in
  the strided part at block slot ``(block // stride) * r + rank(residue)``
  (``r = max |residues[g]|``), every other token only in the ring.
  """
  block_size: int
  stride: int
  local_blocks: int
  residues: tuple[tuple[int, ...], ...]
  store_blocks: int
  name = "strided"
  per_kv_head = True

  @property
  def ring_slots(self) -> int:
    return self.local_blocks * self.block_size

  @property
  def num_slots(self) -> int:
    return self.ring_slots + self.store_blocks * self.block_size

  @property
  def kept_per_stride(self) -> int:
    return max(len(r) for r in self.residues)

  def _tables(self):
    in_store = np.zeros((len(self.residues), self.stride), bool)
    rank = np.zeros((len(self.residues), self.stride), np.int32)
    for g, res in enumerate(self.residues):
      for i, rho in enumerate(res):
        in_store[g, rho], rank[g, rho] = True, i
    return jnp.asarray(in_store), jnp.asarray(rank)

  def slots(self, pos_BxT, valid_BxT, num_kv_heads):
    bs, r = self.block_size, self.kept_per_stride
    in_store_KxR, rank_KxR = self._tables()
    block = pos_BxT // bs
    residue = block % self.stride
    kv = jnp.arange(num_kv_heads)[None, None, :]
    in_store = in_store_KxR[kv, residue[..., None]]  # [B, T, K]
    store_slot = (self.ring_slots + ((block // self.stride) * r)[..., None] * bs
                  + rank_KxR[kv, residue[..., None]] * bs + (pos_BxT % bs)[..., None])
    last_block = jnp.max(jnp.where(valid_BxT, block, -1), axis=1, keepdims=True)
    in_ring = block > last_block - self.local_blocks
    ring_slot = (block % self.local_blocks) * bs + pos_BxT % bs
    slot = jnp.where(in_store, store_slot, ring_slot[..., None])
    keep = valid_BxT[..., None] & (in_store | in_ring[..., None]) & (slot < self.num_slots)
    return jnp.where(keep, slot, self.num_slots)

  def bound(self, end_B):
    last_block = (end_B - 1) // self.block_size
    stored = ((last_block // self.stride) + 1) * self.kept_per_stride * self.block_size
    filled = self.ring_slots + jnp.minimum(stored, self.store_blocks * self.block_size)
    return jnp.where(end_B > 0, filled, 0)


Layout = FullLayout | RingLayout | StridedLayout
LAYOUT_NAMES = ("full", "ring", "strided")


def strided_residues(pattern: StridedBlockSparse, num_heads: int,
                     num_kv_heads: int) -> tuple[tuple[int, ...], ...]:
  """Per kv head, the block residues its query heads attend to by stride."""
  G = num_heads // num_kv_heads
  out = []
  for g in range(num_kv_heads):
    heads = range(g * G, (g + 1) * G)
    if any(h in pattern.dense_heads for h in heads):
      out.append(tuple(range(pattern.stride)))
    elif pattern.head_offsets:
      out.append(tuple(sorted({h % pattern.stride for h in heads})))
    else:
      out.append((0,))
  return tuple(out)


def plan_layout(pattern: Pattern, cfg: ModelConfig, max_len: int,
                slot_multiple: int = 64) -> Layout:
  """The smallest exact layout for ``pattern`` and sequences up to ``max_len``.

  Slot counts are rounded up to ``slot_multiple`` (kernel blocks never pad the
  cache); extra slots only hold more tokens than needed, never fewer.
  """
  full = FullLayout(_round_up(max_len, slot_multiple))
  if isinstance(pattern, SinkWindow):
    # ``window + 1`` ring slots: a decode step writes its token before it
    # attends, so the ring must hold the window and the new token.
    sink = min(pattern.sink, max_len)
    ring = _round_up(sink + pattern.window + 1, slot_multiple) - sink
    layout = RingLayout(sink, ring)
  elif isinstance(pattern, StridedBlockSparse) and pattern.local_blocks >= 1:
    residues = strided_residues(pattern, cfg.num_heads, cfg.num_kv_heads)
    r = max(len(x) for x in residues)
    n_blocks = -(-max_len // pattern.block_size)
    store_blocks = ((n_blocks - 1) // pattern.stride + 1) * r
    layout = StridedLayout(pattern.block_size, pattern.stride, pattern.local_blocks,
                           residues, store_blocks)
    if layout.num_slots % slot_multiple:  # grow the store to a multiple
      extra = _round_up(layout.num_slots, slot_multiple) - layout.num_slots
      layout = dataclasses.replace(
          layout, store_blocks=store_blocks + _round_up(extra, pattern.block_size)
          // pattern.block_size)
  else:
    return full
  return layout if layout.num_slots < full.num_slots else full


def layout_from_cache(name: str, pattern: Pattern, cfg: ModelConfig,
                      num_slots: int) -> Layout:
  """Rebuilds the layout of a cache from its name, the pattern and its size."""
  if name == "full":
    return FullLayout(num_slots)
  if name == "ring":
    return RingLayout(min(pattern.sink, num_slots), num_slots - min(pattern.sink, num_slots))
  if name == "strided":
    ring = pattern.local_blocks * pattern.block_size
    return StridedLayout(pattern.block_size, pattern.stride, pattern.local_blocks,
                         strided_residues(pattern, cfg.num_heads, cfg.num_kv_heads),
                         (num_slots - ring) // pattern.block_size)
  raise ValueError(f"unknown cache layout {name!r}; known: {LAYOUT_NAMES}")


def init_cache(layout: Layout, cfg: ModelConfig, batch: int, dtype) -> dict[str, Cache]:
  """An empty cache of ``layout``, keyed by the layout name (what the layer reads)."""
  K, H, S = cfg.num_kv_heads, cfg.head_dim, layout.num_slots
  return {layout.name: {
      "k": jnp.zeros((batch, S, K, H), dtype),
      "v": jnp.zeros((batch, S, K, H), dtype),
      "pos": jnp.full((batch, K if layout.per_kv_head else 1, S), -1, jnp.int32),
      "end": jnp.zeros((batch,), jnp.int32),
  }}


def write(layout: Layout, cache: Cache, k_BxTxKxH, v_BxTxKxH, pos_BxT, valid_BxT) -> Cache:
  """``cache`` with the valid new tokens stored (scatter; dropped tokens skipped)."""
  B, T, K, _ = k_BxTxKxH.shape
  slot = layout.slots(pos_BxT, valid_BxT, K)  # [B, T, 1 or K]
  b = jnp.arange(B)[:, None, None]
  if layout.per_kv_head:
    kv = jnp.arange(K)[None, None, :]
    k = cache["k"].at[b, slot, kv].set(k_BxTxKxH.astype(cache["k"].dtype), mode="drop")
    v = cache["v"].at[b, slot, kv].set(v_BxTxKxH.astype(cache["v"].dtype), mode="drop")
    pos = cache["pos"].at[b, kv, slot].set(
        jnp.broadcast_to(pos_BxT[..., None], slot.shape), mode="drop")
  else:
    s = slot[..., 0]
    b = b[..., 0]
    k = cache["k"].at[b, s].set(k_BxTxKxH.astype(cache["k"].dtype), mode="drop")
    v = cache["v"].at[b, s].set(v_BxTxKxH.astype(cache["v"].dtype), mode="drop")
    pos = cache["pos"].at[b, 0, s].set(pos_BxT, mode="drop")
  end = jnp.maximum(cache["end"], jnp.max(jnp.where(valid_BxT, pos_BxT + 1, 0), axis=1))
  return {"k": k, "v": v, "pos": pos, "end": end.astype(jnp.int32)}


# -------------------------------------------------------- attention in a layer


@functools.lru_cache(maxsize=None)
def check_causal(pattern: Pattern, probe: int = 256) -> None:
  """Cached decoding writes a token after its queries ran: the pattern must be causal."""
  q = np.arange(probe)[:, None]
  k = np.arange(probe)[None, :]
  heads = np.arange(64)[:, None, None]
  future = np.asarray(pattern.mask(q[None], k[None], heads)) & (k > q)[None]
  if future.any():
    raise ValueError(f"pattern {pattern!r} lets queries see later keys; KV-cache decoding "
                     "needs a causal pattern")


def merge(out_a, lse_a, out_b, lse_b):
  """Combines two attention results over disjoint key sets (``lse [B, N, T]``)."""
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  w_a = jnp.exp(lse_a - safe).transpose(0, 2, 1)[..., None]
  w_b = jnp.exp(lse_b - safe).transpose(0, 2, 1)[..., None]
  out = w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)
  return out, lse


def cache_name(module) -> str | None:
  """The layout name of the cache this module holds, or None (no cache: training)."""
  for name in LAYOUT_NAMES:
    if module.has_variable("cache", name):
      return name
  return None


def cached_attention(module, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT,
                     segment_ids_BxT, pattern: Pattern, cfg: ModelConfig):
  """Attention of new tokens against the module's cache, which it then updates.

  Prefill chunks (``T > 1``) must share positions across rows
  (``positions[b] = offset + arange(T)``); a decode step (``T == 1``) may be at a
  different position in each row. Tokens with segment id 0 are padding: they
  are attended by nobody and not written. A chunk whose positions are known at
  trace time and start at 0 is the first of a prompt: the cache is taken to be
  empty and skipped (the engine's one-shot prefill).
  """
  from lcjax.inference.cache_attention import cache_attention  # avoid an import cycle
  name = cache_name(module)
  cache = module.get_variable("cache", name)
  layout = layout_from_cache(name, pattern, cfg, cache["k"].shape[1])
  check_causal(pattern)
  B, T, N, H = q_BxTxNxH.shape
  scale = H ** -0.5
  softcap = cfg.attention.softcap or None
  positions_BxT = positions_BxT.astype(jnp.int32)
  valid = (jnp.ones((B, T), bool) if segment_ids_BxT is None else segment_ids_BxT != 0)
  if T > 1 and static_int(positions_BxT[0, 0]) == 0:
    # The first prefill chunk (positions known at trace time): nothing is
    # cached yet, so this is plain attention with static offsets (the kernels'
    # and cuDNN's fast path).
    out = attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, pattern, softcap=softcap,
                 implementation=cfg.attention.implementation)
    module.put_variable("cache", name, write(layout, cache, k_BxTxKxH, v_BxTxKxH,
                                             positions_BxT, valid))
    return out
  if T == 1 or isinstance(layout, FullLayout):
    # Write first, then attend over the cache: the cache is only ever written
    # in place and read afterwards (reading the old cache and writing after it
    # made XLA copy the whole cache in every decode step and prefill chunk).
    # A decode step's token never evicts a key it needs (layouts keep one slot
    # more than a query can see); a full cache evicts nothing, so a prefill
    # chunk on it also sees its own keys through the cache kernel.
    cache = write(layout, cache, k_BxTxKxH, v_BxTxKxH, positions_BxT, valid)
    module.put_variable("cache", name, cache)
    out, _ = cache_attention(
        q_BxTxNxH, positions_BxT, cache["k"], cache["v"], cache["pos"],
        layout.bound(cache["end"]), pattern, scale=scale, softcap=softcap,
        implementation=cfg.attention.decode_implementation)
    return out
  # A later prefill chunk on a ring or strided cache (small: a copy is cheap):
  # the cached tokens through the cache kernel, the chunk itself through the
  # flash kernel, merged by log-sum-exp; the chunk is written last (it may wrap
  # a ring over keys its own first queries need).
  out_c, lse_c = cache_attention(
      q_BxTxNxH, positions_BxT, cache["k"], cache["v"], cache["pos"],
      layout.bound(cache["end"]), pattern, scale=scale, softcap=softcap,
      implementation=cfg.attention.decode_implementation)
  offset = positions_BxT[0, 0]
  out_n, lse_n = attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, pattern, q_offset=offset,
                        kv_offset=offset, softcap=softcap, return_lse=True,
                        implementation=cfg.attention.implementation)
  out, _ = merge(out_c, lse_c, out_n, lse_n)
  module.put_variable("cache", name, write(layout, cache, k_BxTxKxH, v_BxTxKxH,
                                           positions_BxT, valid))
  return out.astype(q_BxTxNxH.dtype)

