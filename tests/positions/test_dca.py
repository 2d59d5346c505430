"""Dual Chunk Attention: reference, one-chunk equivalence, decode == prefill, model."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import Causal, attend
from lcjax.config import ModelConfig, RopeConfig
from lcjax.model import Decoder
from lcjax.positions import dca
from lcjax.positions.rope import apply_rope


def _qkv(seed, B, T, N, K, H, S=None):
  ks = jax.random.split(jax.random.key(seed), 3)
  S = T if S is None else S
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


def _positions(B, T, offset=0):
  return jnp.broadcast_to(offset + jnp.arange(T), (B, T))


# Jitted entry points: one compilation per shape instead of op-by-op dispatch.
_STATIC = ("chunk_size", "local_window", "rope", "keys_rotated")
dca_attend = jax.jit(dca.dca_attend, static_argnames=_STATIC)
dca_reference = jax.jit(dca.dca_reference, static_argnames=_STATIC[:3])


@functools.partial(jax.jit, static_argnames=("rope",))
def _ordinary(q, k, v, pos, rope):
  return attend(apply_rope(q, pos, rope), apply_rope(k, pos, rope), v, Causal())


ROPES = [RopeConfig(), RopeConfig(kind="yarn", factor=4.0, original_max_len=32)]


@pytest.mark.parametrize("rope", ROPES, ids=["plain", "yarn"])
def test_equals_ordinary_attention_when_the_sequence_fits_in_one_chunk(rope):
  q, k, v = _qkv(0, B=2, T=29, N=6, K=2, H=16)
  pos = _positions(2, 29)
  ordinary = _ordinary(q, k, v, pos, rope)
  for chunk_size, window in ((40, 11), (29, 0)):  # chunk_len >= 29
    out = dca_attend(q, k, v, chunk_size=chunk_size, local_window=window, rope=rope)
    np.testing.assert_allclose(out, ordinary, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("sizes,rope", [((10, 3), ROPES[0]), ((7, 0), ROPES[1])],
                         ids=["plain", "yarn"])
def test_pattern_implementation_matches_the_dense_reference(sizes, rope):
  chunk_size, window = sizes
  q, k, v = _qkv(1, B=2, T=45, N=4, K=2, H=8)
  pos = _positions(2, 45)
  out = dca_attend(q, k, v, chunk_size=chunk_size, local_window=window, rope=rope)
  ref = dca_reference(q, k, v, q_positions_BxT=pos, k_positions_BxS=pos,
                      chunk_size=chunk_size, local_window=window, rope=rope)
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=2e-6)
  plain = _ordinary(q, k, v, pos, rope)
  assert np.abs(np.asarray(out - plain)).max() > 1e-2  # past one chunk DCA differs


def test_reference_position_maps_by_hand():
  """chunk_size 10, window 3 -> chunk_len 7: hand-computed relative distances."""
  q_pos = jnp.array([0, 6, 7, 9, 10, 13, 14, 20, 30])
  intra, succ, inter = dca.query_positions(q_pos, 10, 3)
  np.testing.assert_array_equal(intra, [0, 6, 0, 2, 3, 6, 0, 6, 2])
  np.testing.assert_array_equal(succ, [7, 10, 7, 9, 10, 10, 7, 10, 9])
  np.testing.assert_array_equal(inter, [10] * 9)
  np.testing.assert_array_equal(dca.key_positions(jnp.arange(15), 10, 3),
                                [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0])
  # Query 9 (chunk 1, the local window) sees key 5 (chunk 0) at its true distance.
  assert int(succ[3]) - 5 == 9 - 5
  # Query 13 (past the window) sees key 5 at distance min(13 mod 7 + 7, 10) - 5.
  assert int(succ[5]) - 5 == 5


def test_gradients_match_the_dense_reference():
  q, k, v = _qkv(2, B=1, T=21, N=2, K=1, H=8)
  pos = _positions(1, 21)
  rope = RopeConfig()
  f = lambda *a: jnp.sum(dca.dca_attend(*a, chunk_size=8, local_window=2, rope=rope) ** 2)
  g = lambda *a: jnp.sum(dca.dca_reference(*a, q_positions_BxT=pos, k_positions_BxS=pos,
                                           chunk_size=8, local_window=2, rope=rope) ** 2)
  for a, b in zip(jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v),
                  jax.jit(jax.grad(g, (0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("rope", ROPES, ids=["plain", "yarn"])
def test_decode_against_a_kv_cache_equals_prefill(rope):
  """One query at a time (traced position) against a fixed-size cache of keys
  rotated when written, as an inference engine runs it."""
  B, T, N, K, H, cache = 2, 40, 4, 2, 16, 48
  q, k, v = _qkv(3, B, T, N, K, H)
  chunk_size, window = 11, 3
  prefill = dca_attend(q, k, v, chunk_size=chunk_size, local_window=window, rope=rope)
  k_cache = jnp.zeros((B, cache, K, H)).at[:, :T].set(
      dca.rotate_keys(k, _positions(B, T), chunk_size=chunk_size, local_window=window,
                      rope=rope))
  v_cache = jnp.zeros((B, cache, K, H)).at[:, :T].set(v) + 100.0 * (
      jnp.arange(cache) >= T)[None, :, None, None]  # garbage past the written slots

  @jax.jit
  def decode(q_t, t):
    return dca.dca_attend(q_t, k_cache, v_cache, chunk_size=chunk_size,
                          local_window=window, rope=rope, q_offset=t, keys_rotated=True)

  steps = jnp.stack([decode(q[:, t:t + 1], t)[:, 0] for t in range(T)], axis=1)
  np.testing.assert_allclose(steps, prefill, atol=3e-6, rtol=3e-6)


def test_chunked_prefill_with_offsets_equals_one_prefill():
  q, k, v = _qkv(4, B=1, T=30, N=2, K=2, H=8)
  rope, kw = RopeConfig(), dict(chunk_size=9, local_window=2)
  full = dca_attend(q, k, v, rope=rope, **kw)
  second = dca_attend(q[:, 17:], k, v, rope=rope, q_offset=17, **kw)
  np.testing.assert_allclose(second, full[:, 17:], atol=2e-6)


def test_model_uses_dca_from_the_config_and_matches_plain_in_the_first_chunk():
  cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=48)
  tokens = jax.random.randint(jax.random.key(5), (2, 24), 0, 64)
  params = jax.jit(Decoder(cfg).init)(jax.random.key(6), tokens)["params"]
  logits = lambda c: jax.jit(Decoder(c).apply)({"params": params}, tokens)
  plain = logits(cfg)
  chunked = dataclasses.replace(cfg, rope=RopeConfig(dca_chunk_size=8, dca_local_window=2))
  out = logits(chunked)
  assert np.abs(np.asarray(out - plain)).max() > 1e-4
  np.testing.assert_allclose(out[:, :6], plain[:, :6], atol=2e-5, rtol=2e-5)  # chunk 0


@pytest.mark.parametrize("kw,match", [
    (dict(chunk_size=10, local_window=5), "local_window < chunk_size / 2"),
    (dict(chunk_size=10, local_window=-1), "local_window < chunk_size / 2"),
    (dict(chunk_size=10.0, local_window=2), "must be ints"),
])
def test_bad_sizes_are_rejected(kw, match):
  q, k, v = _qkv(7, 1, 4, 1, 1, 8)
  with pytest.raises(ValueError, match=match):
    dca.dca_attend(q, k, v, rope=RopeConfig(), **kw)
  with pytest.raises(ValueError, match="'dynamic'"):
    dca.dca_attend(q, k, v, chunk_size=8, local_window=2,
                   rope=RopeConfig(kind="dynamic", factor=2.0, original_max_len=4))


def test_decode_step_with_a_different_position_per_row():
  B, T, N, K, H = 3, 26, 2, 1, 8
  q, k, v = _qkv(8, B, T, N, K, H)
  rope, kw = RopeConfig(), dict(chunk_size=9, local_window=2)
  prefill = dca_attend(q, k, v, rope=rope, **kw)
  k_cache = dca.rotate_keys(k, _positions(B, T), rope=rope, **kw)
  t = jnp.array([3, 25, 14])
  rows = jnp.arange(B)
  out = jax.jit(lambda *a: dca.dca_decode(*a, rope=rope, **kw))(
      q[rows, t][:, None], k_cache, v, t)
  np.testing.assert_allclose(out[:, 0], prefill[rows, t], atol=3e-6, rtol=3e-6)
