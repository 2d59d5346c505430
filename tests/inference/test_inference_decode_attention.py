"""Cache attention: the Pallas kernel (interpreted) and the XLA path against the
dense reference, and the reference against plain causal attention."""
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import Causal
from lcjax.attention.patterns import SinkWindow, StridedBlockSparse
from lcjax.attention.reference import dense_attention
from lcjax.inference.cache_attention import cache_attention, cache_attention_xla
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference

PATTERNS = [
    (Causal(), 1),
    (SinkWindow(sink=3, window=9), 1),
    (StridedBlockSparse(block_size=4, stride=3, local_blocks=2), "per kv head"),
]


def _num_pos(P, K):
  return K if P == "per kv head" else P


def _inputs(seed, B, T, N, K, H, S, P, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), dtype)
  k = jnp.asarray(rng.normal(size=(B, S, K, H)), dtype)
  v = jnp.asarray(rng.normal(size=(B, S, K, H)), dtype)
  # Slots hold a shuffled set of earlier positions, some empty (-1).
  k_pos = np.stack([np.stack([rng.permutation(S) for _ in range(P)]) for _ in range(B)])
  k_pos = np.where(rng.uniform(size=k_pos.shape) < 0.15, -1, k_pos + 3)
  q_pos = rng.integers(S // 2, S + 8, size=(B, T))
  bound = rng.integers(S // 2, S + 1, size=(B,))
  return q, jnp.asarray(q_pos, jnp.int32), k, v, jnp.asarray(k_pos, jnp.int32), jnp.asarray(
      bound, jnp.int32)


def _close(a, b, atol):
  out_a, lse_a = a
  out_b, lse_b = b
  np.testing.assert_allclose(np.asarray(out_a, np.float32), np.asarray(out_b, np.float32),
                             atol=atol, rtol=atol)
  assert np.array_equal(np.isinf(lse_a), np.isinf(lse_b))
  fin = np.isfinite(lse_b)
  np.testing.assert_allclose(np.asarray(lse_a)[fin], np.asarray(lse_b)[fin], atol=atol,
                             rtol=atol)


@pytest.mark.parametrize("pattern, P", PATTERNS)
@pytest.mark.parametrize("T", [1, 5])
def test_pallas_kernel_matches_reference(pattern, P, T):
  B, N, K, H, S = 2, 6, 3, 16, 48
  args = _inputs(T * 7, B, T, N, K, H, S, _num_pos(P, K))
  want = decode_attention_reference(*args, pattern, softcap=None)
  got = decode_attention(*args, pattern, interpret=True, block_k=16, num_splits=2)
  _close(got, want, 2e-5)


def test_pallas_kernel_softcap_and_row_tiles():
  B, T, N, K, H, S = 1, 9, 4, 1, 32, 32
  args = _inputs(11, B, T, N, K, H, S, 1)
  pattern = SinkWindow(sink=2, window=6)
  want = decode_attention_reference(*args, pattern, softcap=5.0)
  got = decode_attention(*args, pattern, softcap=5.0, interpret=True, block_k=8, block_r=16)
  _close(got, want, 2e-5)


@pytest.mark.parametrize("pattern, P", PATTERNS)
def test_xla_path_matches_reference(pattern, P):
  B, T, N, K, H, S = 2, 3, 4, 2, 8, 64
  args = _inputs(5, B, T, N, K, H, S, _num_pos(P, K))
  want = decode_attention_reference(*args, pattern, softcap=3.0)
  _close(cache_attention_xla(*args, pattern, softcap=3.0), want, 1e-5)  # one pass
  _close(cache_attention_xla(*args, pattern, softcap=3.0, block_k=16), want, 1e-5)  # loop


def test_empty_rows_give_zeros_and_minus_inf():
  B, T, N, K, H, S = 1, 2, 2, 1, 16, 16
  q, q_pos, k, v, k_pos, _ = _inputs(3, B, T, N, K, H, S, 1)
  bound = jnp.zeros((B,), jnp.int32)  # nothing written yet
  for impl in ("reference", "xla", "pallas"):
    out, lse = cache_attention(q, q_pos, k, v, k_pos, bound, Causal(), implementation=impl)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_reference_equals_causal_attention_on_a_full_cache():
  """Slots 0..S-1 holding positions 0..S-1: the last T queries equal dense causal attention."""
  B, N, K, H, S, T = 2, 4, 2, 16, 24, 3
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(B, S, N, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
  want, want_lse = dense_attention(q, k, v, Causal())
  q_pos = jnp.broadcast_to(jnp.arange(S - T, S), (B, T))
  k_pos = jnp.broadcast_to(jnp.arange(S), (B, 1, S))
  got, lse = decode_attention_reference(q[:, S - T:], q_pos, k, v, k_pos,
                                        jnp.full((B,), S), Causal())
  np.testing.assert_allclose(got, want[:, S - T:], atol=1e-5)
  np.testing.assert_allclose(lse, want_lse[:, :, S - T:], atol=1e-5)


def test_bf16_kernel_close_to_reference():
  B, T, N, K, H, S = 1, 1, 8, 2, 32, 64
  args = _inputs(9, B, T, N, K, H, S, 1, dtype=jnp.bfloat16)
  want = decode_attention_reference(*args, Causal())
  got = decode_attention(*args, Causal(), interpret=True)
  _close(got, want, 3e-2)


def test_bad_shapes_are_rejected():
  q, q_pos, k, v, k_pos, bound = _inputs(1, 1, 1, 4, 2, 8, 16, 1)
  with pytest.raises(ValueError, match="k_pos"):
    decode_attention_reference(q, q_pos, k, v, k_pos[:, :, :8], bound, Causal())
  with pytest.raises(ValueError, match="block_k=5 must divide"):
    decode_attention(q, q_pos, k, v, k_pos, bound, Causal(), block_k=5, interpret=True)
  with pytest.raises(ValueError, match="unknown decode implementation"):
    cache_attention(q, q_pos, k, v, k_pos, bound, Causal(), implementation="cuda")
