"""Rotary position embeddings (RoPE; Su et al., 2021, "RoFormer").

Angles and the rotation are computed in float32 and only the result is cast
back: the AnchorAttention paper (Wang et al., 2024) shows that bf16 RoPE breaks
relative positions at long context.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.config import RopeConfig

ROPE_KINDS = ("plain",)


def inverse_frequencies(head_dim: int, cfg: RopeConfig) -> jax.Array:
  """``[head_dim // 2]`` inverse frequencies ``theta ** (-2i / head_dim)``."""
  if cfg.kind not in ROPE_KINDS:
    raise ValueError(f"unknown rope kind {cfg.kind!r}; choose one of {ROPE_KINDS}")
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (cfg.theta ** exponents)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array,
               cfg: RopeConfig) -> jax.Array:
  """Rotates pairs (i, i + H/2) of each head vector by ``position * freq_i``.

  Uses the "rotate half" layout of Llama / Hugging Face checkpoints.
  """
  H = x_BxTxNxH.shape[-1]
  inv_freq_F = inverse_frequencies(H, cfg)
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F
  cos = jnp.cos(angles_BxTxF)[:, :, None, :]
  sin = jnp.sin(angles_BxTxF)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., : H // 2], x[..., H // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxNxH.dtype)
