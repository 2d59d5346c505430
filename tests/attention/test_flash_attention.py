"""Portable Pallas kernels (interpret mode) against the dense reference in float32.

Outputs, lse and gradients (dq, dk, dv, with a cotangent on lse too) on fresh
random inputs; the seed is in every failure message.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import patterns as P
from lcjax.attention import reference
from pallas_kernels import flash_attention as fa

SMALL = fa.BlockSizes(16, 16, 16, 16, 16, 16)
MIXED = fa.BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                      block_q_dkv=32, block_k_dkv=16)


def _inputs(seed, B, T, S, N, K, H, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  ct = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  ct_lse = jnp.asarray(rng.standard_normal((B, N, T)), jnp.float32)
  return rng, q, k, v, ct, ct_lse


# Interpret-mode kernels are big XLA programs; a low optimisation level cuts
# their CPU compile time several-fold (results are unchanged).
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def compile_fast(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _value_and_grads(fn, q, k, v, ct, ct_lse):
  def loss(q, k, v):
    out, lse = fn(q, k, v)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.vdot(out.astype(jnp.float32), ct) + jnp.vdot(lse, ct_lse), (out, lse)
  (_, (out, lse)), grads = compile_fast(
      jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), q, k, v)
  return out, lse, grads


def _compare(pattern, *, B=1, T=40, S=40, N=4, K=2, H=16, q_offset=0,
             kv_offset=0, segments=False, softcap=None, blocks=SMALL,
             traced_offsets=False, dtype=jnp.float32, tol=2e-5):
  seed = np.random.SeedSequence().entropy % 2**32
  rng, q, k, v, ct, ct_lse = _inputs(seed, B, T, S, N, K, H, dtype)
  seg_q = seg_k = None
  if segments:
    seg_q = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), 1), jnp.int32)
    seg_k = jnp.asarray(np.sort(rng.integers(0, 4, (B, S)), 1), jnp.int32)

  def ours(q, k, v):
    qo, ko = q_offset, kv_offset
    if traced_offsets:  # exercise the on-device metadata path
      qo = jnp.asarray(q_offset, jnp.int32) + 0 * q.shape[0]
      qo = jax.lax.optimization_barrier(qo)
      ko = jax.lax.optimization_barrier(jnp.asarray(kv_offset, jnp.int32))
    return fa.flash_attention(q, k, v, pattern, q_segment_ids=seg_q,
                              kv_segment_ids=seg_k, q_offset=qo, kv_offset=ko,
                              softcap=softcap, return_lse=True,
                              block_sizes=blocks, interpret=True)

  def ref(q, k, v):
    return reference.dense_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        pattern, q_segment_ids_BxT=seg_q, kv_segment_ids_BxS=seg_k,
        q_offset=q_offset, kv_offset=kv_offset, softcap=softcap)

  got = _value_and_grads(ours, q, k, v, ct, ct_lse)
  want = _value_and_grads(ref, q, k, v, ct, ct_lse)
  names = ("out", "lse", "dq", "dk", "dv")
  flat_got = (got[0], got[1], *got[2])
  flat_want = (want[0], want[1], *want[2])
  for name, a, b in zip(names, flat_got, flat_want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert not np.isnan(a).any(), f"{name} has NaN (seed {seed})"
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol,
                               err_msg=f"{name} differs (seed {seed}, {pattern})")
  return got


PATTERNS = [
    P.Full(),
    P.Causal(),
    P.SlidingWindow(9),
    P.SlidingWindow(6, 5),
    P.SinkWindow(sink=3, window=8),
    P.TriShape(sink=2, window=5, dense_from=30),
    P.StridedBlockSparse(block_size=8, stride=3, local_blocks=1),
    P.StridedBlockSparse(block_size=4, stride=4, dense_heads=(2,)),
    P.CausalShiftedGroups(group_size=12, num_heads=4),
    P.Causal() | P.DocumentAnchor(),
    P.PerHead((P.Causal(), P.SinkWindow(2, 6), P.Full(), P.SlidingWindow(4, 4))),
    (P.Sink(5) | P.SlidingWindow(3, 3)) & P.Causal(),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: type(p).__name__)
def test_every_pattern_gqa_odd_lengths(pattern):
  _compare(pattern, T=37, S=45, N=4, K=2, H=16, q_offset=8)


def test_mqa_nonpow2_head_dim_and_mixed_blocks():
  _compare(P.SinkWindow(2, 11), B=2, T=50, S=50, N=3, K=1, H=24, blocks=MIXED)


def test_multi_head_attention_batch():
  _compare(P.Causal(), B=2, T=33, S=33, N=2, K=2, H=16, blocks=MIXED)


def test_segments_with_anchor_and_softcap():
  _compare(P.Causal() | P.DocumentAnchor(), B=2, T=41, S=41, segments=True,
           softcap=2.0)


def test_segments_strided_per_head():
  _compare(P.StridedBlockSparse(block_size=8, stride=2), B=2, T=48, S=48,
           segments=True)


def test_traced_offsets_chunked_prefill():
  # 20 new queries at positions 44..63 against a 64-token cache.
  _compare(P.SinkWindow(4, 16), T=20, S=64, q_offset=44, traced_offsets=True)


def test_traced_offsets_with_segments():
  _compare(P.Causal(), T=32, S=48, q_offset=16, segments=True,
           traced_offsets=True)


def test_softcap():
  _compare(P.SlidingWindow(12), T=40, S=40, softcap=1.5)


def test_fully_masked_rows_give_zero_and_no_nan():
  # Queries 0..9 see nothing: zeros, lse = -inf, finite gradients.
  pattern = P.QueryRange(10) & P.Causal()
  out, lse, grads = _compare(pattern, T=30, S=30)
  assert np.all(np.asarray(out)[:, :10] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[:, :, :10]) | (np.asarray(lse)[:, :, :10] == 0))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_rows_masked_by_offsets():
  # Keys start after every query: causal leaves all rows empty.
  _compare(P.Causal(), T=16, S=16, q_offset=0, kv_offset=100)


def test_block_mask_pattern_tiled_exactly():
  blocks = np.random.default_rng().random((3, 3)) > 0.4
  blocks[:, 0] = True
  pattern = P.BlockMask.from_array(blocks, 16, 16)
  _compare(pattern, T=48, S=48, blocks=SMALL)


def test_block_mask_pattern_rejects_partial_blocks():
  pattern = P.BlockMask.from_array(np.eye(3, dtype=bool), 16, 16) & P.Causal()
  q = jnp.ones((1, 48, 2, 16))
  with pytest.raises(ValueError, match="table lookup"):
    fa.flash_attention(q, q[:, :, :1], q[:, :, :1], pattern, block_sizes=SMALL)


def test_bfloat16_inputs():
  _compare(P.SinkWindow(4, 12), T=48, S=48, dtype=jnp.bfloat16, tol=2e-2)


def test_default_blocks_longer_sequence():
  _compare(P.StridedBlockSparse(block_size=32, stride=4), T=200, S=200, N=2,
           K=1, H=32, blocks=None)


def test_errors():
  q = jnp.ones((1, 16, 2, 16))
  with pytest.raises(ValueError, match="dtype"):
    fa.flash_attention(q.astype(jnp.int32), q, q, P.Causal())
  with pytest.raises(ValueError, match="both"):
    fa.flash_attention(q, q, q, P.Causal(), q_segment_ids=jnp.zeros((1, 16), int))
  with pytest.raises(ValueError, match="power of two"):
    fa.flash_attention(jnp.ones((1, 64, 2, 16)), q, q, P.Causal(),
                       block_sizes=fa.BlockSizes(block_q=48))


def test_large_tables_are_built_on_device(monkeypatch):
  # Above the constant-size limit the (conservative) device classification
  # replaces host tables; results must not change.
  monkeypatch.setattr(fa, "MAX_CONSTANT_TABLE_BYTES", 0)
  _compare(P.SinkWindow(sink=3, window=8), T=45, S=45)
  _compare(P.Causal() | P.DocumentAnchor(), T=40, S=40, segments=True)
