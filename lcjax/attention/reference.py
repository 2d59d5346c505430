"""Pure-jnp reference attention: the specification every kernel is tested against.

* :func:`dense_attention` materialises all logits (float32 softmax).
* :func:`chunked_attention` is the memory-efficient form (Rabe & Staats, 2021;
  the online softmax of FlashAttention): a ``lax.scan`` over key/value chunks
  inside a map over query chunks, skipping chunk pairs the pattern masks out.

Both return ``(out_BxTxNxH, lse_BxNxT)``; rows with no visible key give zeros
and ``lse = -inf`` (log-sum-exp merging of partial results stays exact).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import block_mask
from lcjax.attention.patterns import Pattern


def visibility(pattern: Pattern, q_pos_T, k_pos_S, num_heads: int,
               q_segment_ids_BxT=None, kv_segment_ids_BxS=None, q_valid_T=None,
               k_valid_S=None) -> jax.Array:
  """Boolean ``[B or 1, Hm, T, S]`` visibility (Hm = num_heads or 1)."""
  hm = block_mask.num_metadata_heads(pattern, num_heads)
  q_pos = q_pos_T[None, :, None]
  k_pos = k_pos_S[None, None, :]
  head = jnp.arange(hm)[:, None, None]
  vis = pattern.mask(q_pos, k_pos, head)
  if q_segment_ids_BxT is not None:
    same = (q_segment_ids_BxT[:, None, :, None]
            == kv_segment_ids_BxS[:, None, None, :])
    if pattern.has_segment_exemptions:
      same = same | pattern.segment_exempt(q_pos, k_pos, head)[None]
    vis = vis[None] & same
  else:
    vis = vis[None]
  if q_valid_T is not None:
    vis = vis & q_valid_T[:, None] & k_valid_S[None, :]
  return jnp.broadcast_to(vis, vis.shape[:2] + (q_pos_T.shape[0], k_pos_S.shape[0]))


def _softcapped_logits(q, k, scale, softcap, subscripts):
  logits = jnp.einsum(subscripts, q, k, precision=jax.lax.Precision.HIGHEST) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  return logits


def _group_mask(pattern, T, S, N, K, q_offset, kv_offset, q_seg, kv_seg):
  """Visibility broadcastable to ``[B, K, G, T, S]`` (query head = k * G + g)."""
  vis = visibility(pattern, q_offset + jnp.arange(T), kv_offset + jnp.arange(S), N,
                   q_seg, kv_seg)
  if vis.shape[1] == N:
    return vis.reshape(vis.shape[0], K, N // K, T, S)
  return vis[:, :, None]


def dense_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    pattern: Pattern,
    *,
    q_segment_ids_BxT: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Materialises all logits; softmax in float32. Returns ``(out, lse_BxNxT)``."""
  B, T, N, H = q_BxTxNxH.shape
  _, S, K, _ = k_BxSxKxH.shape
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  q = q_BxTxNxH.astype(jnp.float32).reshape(B, T, K, G, H)
  k = k_BxSxKxH.astype(jnp.float32)
  v = v_BxSxKxH.astype(jnp.float32)
  logits_BxKxGxTxS = _softcapped_logits(q, k, scale, softcap,
                                        "btkgh,bskh->bkgts")
  mask = _group_mask(pattern, T, S, N, K, q_offset, kv_offset, q_segment_ids_BxT,
                     kv_segment_ids_BxS)
  logits = jnp.where(mask, logits_BxKxGxTxS, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  safe_denom = jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs / safe_denom, v,
                   precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(denom[..., 0] > 0,
                  jnp.log(safe_denom[..., 0]) + row_max[..., 0], -jnp.inf)
  out_BxTxNxH = out.reshape(B, T, N, H).astype(q_BxTxNxH.dtype)
  return out_BxTxNxH, lse.reshape(B, N, T)


def dense_attention_backward(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    pattern: Pattern,
    out_BxTxNxH: jax.Array,
    lse_BxNxT: jax.Array,
    d_out_BxTxNxH: jax.Array,
    *,
    q_segment_ids_BxT: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The FlashAttention backward (Dao, 2023) from the rows' ``out`` and ``lse``:
  ``p = exp(s - lse)``, ``dv = p^T do``, ``ds = p (do v^T - <do, out>)``.

  With this call's own ``out``/``lse`` it is the gradient of
  :func:`dense_attention`. With the final ``out``/``lse`` of rows whose
  attention also spans other keys (ring attention's merged result) it is the
  share of the gradient that flows through these keys -- no per-call weights
  and no forward pass needed. Returns float32 ``(dq, dk, dv)``.
  """
  B, T, N, H = q_BxTxNxH.shape
  _, S, K, _ = k_BxSxKxH.shape
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  q, k, v = f32(q_BxTxNxH).reshape(B, T, K, G, H), f32(k_BxSxKxH), f32(v_BxSxKxH)
  do = f32(d_out_BxTxNxH).reshape(B, T, K, G, H)
  logits = _softcapped_logits(q, k, scale, softcap, "btkgh,bskh->bkgts")
  mask = _group_mask(pattern, T, S, N, K, q_offset, kv_offset, q_segment_ids_BxT,
                     kv_segment_ids_BxS)
  lse = lse_BxNxT.reshape(B, K, G, T)[..., None]
  seen = mask & jnp.isfinite(lse)
  p = jnp.where(seen, jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
  delta = jnp.einsum("btkgh,btkgh->bkgt", do, f32(out_BxTxNxH).reshape(B, T, K, G, H),
                     precision=hi)[..., None]
  dv = jnp.einsum("bkgts,btkgh->bskh", p, do, precision=hi)
  dp = jnp.einsum("btkgh,bskh->bkgts", do, v, precision=hi)
  ds = p * (dp - delta)
  if softcap is not None:  # d(c tanh(x / c)) / dx = 1 - (s / c)^2
    ds = ds * (1.0 - jnp.square(logits / softcap))
  ds = ds * scale
  dq = jnp.einsum("bkgts,bskh->btkgh", ds, k, precision=hi).reshape(B, T, N, H)
  dk = jnp.einsum("bkgts,btkgh->bskh", ds, q, precision=hi)
  return dq, dk, dv


def chunked_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    pattern: Pattern,
    *,
    q_segment_ids_BxT: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float | None = None,
    q_chunk: int = 512,
    kv_chunk: int = 512,
) -> tuple[jax.Array, jax.Array]:
  """Online-softmax attention over chunks; memory ``O(q_chunk * kv_chunk)``.

  Each step is rematerialised in the backward pass (``jax.checkpoint``), so
  gradients also stay in chunk-sized memory. Chunk pairs that the pattern
  masks out entirely are skipped (static offsets only).
  """
  B, T, N, H = q_BxTxNxH.shape
  _, S, K, _ = k_BxSxKxH.shape
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  qc, kc = min(q_chunk, T), min(kv_chunk, S)
  nq, nk = -(-T // qc), -(-S // kc)
  pad_t, pad_s = nq * qc - T, nk * kc - S
  q = jnp.pad(q_BxTxNxH, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
  k = jnp.pad(k_BxSxKxH, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
  v = jnp.pad(v_BxSxKxH, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
  q_chunks = q.reshape(B, nq, qc, K, G, H).transpose(1, 0, 2, 3, 4, 5)
  k_chunks = k.reshape(B, nk, kc, K, H).transpose(1, 0, 2, 3, 4)
  v_chunks = v.reshape(B, nk, kc, K, H).transpose(1, 0, 2, 3, 4)
  has_seg = q_segment_ids_BxT is not None
  if has_seg:
    q_seg = jnp.pad(q_segment_ids_BxT, ((0, 0), (0, pad_t))).reshape(B, nq, qc)
    k_seg = jnp.pad(kv_segment_ids_BxS, ((0, 0), (0, pad_s))).reshape(B, nk, kc)
    q_seg, k_seg = q_seg.transpose(1, 0, 2), k_seg.transpose(1, 0, 2)
  else:
    q_seg = jnp.zeros((nq, 1, qc), jnp.int32)
    k_seg = jnp.zeros((nk, 1, kc), jnp.int32)
  static_q, static_k = (block_mask.static_int(q_offset),
                        block_mask.static_int(kv_offset))
  if static_q is not None and static_k is not None:
    kind = block_mask.classify_blocks(pattern, T, S, qc, kc, static_q, static_k,
                                      N)
    visit_QxK = jnp.asarray(np.asarray(kind > 0).any(axis=0))
  else:
    visit_QxK = jnp.ones((nq, nk), bool)

  def one_q_chunk(args):
    qi, q_BxCxKxGxH, q_seg_BxC = args
    q_pos = q_offset + qi * qc + jnp.arange(qc)
    q_valid = qi * qc + jnp.arange(qc) < T

    @jax.checkpoint
    def step(carry, kv):
      m, l, acc = carry
      ki, k_BxCxKxH, v_BxCxKxH, k_seg_BxC = kv

      def update(carry):
        m, l, acc = carry
        k_pos = kv_offset + ki * kc + jnp.arange(kc)
        k_valid = ki * kc + jnp.arange(kc) < S
        vis = visibility(pattern, q_pos, k_pos, N,
                         q_seg_BxC if has_seg else None,
                         k_seg_BxC if has_seg else None, q_valid, k_valid)
        if vis.shape[1] == N:
          mask = vis.reshape(vis.shape[0], K, G, qc, kc)
        else:
          mask = vis[:, :, None]
        logits = _softcapped_logits(q_BxCxKxGxH.astype(jnp.float32),
                                    k_BxCxKxH.astype(jnp.float32), scale,
                                    softcap, "btkgh,bskh->bkgts")
        logits = jnp.where(mask, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(logits - m_safe[..., None])
        l = alpha * l + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum(
            "bkgts,bskh->bkgth", p, v_BxCxKxH.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST)
        return m_new, l, acc

      return jax.lax.cond(visit_QxK[qi, ki], update, lambda c: c,
                          (m, l, acc)), None

    init = (jnp.full((B, K, G, qc), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, qc), jnp.float32),
            jnp.zeros((B, K, G, qc, H), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(
        step, init, (jnp.arange(nk), k_chunks, v_chunks, k_seg))
    safe_l = jnp.where(l > 0, l, 1.0)
    out = acc / safe_l[..., None]
    lse = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)
    return out, lse

  out, lse = jax.lax.map(one_q_chunk, (jnp.arange(nq), q_chunks, q_seg))
  # out: [nq, B, K, G, qc, H] -> [B, T, N, H]; lse: [nq, B, K, G, qc] -> [B, N, T]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * qc, N, H)[:, :T]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, N, nq * qc)[:, :, :T]
  return out.astype(q_BxTxNxH.dtype), lse
