"""Dense and chunked references: agreement, lse, empty rows, per-head masks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import patterns as P
from lcjax.attention import reference


def _inputs(B=2, T=45, S=53, N=4, K=2, H=8):
  rng = np.random.default_rng()
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
  seg_q = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), 1), jnp.int32)
  seg_k = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), 1), jnp.int32)
  return q, k, v, seg_q, seg_k


def _naive(q, k, v, pattern, seg_q=None, seg_k=None, q_offset=0, kv_offset=0,
           softcap=None):
  """Per-head loops over numpy: an independent statement of the semantics."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  out = np.zeros_like(q)
  lse = np.full((B, N, T), -np.inf)
  mask = pattern.dense_mask(T, S, q_offset, kv_offset, N)
  for b in range(B):
    for h in range(N):
      s = q[b, :, h] @ k[b, :, h // (N // K)].T / np.sqrt(H)
      if softcap:
        s = softcap * np.tanh(s / softcap)
      m = mask[h].copy()
      if seg_q is not None:
        same = np.asarray(seg_q)[b][:, None] == np.asarray(seg_k)[b][None, :]
        ex = np.broadcast_to(pattern.segment_exempt(
            q_offset + np.arange(T)[:, None], kv_offset + np.arange(S)[None, :],
            np.int64(h)), (T, S))
        m &= same | ex
      for t in range(T):
        if m[t].any():
          row = np.where(m[t], s[t], -np.inf)
          mx = row.max()
          p = np.exp(row - mx)
          out[b, t, h] = p @ v[b, :, h // (N // K)] / p.sum()
          lse[b, h, t] = mx + np.log(p.sum())
  return out, lse


FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def compile_fast(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


PATTERNS = [P.Causal(), P.SinkWindow(2, 9), P.StridedBlockSparse(4, 3),
            P.PerHead((P.Causal(), P.Full(), P.SlidingWindow(3, 3), P.Sink(2))),
            P.Causal() | P.DocumentAnchor(), P.CausalShiftedGroups(8, 4)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("segments", [False, True])
def test_dense_matches_naive_loops(pattern, segments):
  q, k, v, seg_q, seg_k = _inputs()
  if not segments:
    seg_q = seg_k = None
  out, lse = reference.dense_attention(
      q, k, v, pattern, q_segment_ids_BxT=seg_q, kv_segment_ids_BxS=seg_k,
      q_offset=7, kv_offset=2, softcap=3.0)
  want_out, want_lse = _naive(q, k, v, pattern, seg_q, seg_k, 7, 2, 3.0)
  np.testing.assert_allclose(out, want_out, atol=2e-5)
  np.testing.assert_allclose(lse, want_lse, atol=2e-5)


@pytest.mark.parametrize("pattern", PATTERNS[2:5], ids=lambda p: type(p).__name__)
def test_chunked_matches_dense_values_and_grads(pattern):
  q, k, v, seg_q, seg_k = _inputs()
  kw = dict(q_segment_ids_BxT=seg_q, kv_segment_ids_BxS=seg_k, q_offset=7,
            kv_offset=2, softcap=4.0)

  def value_and_grads(fn, **extra):
    def loss(q, k, v):
      out, lse = fn(q, k, v, pattern, **kw, **extra)
      finite = jnp.where(jnp.isfinite(lse), lse, 0)
      return (out ** 2).sum() + finite.sum(), (out, lse)
    return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)

  def both(q, k, v):
    return (value_and_grads(reference.dense_attention)(q, k, v),
            value_and_grads(reference.chunked_attention, q_chunk=16,
                            kv_chunk=8)(q, k, v))

  ((_, dense), g_dense), ((_, chunked), g_chunk) = compile_fast(both, q, k, v)
  np.testing.assert_allclose(chunked[0], dense[0], atol=1e-5)
  np.testing.assert_array_equal(np.isinf(chunked[1]), np.isinf(dense[1]))
  np.testing.assert_allclose(chunked[1], dense[1], atol=1e-5)
  for a, b in zip(g_chunk, g_dense):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_chunked_with_traced_offsets():
  q, k, v, _, _ = _inputs(B=1, T=20, S=40)
  out, lse = compile_fast(lambda qo: reference.chunked_attention(
      q, k, v, P.SinkWindow(3, 7), q_offset=qo, q_chunk=8, kv_chunk=16),
      jnp.int32(20))
  want = reference.dense_attention(q, k, v, P.SinkWindow(3, 7), q_offset=20)
  np.testing.assert_allclose(out, want[0], atol=1e-5)
  np.testing.assert_allclose(lse, want[1], atol=1e-5)


def test_empty_rows_are_zero_with_neg_inf_lse_and_finite_grads():
  q, k, v, _, _ = _inputs(B=1, T=16, S=16)
  pattern = P.QueryRange(6) & P.Causal()
  for fn in (reference.dense_attention, reference.chunked_attention):
    def loss(q, k, v, fn=fn):
      out, lse = fn(q, k, v, pattern)
      return (out ** 2).sum(), (out, lse)
    (_, (out, lse)), grads = compile_fast(
        jax.value_and_grad(loss, (0, 1, 2), has_aux=True), q, k, v)
    assert np.all(np.asarray(out)[:, :6] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, :6]))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
