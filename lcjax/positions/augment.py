"""Position ids that are not ``0, 1, 2, ...``: E²-LLM augmentation and V2PE increments.

* E²-LLM (Liu et al., 2024, "E²-LLM: Efficient and Extreme Length Extension of
  Large Language Models") trains once on short rows so that position
  interpolation by *any* factor works at inference. Every row gets a random
  scale ``g`` in ``{1, ..., max_scale}`` (positions divided by ``g``, i.e.
  position interpolation by ``g``) and a random position offset ``t``: the
  tokens from a random split point on are moved ``t`` positions later (with
  RoPE a shift of the whole row changes nothing; shifting a part makes the row
  span longer distances). ``t <= (g - 1) * (L - 1)``, so the largest scaled
  distance ``(L - 1 + t) / g`` stays within the trained ``L - 1``: a row of
  ``L`` tokens shows the model the relative distances of an interpolated row
  of up to ``g * L``. At inference use ``kind="linear"`` with ``factor`` = the
  extension ratio. Random numbers depend only on ``(seed, step)``, so a resumed
  run augments exactly as an uninterrupted one.
* V2PE (Ge et al., 2024, "V2PE: Improving Multimodal Long-Context Capability
  of Vision-Language Models with Variable Visual Position Encoding") gives each
  token its own position increment (e.g. 1 for text, 1/16 for image tokens);
  positions are the running sum. RoPE accepts such float positions directly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.config import RopeConfig

AUGMENTS = ("none", "e2llm")


def validate(cfg: RopeConfig) -> None:
  if cfg.augment not in AUGMENTS:
    raise ValueError(f"rope.augment={cfg.augment!r}; choose one of {AUGMENTS}")
  if cfg.augment_max_scale < 1:
    raise ValueError(f"rope.augment_max_scale={cfg.augment_max_scale} must be >= 1")


def e2llm_positions(positions_BxT: jax.Array, key: jax.Array, max_scale: int
                    ) -> jax.Array:
  """float32 E²-LLM positions: ``(positions + t * [i >= split]) / g`` per row.

  ``positions_BxT`` may carry a leading micro-batch axis (``[A, B, T]``); every
  row draws its own ``g``, ``t`` and split point.
  """
  if max_scale < 1:
    raise ValueError(f"max_scale={max_scale} must be >= 1")
  rows, T = positions_BxT.shape[:-1], positions_BxT.shape[-1]
  k_scale, k_offset, k_split = jax.random.split(key, 3)
  g = jax.random.randint(k_scale, rows, 1, max_scale + 1).astype(jnp.float32)
  t = jnp.floor(jax.random.uniform(k_offset, rows) * ((g - 1) * (T - 1) + 1))
  split = jax.random.randint(k_split, rows, 1, max(T, 2))
  later = jnp.arange(T) >= split[..., None]
  shifted = positions_BxT.astype(jnp.float32) + jnp.where(later, t[..., None], 0.0)
  return shifted / g[..., None]


def augment_batch(cfg: RopeConfig, batch: dict[str, jax.Array], step: jax.Array
                  ) -> dict[str, jax.Array]:
  """The train step's hook: ``batch`` with augmented ``positions`` (or as is)."""
  validate(cfg)
  if cfg.augment == "none":
    return batch
  key = jax.random.fold_in(jax.random.key(cfg.augment_seed), step)
  return {**batch, "positions": e2llm_positions(batch["positions"], key,
                                                cfg.augment_max_scale)}


def positions_from_increments(increments_BxT: jax.Array,
                              segment_ids_BxT: jax.Array | None = None) -> jax.Array:
  """V2PE: float32 positions ``p_0 = 0, p_i = p_{i-1} + increments_{i-1}``.

  With ``segment_ids`` the sum restarts at 0 where a new segment begins.
  """
  inc = increments_BxT.astype(jnp.float32)
  before = jnp.cumsum(inc, axis=-1) - inc  # exclusive prefix sum
  if segment_ids_BxT is None:
    return before
  T = inc.shape[-1]
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BxT[..., :1], bool),
                            segment_ids_BxT[..., 1:] != segment_ids_BxT[..., :-1]],
                           axis=-1)
  start_index = jax.lax.cummax(jnp.where(starts, jnp.arange(T), 0), axis=inc.ndim - 1)
  return before - jnp.take_along_axis(before, start_index, axis=-1)
