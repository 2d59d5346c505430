"""Attention of a few queries against a KV cache: Pallas kernel and jnp reference.

The inference engine's caches (``lcjax/inference/kv_cache.py``) hold keys and
values in *slots*; every slot records the absolute position of its token
(``-1``: empty), and slots past ``bound[b]`` were never written. Which
(query, slot) pairs are visible is the layer's attention pattern evaluated on
those positions, so one kernel serves every cache layout: a full cache, a ring
buffer of sink + window tokens, or the kept blocks of a strided layer.

``decode_attention`` is split-K flash decoding (Dao et al., 2023, "Flash-
Decoding"): the grid is (batch, kv head, row tile, key split); each program
runs an online softmax over its key blocks -- only up to ``bound`` -- for the
``T x G`` query rows that share one kv head (grouped-query attention reads the
cache once per group), and the splits are merged by log-sum-exp afterwards.
Portable Pallas (Triton on GPU, ``interpret=True`` on CPU).

Both functions return ``(out [B, T, N, H], lse [B, N, T] float32)``; rows that
see no slot give zeros and ``lse = -inf``.
"""
from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcjax.attention.patterns import Pattern

_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) underflows to 0 without NaNs


def _check(q, q_pos, k, v, k_pos, bound):
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  if k.shape != v.shape or k.shape[0] != B or k.shape[3] != H or N % K:
    raise ValueError(f"cache attention shapes do not fit: q{q.shape} k{k.shape} v{v.shape}")
  if q_pos.shape != (B, T):
    raise ValueError(f"q_pos{q_pos.shape} must be {(B, T)}")
  if k_pos.shape not in ((B, 1, S), (B, K, S)):
    raise ValueError(f"k_pos{k_pos.shape} must be {(B, 1, S)} or {(B, K, S)}")
  if bound.shape != (B,):
    raise ValueError(f"bound{bound.shape} must be {(B,)}")


