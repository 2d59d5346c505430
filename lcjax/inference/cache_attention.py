"""Attention of new queries against a slot cache: implementation dispatch.

* ``"pallas"``: split-K flash decoding (``pallas_kernels/decode_attention.py``);
  interpreted on CPU.
* ``"xla"``: jnp for XLA to fuse. One dense pass when the logits are small (a
  decode step: ``N x S`` per row), else an online-softmax loop over key blocks
  that stops at the last filled slot (long prefill chunks).
* ``"reference"``: the dense float32 specification.
* ``"auto"``: ``"pallas"`` on GPU for power-of-two head sizes, else ``"xla"``.

All return ``(out [B, T, N, H], lse [B, N, T] float32)``.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from lcjax.attention import Pattern
from pallas_kernels import decode_attention as kernel

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas")
_DENSE_LOGITS_BUDGET = 1 << 27  # float32 logits elements for the one-pass path


def cache_attention(q_BxTxNxH, q_pos_BxT, k_BxSxKxH, v_BxSxKxH, k_pos_BxPxS, bound_B,
                    pattern: Pattern, *, scale: float | None = None,
                    softcap: float | None = None, implementation: str = "auto"):
  """Queries at absolute positions ``q_pos`` over the cache's slots ``< bound``."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown decode implementation {implementation!r}; choose one of "
                     f"{IMPLEMENTATIONS}")
  H, S = q_BxTxNxH.shape[-1], k_BxSxKxH.shape[1]
  if implementation == "auto":
    pow2 = H >= 16 and H & (H - 1) == 0
    on_gpu = jax.default_backend() == "gpu"
    implementation = "pallas" if on_gpu and pow2 and S % 16 == 0 else "xla"
  args = (q_BxTxNxH, q_pos_BxT, k_BxSxKxH, v_BxSxKxH, k_pos_BxPxS, bound_B)
  if implementation == "reference":
    return kernel.decode_attention_reference(*args, pattern, scale=scale, softcap=softcap)
  if implementation == "pallas":
    return kernel.decode_attention(*args, pattern, scale=scale, softcap=softcap,
                                   interpret=jax.default_backend() == "cpu")
  return cache_attention_xla(*args, pattern, scale=scale, softcap=softcap)


def _visible(pattern, q_pos_BxT, k_pos_BxPxS, slot_S, bound_B, K, G):
  """``[B, K, G, T, S]`` visibility (heads split into kv head and group)."""
  B, P, S = k_pos_BxPxS.shape
  qpos = q_pos_BxT[:, None, None, :, None]
  kpos = jnp.broadcast_to(k_pos_BxPxS, (B, K, S))[:, :, None, None, :]
  head = (jnp.arange(K)[:, None] * G + jnp.arange(G)[None, :])[None, :, :, None, None]
  vis = pattern.mask(qpos, kpos, head) & (kpos >= 0)
  return vis & (slot_S[None, None, None, None, :] < bound_B[:, None, None, None, None])


def _logits(q_BxKxGxTxH, k_BxSxKxH, scale, softcap):
  s = jnp.einsum("bkgth,bskh->bkgts", q_BxKxGxTxH, k_BxSxKxH.astype(q_BxKxGxTxH.dtype),
                 preferred_element_type=jnp.float32) * scale
  return softcap * jnp.tanh(s / softcap) if softcap else s


@functools.partial(jax.jit, static_argnames=("pattern", "scale", "softcap", "block_k"))
def cache_attention_xla(q_BxTxNxH, q_pos_BxT, k_BxSxKxH, v_BxSxKxH, k_pos_BxPxS, bound_B,
                        pattern: Pattern, *, scale: float | None = None,
                        softcap: float | None = None, block_k: int | None = None):
  """jnp cache attention (see the module docstring); ``block_k`` forces the loop."""
  B, T, N, H = q_BxTxNxH.shape
  _, S, K, _ = k_BxSxKxH.shape
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  q = q_BxTxNxH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
  if block_k is None and B * N * T * S <= _DENSE_LOGITS_BUDGET:
    block_k = S
  block_k = block_k or kernel.default_block_k(S) * 4
  while S % block_k:
    block_k //= 2
  n_needed = (jnp.max(bound_B) + block_k - 1) // block_k

  def body(j, carry):
    m, l, acc = carry
    k = lax.dynamic_slice_in_dim(k_BxSxKxH, j * block_k, block_k, axis=1)
    v = lax.dynamic_slice_in_dim(v_BxSxKxH, j * block_k, block_k, axis=1)
    k_pos = lax.dynamic_slice_in_dim(k_pos_BxPxS, j * block_k, block_k, axis=2)
    slot = j * block_k + jnp.arange(block_k)
    vis = _visible(pattern, q_pos_BxT, k_pos, slot, bound_B, K, G)
    s = jnp.where(vis, _logits(q, k, scale, softcap), -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(vis, jnp.exp(s - m_safe[..., None]), 0.0)
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + p.sum(-1)
    acc = alpha[..., None] * acc + jnp.einsum(
        "bkgts,bskh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((B, K, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
          jnp.zeros((B, K, G, T, H), jnp.float32))
  if block_k == S:
    m, l, acc = body(0, init)
  else:
    m, l, acc = lax.fori_loop(0, n_needed, body, init)
  seen = l > 0
  safe = jnp.where(seen, l, 1.0)
  out = (acc / safe[..., None]).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
  lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf).reshape(B, N, T)
  return out.astype(q_BxTxNxH.dtype), lse
