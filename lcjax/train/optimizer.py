"""AdamW (Loshchilov & Hutter, 2019) with linear warm-up, cosine decay and clipping."""
from __future__ import annotations

import jax
import optax

from lcjax.config import TrainConfig

# Parameters named like this are matrices and get weight decay; norm scales do not.
_DECAYED = ("kernel", "embed", "lm_head")


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  if not 0 <= cfg.warmup_steps <= cfg.steps:
    raise ValueError(f"train.warmup_steps={cfg.warmup_steps} must lie in "
                     f"[0, train.steps={cfg.steps}]")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate,
      warmup_steps=cfg.warmup_steps, decay_steps=max(cfg.steps, 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decay_mask(params):
  """True for matrices. Works on plain and on logically-boxed parameter trees."""
  def last_name(path):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return names[-1] if names else None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: last_name(path) in _DECAYED, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(learning_rate_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2,
                  weight_decay=cfg.weight_decay, mask=_decay_mask))