def visible_slots(pattern: Pattern, q_pos_BxT, k_pos_BxPxS, bound_B, num_heads: int):
  """Boolean ``[B, N, T, S]``: query (b, t) of head n sees slot s."""
  B, T = q_pos_BxT.shape
  _, P, S = k_pos_BxPxS.shape
  head = jnp.arange(num_heads)[None, :, None, None]
  kpos = k_pos_BxPxS[:, jnp.arange(num_heads) // (num_heads // P)][:, :, None, :]
  qpos = q_pos_BxT[:, None, :, None]
  vis = pattern.mask(qpos, kpos, head) & (kpos >= 0)
  vis = vis & (jnp.arange(S)[None, None, None, :] < bound_B[:, None, None, None])
  return jnp.broadcast_to(vis, (B, num_heads, T, S))


def decode_attention_reference(q_BxTxNxH, q_pos_BxT, k_BxSxKxH, v_BxSxKxH, k_pos_BxPxS,
                               bound_B, pattern: Pattern, *, scale: float | None = None,
                               softcap: float | None = None):
  """Dense float32 specification of :func:`decode_attention` (materialises [B,N,T,S])."""
  _check(q_BxTxNxH, q_pos_BxT, k_BxSxKxH, v_BxSxKxH, k_pos_BxPxS, bound_B)
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  scale = H ** -0.5 if scale is None else scale
  q = q_BxTxNxH.astype(jnp.float32).reshape(B, T, K, N // K, H)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k_BxSxKxH.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST).reshape(B, N, T, -1) * scale
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  vis = visible_slots(pattern, q_pos_BxT, k_pos_BxPxS, bound_B, N)
  logits = jnp.where(vis, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(vis, jnp.exp(logits - m), 0.0)
  denom = p.sum(-1, keepdims=True)
  safe = jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskh->btkgh", (p / safe).reshape(B, K, N // K, T, -1),
                   v_BxSxKxH.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  lse = jnp.where(denom[..., 0] > 0, jnp.log(safe[..., 0]) + m[..., 0], -jnp.inf)
  return out.reshape(B, T, N, H).astype(q_BxTxNxH.dtype), lse


def _kernel(q_ref, qpos_ref, k_ref, v_ref, kpos_ref, bound_ref, o_ref, m_ref, l_ref, *,
            pattern: Pattern, scale: float, softcap: float | None, group: int, block_r: int,
            block_k: int, blocks_per_split: int):
  kv_head, row_tile, split = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  q = q_ref[...]
  q_pos = qpos_ref[...][:, None]
  rows = row_tile * block_r + lax.broadcasted_iota(jnp.int32, (block_r, 1), 0)
  head = kv_head * group + rows % group
  bound = bound_ref[...]
  lo = split * blocks_per_split
  hi = jnp.minimum(lo + blocks_per_split, (bound + block_k - 1) // block_k)

  def body(j, carry):
    m, l, acc = carry
    k = k_ref[pl.ds(j * block_k, block_k), :]
    v = v_ref[pl.ds(j * block_k, block_k), :]
    k_pos = kpos_ref[pl.ds(j * block_k, block_k)][None, :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * scale
    if softcap:
      s = softcap * jnp.tanh(s / softcap)
    slot = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    vis = pattern.mask(q_pos, k_pos, head) & (k_pos >= 0) & (slot < bound)
    s = jnp.where(vis, s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((block_r,), _NEG, jnp.float32), jnp.zeros((block_r,), jnp.float32),
          jnp.zeros((block_r, q.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(lo, jnp.maximum(hi, lo), body, init)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _pow2_at_least(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def default_block_k(num_slots: int) -> int:
  """The largest power of two <= 128 that divides ``num_slots`` (the kernel
  never pads the cache, which would copy it every step)."""
  block = 128
  while block > 1 and num_slots % block:
    block //= 2
  return block


@functools.partial(jax.jit, static_argnames=(
    "pattern", "scale", "softcap", "block_k", "block_r", "num_splits", "interpret",
    "num_warps", "num_stages"))
def decode_attention(q_BxTxNxH, q_pos_BxT, k_BxSxKxH, v_BxSxKxH, k_pos_BxPxS, bound_B,
                     pattern: Pattern, *, scale: float | None = None,
                     softcap: float | None = None, block_k: int | None = None,
                     block_r: int | None = None, num_splits: int | None = None,
                     interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """Split-K flash-decoding over a slot cache; see the module docstring.

  ``block_k`` must divide the number of slots S (default: :func:`default_block_k`);
  ``num_splits`` defaults to enough programs to fill an H100 (~264).
  """
  _check(q_BxTxNxH, q_pos_BxT, k_BxSxKxH, v_BxSxKxH, k_pos_BxPxS, bound_B)
  B, T, N, H = q_BxTxNxH.shape
  _, S, K, _ = k_BxSxKxH.shape
  P = k_pos_BxPxS.shape[1]
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  block_k = default_block_k(S) if block_k is None else block_k
  if S % block_k:
    raise ValueError(f"block_k={block_k} must divide the number of cache slots S={S}")
  R = T * G
  block_r = min(64, _pow2_at_least(R, 16)) if block_r is None else block_r
  n_rt = -(-R // block_r)
  n_kb = S // block_k
  if num_splits is None:
    num_splits = max(1, min(n_kb, -(-264 // (B * K * n_rt))))
  blocks_per_split = -(-n_kb // num_splits)
  num_splits = -(-n_kb // blocks_per_split)
  R_pad = n_rt * block_r
  # Rows of kv head k: (t, g) -> t * G + g, so a row tile shares one kv head.
  q = q_BxTxNxH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, R, H)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, R_pad - R), (0, 0)))
  q_pos = jnp.pad(jnp.repeat(q_pos_BxT.astype(jnp.int32), G, axis=1),
                  ((0, 0), (0, R_pad - R)), constant_values=-1)
  kernel = functools.partial(_kernel, pattern=pattern, scale=scale, softcap=softcap,
                             group=G, block_r=block_r, block_k=block_k,
                             blocks_per_split=blocks_per_split)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  o, m, l = pl.pallas_call(
      kernel,
      grid=(B, K, n_rt, num_splits),
      in_specs=[
          pl.BlockSpec((None, None, block_r, H), lambda b, k, r, s: (b, k, r, 0)),
          pl.BlockSpec((None, block_r), lambda b, k, r, s: (b, r)),
          pl.BlockSpec((None, S, None, H), lambda b, k, r, s: (b, 0, k, 0)),
          pl.BlockSpec((None, S, None, H), lambda b, k, r, s: (b, 0, k, 0)),
          pl.BlockSpec((None, None, S),
                       (lambda b, k, r, s: (b, k, 0)) if P > 1 else
                       (lambda b, k, r, s: (b, 0, 0))),
          pl.BlockSpec((None,), lambda b, k, r, s: (b,)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, block_r, H), lambda b, k, r, s: (b, k, s, r, 0)),
          pl.BlockSpec((None, None, None, block_r), lambda b, k, r, s: (b, k, s, r)),
          pl.BlockSpec((None, None, None, block_r), lambda b, k, r, s: (b, k, s, r)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, K, num_splits, R_pad, H), jnp.float32),
          jax.ShapeDtypeStruct((B, K, num_splits, R_pad), jnp.float32),
          jax.ShapeDtypeStruct((B, K, num_splits, R_pad), jnp.float32),
      ],
      interpret=interpret,
      compiler_params=compiler_params,
      name="lcjax_decode_attention",
  )(q, q_pos, k_BxSxKxH, v_BxSxKxH, k_pos_BxPxS.astype(jnp.int32),
    bound_B.astype(jnp.int32))
  out, lse = merge_splits(o[:, :, :, :R], m[:, :, :, :R], l[:, :, :, :R])
  out = out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
  lse = lse.reshape(B, K, T, G).transpose(0, 1, 3, 2).reshape(B, N, T)
  return out.astype(q_BxTxNxH.dtype), lse


def merge_splits(acc, m, l, axis: int = 2):
  """Merges unnormalised split results: ``acc [..., S, R, H]``, ``m, l [..., S, R]``
  -> ``(out [..., R, H], lse [..., R])`` (``lse = -inf`` where nothing was seen)."""
  m_max = jnp.max(m, axis=axis, keepdims=True)
  w = jnp.exp(m - m_max) * (l > 0)
  l_tot = jnp.sum(w * l, axis=axis)
  acc_tot = jnp.sum(w[..., None] * acc, axis=axis)
  seen = l_tot > 0
  safe = jnp.where(seen, l_tot, 1.0)
  out = acc_tot / safe[..., None]
  lse = jnp.where(seen, jnp.squeeze(m_max, axis) + jnp.log(safe), -jnp.inf)
  return out, lse
