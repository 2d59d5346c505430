"""Rotary position embeddings (RoPE; Su et al., 2021) and their long-context scalings.

``RopeConfig.kind`` picks the inverse frequencies (Hugging Face transformers'
``rope_type`` in brackets; ours match theirs position by position, see
``tests/positions/test_rope_hf.py``):

* ``plain`` ["default"]: ``theta ** (-2i / d)``. ABF ("Effective Long-Context
  Scaling", Xiong et al., 2023) is ``plain`` with a larger ``theta``.
* ``linear`` ["linear"]: position interpolation (Chen et al., 2023): every
  frequency divided by ``factor``.
* ``ntk``: NTK-aware scaling (bloc97, 2023): base ``theta * factor ** (d / (d - 2))``,
  which keeps the highest frequency and interpolates the lowest by ``factor``.
* ``dynamic`` ["dynamic"]: dynamic NTK (emozilla, 2023): the NTK base for the
  current length ``L > original_max_len`` with the scale
  ``factor * L / original_max_len - (factor - 1)``; the plain base up to
  ``original_max_len``. ``L`` is ``seq_len`` if given, else ``max(positions) + 1``.
* ``yarn`` ["yarn"]: YaRN (Peng et al., 2023): per dimension a linear ramp
  between interpolation (wavelengths longer than ``original_max_len /
  beta_slow``) and extrapolation (shorter than ``original_max_len /
  beta_fast``), and an attention temperature: cos and sin are multiplied by
  ``attention_factor`` (default ``0.1 ln(factor) + 1``), so the logits are
  scaled by its square, exactly as transformers does.
* ``llama3`` ["llama3"]: Llama 3.1's piecewise frequency scaling.

Precision: the angles ``position * frequency`` are computed in float32 (the same
arithmetic as transformers) and the rotation is done in float32; only the
result is cast back to the input dtype. The AnchorAttention paper (Wang et al.,
2024) shows that bf16 RoPE breaks relative positions at long context. float32
angles lose accuracy too once ``position * frequency`` is large (the absolute
error is about ``position * 6e-8`` radians: 0.06 at 1M positions), so
``angles="float64"`` reduces every angle modulo 2 pi in float64 on the host:
positions are split into four 8-bit digits and the rotation is the product of
four rotations looked up in float64-accurate tables (float32 on device, no
``jax_enable_x64``), accurate to about 1e-6 radians at any int32 position.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import RopeConfig

ROPE_KINDS = ("plain", "linear", "ntk", "dynamic", "yarn", "llama3")
ANGLE_PRECISIONS = ("float32", "float64")
_SCALED_KINDS = ("linear", "ntk", "dynamic", "yarn", "llama3")
_NEEDS_ORIGINAL_LEN = ("dynamic", "yarn", "llama3")
_DIGIT_BITS = 8
_NUM_DIGITS = 4  # 4 x 8 bits: every non-negative int32 position


def validate(cfg: RopeConfig) -> None:
  """Raises ``ValueError`` naming the bad field of ``cfg`` and what is allowed."""
  if cfg.kind not in ROPE_KINDS:
    raise ValueError(f"unknown rope kind {cfg.kind!r}; choose one of {ROPE_KINDS}")
  if cfg.theta <= 1.0:
    raise ValueError(f"rope.theta={cfg.theta} must be > 1")
  if cfg.kind in _SCALED_KINDS and cfg.factor < 1.0:
    raise ValueError(f"rope.factor={cfg.factor} must be >= 1 (the context extension "
                     f"ratio) for kind {cfg.kind!r}")
  if cfg.kind not in _SCALED_KINDS and cfg.factor != 1.0:
    raise ValueError(f"rope.factor={cfg.factor} has no effect with kind {cfg.kind!r}; "
                     f"it applies to {_SCALED_KINDS}")
  if cfg.kind in _NEEDS_ORIGINAL_LEN and cfg.original_max_len < 1:
    raise ValueError(f"rope kind {cfg.kind!r} needs rope.original_max_len (the "
                     f"trained context length) > 0, got {cfg.original_max_len}")
  if cfg.kind == "llama3" and not cfg.high_freq_factor > cfg.low_freq_factor > 0:
    raise ValueError(f"llama3 needs high_freq_factor > low_freq_factor > 0, got "
                     f"{cfg.high_freq_factor} and {cfg.low_freq_factor}")
  if cfg.angles not in ANGLE_PRECISIONS:
    raise ValueError(f"rope.angles={cfg.angles!r}; choose one of {ANGLE_PRECISIONS}")


def attention_factor(cfg: RopeConfig) -> float:
  """The factor on cos and sin (YaRN's ``sqrt(1/t)``, DeepSeek's mscale); 1 otherwise."""
  if cfg.kind != "yarn":
    return 1.0
  if cfg.attention_factor > 0:
    return float(cfg.attention_factor)

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if cfg.mscale and cfg.mscale_all_dim:
    return float(mscale(cfg.factor, cfg.mscale) / mscale(cfg.factor, cfg.mscale_all_dim))
  return mscale(cfg.factor)


def inverse_frequencies(head_dim: int, cfg: RopeConfig, seq_len=None, *, xp=jnp):
  """``[head_dim // 2]`` inverse frequencies of ``cfg.kind``.

  ``xp=jnp`` computes in float32 with transformers' arithmetic; ``xp=np`` in
  float64 (used by ``angles="float64"``). ``seq_len`` is only read by
  ``dynamic`` (a Python int or a traced scalar).
  """
  validate(cfg)
  if head_dim % 2 or head_dim < 4:
    raise ValueError(f"RoPE needs an even head_dim >= 4, got {head_dim}")
  dtype = np.float64 if xp is np else jnp.float32
  d, f = head_dim, cfg.factor
  exponents = xp.arange(0, d, 2).astype(dtype) / d
  base = cfg.theta
  if cfg.kind == "ntk":
    base = base * f ** (d / (d - 2))
  elif cfg.kind == "dynamic":
    if seq_len is None:
      raise ValueError("rope kind 'dynamic' needs the current sequence length")
    orig = cfg.original_max_len
    if isinstance(seq_len, (int, np.integer)):  # Python arithmetic, as transformers
      length = max(int(seq_len), orig)
    else:
      length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), orig)
    base = base * ((f * length / orig) - (f - 1)) ** (d / (d - 2))
  if cfg.kind == "yarn":
    return _yarn(exponents, base, d, cfg, xp, dtype)
  inv_freq = 1.0 / (base ** exponents)
  if cfg.kind == "linear":
    inv_freq = inv_freq / f
  elif cfg.kind == "llama3":
    inv_freq = _llama3(inv_freq, cfg, xp)
  return inv_freq


def _yarn(exponents, base, d, cfg, xp, dtype):
  """YaRN's "NTK-by-parts" frequencies (transformers' ``_compute_yarn_parameters``)."""
  pos_freqs = base ** exponents
  extrapolation = 1.0 / pos_freqs
  interpolation = 1.0 / (cfg.factor * pos_freqs)

  def correction_dim(rotations):  # the dimension that turns `rotations` times
    return (d * math.log(cfg.original_max_len / (rotations * 2 * math.pi))
            / (2 * math.log(base)))

  low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
  if cfg.yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  ramp = xp.clip((xp.arange(d // 2).astype(dtype) - low) / (high - low), 0, 1)
  extrapolation_weight = 1 - ramp
  return (interpolation * (1 - extrapolation_weight)
          + extrapolation * extrapolation_weight)


def _llama3(inv_freq, cfg, xp):
  """Llama 3.1: long wavelengths / factor, short ones kept, smooth in between."""
  orig, f = cfg.original_max_len, cfg.factor
  low_wavelen = orig / cfg.low_freq_factor
  high_wavelen = orig / cfg.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = xp.where(wavelen > low_wavelen, inv_freq / f, inv_freq)
  smooth = (orig / wavelen - cfg.low_freq_factor) / (
      cfg.high_freq_factor - cfg.low_freq_factor)
  smoothed = (1 - smooth) * scaled / f + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return xp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, head_dim: int, cfg: RopeConfig, *,
                 seq_len=None) -> tuple[jax.Array, jax.Array]:
  """float32 ``cos, sin`` of shape ``positions.shape + (head_dim // 2,)``.

  Both include the attention factor (YaRN). ``positions`` may be integer or
  float (interpolated or per-token increments, see ``lcjax.positions.augment``).
  """
  if cfg.kind == "dynamic" and seq_len is None:
    seq_len = jnp.max(positions) + 1
  af = attention_factor(cfg)
  if cfg.angles == "float64":
    cos, sin = _cos_sin_wide(positions, head_dim, cfg, seq_len)
  else:
    inv_freq_F = inverse_frequencies(head_dim, cfg, seq_len)
    angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq_F
    cos, sin = jnp.cos(angles), jnp.sin(angles)
  if af != 1.0:
    cos, sin = cos * af, sin * af
  return cos, sin


def _cos_sin_wide(positions, head_dim, cfg, seq_len):
  """Angles reduced mod 2 pi in float64 via per-digit rotation tables."""
  if cfg.kind == "dynamic" and not isinstance(seq_len, (int, np.integer)):
    raise ValueError("rope.angles='float64' needs frequencies known on the host; "
                     "kind 'dynamic' takes them from the runtime length: pass "
                     "seq_len as a Python int")
  inv_freq = inverse_frequencies(head_dim, cfg, seq_len, xp=np)
  cos_table, sin_table = _digit_tables(tuple(inv_freq.tolist()))
  positions = jnp.asarray(positions)
  frac = None
  if jnp.issubdtype(positions.dtype, jnp.floating):
    whole = jnp.floor(positions.astype(jnp.float32))
    frac = positions.astype(jnp.float32) - whole
    positions = whole
  p = positions.astype(jnp.int32)
  radix = 1 << _DIGIT_BITS
  cos = sin = None
  for i in range(_NUM_DIGITS):
    digit = jnp.bitwise_and(jnp.right_shift(p, _DIGIT_BITS * i), radix - 1)
    c_i = jnp.asarray(cos_table[i])[digit]
    s_i = jnp.asarray(sin_table[i])[digit]
    cos, sin = (c_i, s_i) if cos is None else (cos * c_i - sin * s_i,
                                              sin * c_i + cos * s_i)
  if frac is not None:  # the fractional part is small: direct float32 angles
    angles = frac[..., None] * jnp.asarray(inv_freq, jnp.float32)
    c_f, s_f = jnp.cos(angles), jnp.sin(angles)
    cos, sin = cos * c_f - sin * s_f, sin * c_f + cos * s_f
  return cos, sin


@functools.lru_cache(maxsize=64)
def _digit_tables(inv_freq: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
  """``[digits, radix, F]`` float32 cos/sin of ``(d * radix**i * f) mod 2 pi``,
  reduced in float64 (``radix**i * f`` is an exact power-of-two scaling)."""
  f = np.asarray(inv_freq, np.float64)
  two_pi = 2 * np.pi
  radix = 1 << _DIGIT_BITS
  digits = np.arange(radix, dtype=np.float64)[:, None]
  angles = np.stack([np.fmod(digits * np.fmod(float(radix ** i) * f, two_pi), two_pi)
                     for i in range(_NUM_DIGITS)])
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pairs ``(i, i + H/2)`` of ``x [..., H]`` by precomputed ``cos, sin
  [..., H/2]`` (broadcast against ``x``'s leading axes) in float32; returns
  ``x``'s dtype. The "rotate half" layout of Llama / Hugging Face checkpoints."""
  H = x.shape[-1]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : H // 2], x32[..., H // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, cfg: RopeConfig,
               *, seq_len=None) -> jax.Array:
  """Rotates every head of ``x`` by its token's position under ``cfg``."""
  cos, sin = rope_cos_sin(positions_BxT, x_BxTxNxH.shape[-1], cfg, seq_len=seq_len)
  return rotate(x_BxTxNxH, cos[..., None, :], sin[..., None, :])
