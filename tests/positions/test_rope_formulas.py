"""RoPE variants against their papers' formulas; precision at long positions."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import RopeConfig
from lcjax.positions import rope

H = 64


def _inv(cfg, seq_len=None, head_dim=H):
  return np.asarray(rope.inverse_frequencies(head_dim, cfg, seq_len), np.float64)


def _plain(theta=10_000.0, head_dim=H):
  return theta ** (-np.arange(0, head_dim, 2) / head_dim)


def test_plain_and_abf_are_theta_powers():
  np.testing.assert_allclose(_inv(RopeConfig()), _plain(), rtol=1e-6)
  np.testing.assert_allclose(_inv(RopeConfig(theta=5e5)), _plain(5e5), rtol=1e-6)


def test_linear_interpolation_divides_positions():
  x = jax.random.normal(jax.random.key(0), (2, 9, 3, H))
  pos = jax.random.randint(jax.random.key(1), (2, 9), 0, 5000)
  pi = rope.apply_rope(x, pos, RopeConfig(kind="linear", factor=4.0))
  plain = rope.apply_rope(x, pos / 4.0, RopeConfig())
  np.testing.assert_allclose(pi, plain, atol=2e-5)


@pytest.mark.parametrize("factor", [2.0, 4.0, 16.0])
def test_ntk_keeps_the_highest_and_interpolates_the_lowest_frequency(factor):
  inv = _inv(RopeConfig(kind="ntk", factor=factor))
  base = 10_000.0 * factor ** (H / (H - 2))
  np.testing.assert_allclose(inv, base ** (-np.arange(0, H, 2) / H), rtol=2e-6)
  assert inv[0] == 1.0
  np.testing.assert_allclose(inv[-1], _plain()[-1] / factor, rtol=2e-6)


def test_dynamic_ntk_is_plain_up_to_the_original_length_then_ntk():
  cfg = RopeConfig(kind="dynamic", factor=4.0, original_max_len=1000)
  np.testing.assert_allclose(_inv(cfg, 10), _plain(), rtol=1e-6)
  np.testing.assert_allclose(_inv(cfg, 1000), _plain(), rtol=1e-6)
  # scale factor * L / orig - (factor - 1) = 4 at L = 1750: the static NTK base.
  np.testing.assert_allclose(_inv(cfg, 1750), _inv(RopeConfig(kind="ntk", factor=4.0)),
                             rtol=2e-6)
  # Traced length (the model's default: max(position) + 1) gives the same.
  traced = jax.jit(lambda n: rope.inverse_frequencies(H, cfg, n))(1750)
  np.testing.assert_allclose(traced, _inv(cfg, 1750), rtol=2e-6)


def test_yarn_ramp_extrapolates_fast_dims_and_interpolates_slow_dims():
  orig, factor = 2048, 8.0
  for truncate in (True, False):
    cfg = RopeConfig(kind="yarn", factor=factor, original_max_len=orig,
                     yarn_truncate=truncate)
    inv, plain = _inv(cfg), _plain()
    rotations = orig * plain / (2 * math.pi)  # turns over the trained length
    fast, slow = rotations > cfg.beta_fast, rotations < cfg.beta_slow
    assert fast.sum() >= 3 and slow.sum() >= 3
    np.testing.assert_allclose(inv[fast], plain[fast], rtol=1e-6)
    np.testing.assert_allclose(inv[slow], plain[slow] / factor, rtol=1e-6)
    # In between: the fraction interpolated grows linearly in the dimension index.
    weight = (plain - inv) / (plain - plain / factor)  # 0: extrapolate, 1: interpolate
    assert np.all((weight > -1e-6) & (weight < 1 + 1e-6))
    assert np.all(np.diff(weight) >= -1e-6)
    low = H * math.log(orig / (cfg.beta_fast * 2 * math.pi)) / (2 * math.log(1e4))
    high = H * math.log(orig / (cfg.beta_slow * 2 * math.pi)) / (2 * math.log(1e4))
    if truncate:
      low, high = math.floor(low), math.ceil(high)
    expect = np.clip((np.arange(H // 2) - low) / (high - low), 0, 1)
    np.testing.assert_allclose(weight, expect, atol=2e-5)


@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0, 32.0])
def test_yarn_temperature_scales_logits_by_attention_factor_squared(factor):
  cfg = RopeConfig(kind="yarn", factor=factor, original_max_len=512)
  af = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
  assert rope.attention_factor(cfg) == pytest.approx(af)
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, H))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, H))
  pos = jnp.array([[777]])
  logit = jnp.sum(rope.apply_rope(q, pos, cfg) * rope.apply_rope(k, pos, cfg))
  np.testing.assert_allclose(logit, af ** 2 * jnp.sum(q * k), rtol=2e-5)
  deepseek = RopeConfig(kind="yarn", factor=factor, original_max_len=512, mscale=1.0,
                        mscale_all_dim=1.0)
  assert rope.attention_factor(deepseek) == pytest.approx(1.0)


def test_llama3_scales_low_frequencies_only():
  cfg = RopeConfig(kind="llama3", factor=8.0, theta=5e5, original_max_len=8192,
                   low_freq_factor=1.0, high_freq_factor=4.0)
  inv, plain = _inv(cfg, head_dim=128), _plain(5e5, 128)
  wavelen = 2 * math.pi / plain
  high, low = wavelen < 8192 / 4.0, wavelen > 8192 / 1.0
  np.testing.assert_allclose(inv[high], plain[high], rtol=1e-6)
  np.testing.assert_allclose(inv[low], plain[low] / 8.0, rtol=1e-6)
  mid = ~high & ~low
  smooth = (8192 / wavelen[mid] - 1.0) / 3.0
  np.testing.assert_allclose(inv[mid], (1 - smooth) * plain[mid] / 8 + smooth * plain[mid],
                             rtol=1e-5)


@pytest.mark.parametrize("cfg", [
    RopeConfig(), RopeConfig(kind="linear", factor=4.0), RopeConfig(kind="ntk", factor=4.0),
    RopeConfig(kind="yarn", factor=4.0, original_max_len=256),
    RopeConfig(kind="llama3", factor=8.0, original_max_len=256),
    RopeConfig(angles="float64")], ids=lambda c: f"{c.kind}-{c.angles}")
def test_logits_depend_only_on_relative_position(cfg):
  q = jax.random.normal(jax.random.key(2), (1, 1, 1, H))
  k = jax.random.normal(jax.random.key(3), (1, 1, 1, H))

  def logit(m, n):
    return float(jnp.sum(rope.apply_rope(q, jnp.array([[m]]), cfg) *
                         rope.apply_rope(k, jnp.array([[n]]), cfg)))

  for delta in (0, 1, 17, 250):
    ref = logit(delta, 0)
    for start in (3, 1000, 4093):
      assert logit(start + delta, start) == pytest.approx(ref, abs=5e-3)


def _angle_error(cos, sin, positions, inv_freq64):
  exact = np.fmod(positions[:, None].astype(np.float64) * inv_freq64, 2 * np.pi)
  got = np.arctan2(np.asarray(sin, np.float64), np.asarray(cos, np.float64))
  return np.abs(np.angle(np.exp(1j * (got - exact))))  # wrapped difference


def test_float64_angles_stay_exact_past_a_million_positions():
  plain = RopeConfig()
  positions = np.array([0, 1, 1000, 123_456, 1 << 20, 3_000_017, (1 << 24) - 1,
                        (1 << 31) - 1])
  inv64 = _inv(plain)  # the float32 frequencies, as float64
  cos32, sin32 = rope.rope_cos_sin(jnp.asarray(positions), H, plain)
  err32 = _angle_error(cos32, sin32, positions, inv64)
  wide = RopeConfig(angles="float64")
  cos64, sin64 = rope.rope_cos_sin(jnp.asarray(positions), H, wide)
  err64 = _angle_error(cos64, sin64, positions,
                       rope.inverse_frequencies(H, wide, xp=np))
  assert err64.max() < 2e-6
  assert err32[positions >= 1 << 20].max() > 1e-2  # why the float64 path exists
  assert err32[positions <= 1000].max() < 1e-4
  # Fractional positions (interpolation, V2PE) work on the float64 path too.
  frac = np.array([0.25, 1000.5, 2_000_000.75])
  c, s = rope.rope_cos_sin(jnp.asarray(frac, jnp.float32), H, wide)
  assert _angle_error(c, s, np.asarray(frac, np.float32).astype(np.float64),
                      rope.inverse_frequencies(H, wide, xp=np)).max() < 1e-5


def test_bf16_rope_drift_at_128k_positions():
  """AnchorAttention's failure: bf16 RoPE breaks relative positions at long
  context. Ours keeps angles and rotation in float32 for bf16 inputs, so the
  logit of a fixed relative distance barely moves between position 0 and 128K;
  computing RoPE in bf16 (positions, angles, rotation) drifts by O(1)."""
  cfg = RopeConfig()
  q = jax.random.normal(jax.random.key(4), (1, 1, 1, H))
  k = jax.random.normal(jax.random.key(5), (1, 1, 1, H))
  starts = np.array([0, 1000, 32_768, 100_000, 131_072 - 64])
  deltas = np.array([1, 7, 50])

  def ours(dtype):
    out = []
    for s in starts:
      qr = rope.apply_rope(q.astype(dtype), jnp.array([[s]]) + deltas[:, None].T, cfg)
      kr = rope.apply_rope(k.astype(dtype), jnp.array([[s]]), cfg)
      out.append(jnp.sum(qr.astype(jnp.float32) * kr.astype(jnp.float32), axis=-1)[0, :, 0])
    return np.stack(out)  # [starts, deltas]

  def naive_bf16():
    inv = rope.inverse_frequencies(H, cfg).astype(jnp.bfloat16)

    def rot(x, p):
      ang = jnp.asarray(p, jnp.bfloat16)[..., None] * inv
      c, s = jnp.cos(ang), jnp.sin(ang)
      x = x.astype(jnp.bfloat16)
      x1, x2 = x[..., :H // 2], x[..., H // 2:]
      return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).astype(jnp.float32)

    return np.stack([[float(jnp.sum(rot(q[0, 0, 0], s + d) * rot(k[0, 0, 0], s)))
                      for d in deltas] for s in starts])

  f32, bf16_in, naive = ours(jnp.float32), ours(jnp.bfloat16), naive_bf16()
  scale = float(jnp.sqrt(jnp.sum(q * q) * jnp.sum(k * k)))
  drift = lambda table: np.abs(table - table[:1]).max() / scale
  assert drift(f32) < 1e-3
  assert drift(bf16_in) < 5e-3  # only the bf16 rounding of inputs and outputs
  assert drift(naive) > 0.1


@pytest.mark.parametrize("cfg,match", [
    (RopeConfig(kind="ropey"), "unknown rope kind 'ropey'"),
    (RopeConfig(kind="linear", factor=0.5), "factor=0.5 must be >= 1"),
    (RopeConfig(factor=2.0), "factor=2.0 has no effect with kind 'plain'"),
    (RopeConfig(kind="yarn", factor=2.0), "needs rope.original_max_len"),
    (RopeConfig(angles="float16"), "rope.angles='float16'"),
    (RopeConfig(theta=1.0), "theta=1.0 must be > 1"),
])
def test_bad_configs_are_rejected_with_their_value(cfg, match):
  with pytest.raises(ValueError, match=match):
    rope.inverse_frequencies(H, cfg, 100)


def test_dynamic_float64_needs_a_static_length():
  cfg = RopeConfig(kind="dynamic", factor=2.0, original_max_len=100, angles="float64")
  with pytest.raises(ValueError, match="pass seq_len as a Python int"):
    rope.rope_cos_sin(jnp.arange(10), H, cfg)
  cos, _ = rope.rope_cos_sin(jnp.arange(300), H, cfg, seq_len=300)
  ref, _ = rope.rope_cos_sin(jnp.arange(300), H,
                             dataclasses.replace(cfg, angles="float32"), seq_len=300)
  np.testing.assert_allclose(cos, ref, atol=2e-4)
