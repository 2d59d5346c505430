"""Dual Chunk Attention (DCA): training-free attention past the trained length.

An et al., 2024, "Training-Free Long-Context Scaling of Large Language Models"
(ChunkLlama); the same scheme runs Qwen2.5-1M. With ``chunk_size`` ``s`` and
``local_window`` ``w`` the sequence is cut into chunks of ``c = s - w`` tokens
(by token index ``i``). Keys are rotated at ``i mod c``; every query is rotated
three ways and attends three disjoint sets of keys:

* intra-chunk (keys of its own chunk, causal): query at ``i mod c``;
* successive-chunk (keys of the previous chunk): query at
  ``min(i mod c + c, s)`` -- the first ``w`` queries of a chunk see the
  previous chunk at their true distances, later ones at distances capped at ``s``;
* inter-chunk (keys of all earlier chunks): query at ``min(2c - 1, s)`` (= ``s``
  when ``c > w``).

So no relative distance exceeds ``s``: pick ``s`` at most the trained length
(ChunkLlama: ``s = 3/4`` of it, ``w = 1/16``). The three partial attentions are
merged with their log-sum-exps, which gives exactly one softmax over the union
of the three key sets. The position maps are ChunkLlama's and vLLM's
(``DualChunkRotaryEmbedding``). With ``T <= c`` DCA is ordinary causal RoPE
attention.

Two implementations:

* :func:`dca_attend`: three calls of ``lcjax.attention.attend`` with chunk
  patterns (tile patterns, so block-sparse kernels skip the empty blocks) and
  a log-sum-exp merge. Positions are token indices ``q_offset + i`` and
  ``kv_offset + j``: prefill (``q_offset=0``) and decode (one query at
  ``q_offset = t`` against a KV cache starting at 0; cache slots past ``t`` are
  masked causally) use the same function. For a KV cache, rotate keys once with
  :func:`rotate_keys` when they are written and pass ``keys_rotated=True``;
  :func:`dca_decode` is the decode step with a different position per row.
* :func:`dca_reference`: the dense specification from explicit per-token
  positions, pair by pair. Tests compare the two.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.attention import attend
from lcjax.attention.patterns import Causal, TilePattern
from lcjax.config import RopeConfig
from lcjax.positions.rope import apply_rope

RELATIONS = ("same", "previous", "earlier")


def check_sizes(chunk_size: int, local_window: int) -> int:
  """Validates the sizes and returns the chunk length ``c = chunk_size - local_window``."""
  if not isinstance(chunk_size, int) or not isinstance(local_window, int):
    raise ValueError(f"DCA chunk_size={chunk_size!r} and local_window={local_window!r} "
                     "must be ints")
  if local_window < 0 or chunk_size <= 2 * local_window:
    raise ValueError(f"DCA needs 0 <= local_window < chunk_size / 2; got "
                     f"chunk_size={chunk_size}, local_window={local_window}")
  return chunk_size - local_window


@dataclasses.dataclass(frozen=True)
class ChunkRelation(TilePattern):
  """Key chunk vs query chunk (chunks of ``chunk_len`` token positions):
  ``"same"``, ``"previous"`` (key chunk = query chunk - 1) or ``"earlier"``
  (key chunk <= query chunk - 2). Not causal by itself."""
  chunk_len: int
  relation: str

  def __post_init__(self):
    if not isinstance(self.chunk_len, int) or self.chunk_len < 1:
      raise ValueError(f"ChunkRelation.chunk_len={self.chunk_len!r} must be an int >= 1")
    if self.relation not in RELATIONS:
      raise ValueError(f"ChunkRelation.relation={self.relation!r}; choose one of "
                       f"{RELATIONS}")

  @property
  def tile_shape(self):
    return self.chunk_len, self.chunk_len

  def tile_mask(self, q_tile, k_tile, head):
    if self.relation == "same":
      return q_tile == k_tile
    if self.relation == "previous":
      return k_tile == q_tile - 1
    return k_tile <= q_tile - 2


def query_positions(q_pos, chunk_size: int, local_window: int):
  """``(intra, successive, inter)`` query positions for token indices ``q_pos``."""
  c = check_sizes(chunk_size, local_window)
  within = q_pos % c
  return (within, jnp.minimum(within + c, chunk_size),
          jnp.full_like(within, min(2 * c - 1, chunk_size)))


def key_positions(k_pos, chunk_size: int, local_window: int):
  return k_pos % check_sizes(chunk_size, local_window)


def rotate_keys(k_BxSxKxH: jax.Array, k_pos_BxS: jax.Array, *, chunk_size: int,
                local_window: int, rope: RopeConfig) -> jax.Array:
  """Keys rotated for DCA (at ``position mod chunk_len``): what a KV cache stores."""
  return apply_rope(k_BxSxKxH, key_positions(k_pos_BxS, chunk_size, local_window), rope)


def _check_rope(rope: RopeConfig) -> None:
  if rope.kind == "dynamic":
    raise ValueError("DCA keeps every position below chunk_size; rope kind 'dynamic' "
                     "(a length-dependent base) does not combine with it")


def dca_attend(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, *,
               chunk_size: int, local_window: int, rope: RopeConfig,
               q_offset: int | jax.Array = 0, kv_offset: int | jax.Array = 0,
               q_segment_ids: jax.Array | None = None,
               kv_segment_ids: jax.Array | None = None, keys_rotated: bool = False,
               scale: float | None = None, softcap: float | None = None,
               implementation: str = "auto") -> jax.Array:
  """Causal DCA of un-rotated ``q`` over ``k``/``v`` (see the module docstring).

  Shapes as ``lcjax.attention.attend``: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``.
  Token ``i`` of q sits at position ``q_offset + i``, key ``j`` at
  ``kv_offset + j``. Keys are rotated here unless ``keys_rotated``. Segment ids
  (packed documents) are passed through; chunks follow token positions, not
  document starts. Returns ``[B, T, N, H]`` in q's dtype.
  """
  _check_rope(rope)
  c = check_sizes(chunk_size, local_window)
  B, T = q_BxTxNxH.shape[:2]
  S = k_BxSxKxH.shape[1]
  q_pos_BxT = jnp.broadcast_to(q_offset + jnp.arange(T), (B, T))
  if not keys_rotated:
    k_pos_BxS = jnp.broadcast_to(kv_offset + jnp.arange(S), (B, S))
    k_BxSxKxH = rotate_keys(k_BxSxKxH, k_pos_BxS, chunk_size=chunk_size,
                            local_window=local_window, rope=rope)
  patterns = (Causal() & ChunkRelation(c, "same"), ChunkRelation(c, "previous"),
              ChunkRelation(c, "earlier"))
  outs, lses = [], []
  for pattern, pos in zip(patterns, query_positions(q_pos_BxT, chunk_size, local_window)):
    out, lse = attend(apply_rope(q_BxTxNxH, pos, rope), k_BxSxKxH, v_BxSxKxH, pattern,
                      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                      q_offset=q_offset, kv_offset=kv_offset, scale=scale,
                      softcap=softcap, return_lse=True, implementation=implementation)
    outs.append(out)
    lses.append(lse)
  return merge_partials(outs, lses).astype(q_BxTxNxH.dtype)


def dca_decode(q_Bx1xNxH: jax.Array, k_cache_BxSxKxH: jax.Array,
               v_cache_BxSxKxH: jax.Array, q_positions_B: jax.Array, *,
               chunk_size: int, local_window: int, rope: RopeConfig,
               scale: float | None = None, softcap: float | None = None,
               implementation: str = "auto") -> jax.Array:
  """One decode step: row ``b``'s new (un-rotated) query at position
  ``q_positions_B[b]`` against its cache, where slot ``j`` holds the key of
  position ``j`` rotated by :func:`rotate_keys` (include the new token's key at
  its slot). Slots after the query are masked causally, so unwritten slots
  are ignored. Returns ``[B, 1, N, H]``."""
  def one_row(q, k, v, t):
    return dca_attend(q[None], k[None], v[None], chunk_size=chunk_size,
                      local_window=local_window, rope=rope, q_offset=t,
                      keys_rotated=True, scale=scale, softcap=softcap,
                      implementation=implementation)[0]
  return jax.vmap(one_row)(q_Bx1xNxH, k_cache_BxSxKxH, v_cache_BxSxKxH, q_positions_B)


def merge_partials(outs_BxTxNxH, lses_BxNxT) -> jax.Array:
  """One softmax over the union of disjoint key sets from per-set outputs and
  log-sum-exps (``lse = -inf``: the set was empty). float32 ``[B, T, N, H]``."""
  lse_PxBxNxT = jnp.stack(lses_BxNxT)
  top = jnp.max(lse_PxBxNxT, axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w_PxBxNxT = jnp.exp(lse_PxBxNxT - top)
  denom = jnp.sum(w_PxBxNxT, axis=0)
  w_PxBxTxN = jnp.swapaxes(w_PxBxNxT / jnp.where(denom > 0, denom, 1.0), -1, -2)
  out = sum(w[..., None] * o.astype(jnp.float32)
            for w, o in zip(w_PxBxTxN, outs_BxTxNxH))
  return out


def dca_reference(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, *,
                  q_positions_BxT: jax.Array, k_positions_BxS: jax.Array,
                  chunk_size: int, local_window: int, rope: RopeConfig,
                  scale: float | None = None) -> jax.Array:
  """Dense DCA from explicit integer positions: for every (query, key) pair
  pick the relation by chunk index, the query's position by relation, and
  mask keys after the query. float32 softmax; returns q's dtype."""
  _check_rope(rope)
  c = check_sizes(chunk_size, local_window)
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  scale = H ** -0.5 if scale is None else scale
  k = apply_rope(k_BxSxKxH, key_positions(k_positions_BxS, chunk_size, local_window),
                 rope).astype(jnp.float32)
  q_chunk = (q_positions_BxT // c)[:, :, None]
  k_chunk = (k_positions_BxS // c)[:, None, :]
  relation_BxTxS = jnp.where(q_chunk == k_chunk, 0, jnp.where(k_chunk == q_chunk - 1, 1, 2))
  logits = []
  for pos in query_positions(q_positions_BxT, chunk_size, local_window):
    q = apply_rope(q_BxTxNxH, pos, rope).astype(jnp.float32)
    q = q.reshape(B, T, K, N // K, H)
    logits.append(jnp.einsum("btkgh,bskh->bkgts", q, k) * scale)
  logits_BxKxGxTxS = jnp.select(
      [relation_BxTxS[:, None, None] == r for r in range(3)], logits)
  visible = (k_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None])[:, None, None]
  probs = jax.nn.softmax(jnp.where(visible, logits_BxKxGxTxS, -jnp.inf), axis=-1)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH.astype(jnp.float32))
  return out.reshape(B, T, N, H).astype(q_BxTxNxH.dtype)
