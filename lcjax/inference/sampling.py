"""Next-token sampling: greedy, temperature, nucleus (top-p; Holtzman et al., 2020)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """``temperature == 0`` is greedy; ``top_p < 1`` keeps the smallest set of
  tokens whose probability reaches ``top_p``."""
  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")


def top_p_logits(logits_BxV: jax.Array, top_p: float) -> jax.Array:
  """Logits with every token outside the top-``top_p`` nucleus set to ``-inf``."""
  order = jnp.argsort(-logits_BxV, axis=-1)
  sorted_logits = jnp.take_along_axis(logits_BxV, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
  keep_sorted = before < top_p  # the best token is always kept
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(logits_BxV.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits_BxV, -jnp.inf)


def sample(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """``[B]`` int32 next tokens."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / sampling.temperature
  if sampling.top_p < 1.0:
    logits = top_p_logits(logits, sampling.top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
