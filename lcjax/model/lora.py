"""LoRA adapters and LongLoRA's trainable partition.

LoRA (Hu et al., 2021): a projection ``x W`` becomes ``x W + (x A) B * alpha / r``
with ``A [in, r]`` (normal init) and ``B [r, out]`` (zeros, so training starts
from the pretrained model). LongLoRA (Chen et al., 2023) adds adapters to the
attention projections q/k/v/o and also trains the embedding and the norms
("LoRA+"); everything else is frozen. Its shifted sparse attention (S²-attn)
is the "shifted_groups" layer kind (``lcjax.model.schedule``); at inference
the layers go back to "full" attention and :func:`merge` folds the adapters
into the kernels.

Freezing is done twice, on purpose:

* :func:`stop_frozen_gradients` wraps frozen parameters in ``stop_gradient``
  before the loss, so they get exactly-zero gradients and XLA never computes
  their weight gradients (LoRA's compute saving);
* :func:`freeze` routes frozen parameters to ``optax.set_to_zero`` (no update,
  no weight decay, no optimizer state) and clips only the trainable ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lcjax.config import LoraConfig, ModelConfig

# Parameter names that stay trainable when LoRA is on: the adapters, the
# embedding and the RMSNorm scales.
TRAINABLE_NAMES = ("lora_a", "lora_b", "embed", "scale")
TARGETS = ("q", "k", "v", "o")


def validate(cfg: LoraConfig) -> None:
  if cfg.rank < 0:
    raise ValueError(f"lora.rank={cfg.rank} must be >= 0 (0 = no adapters)")
  if cfg.rank and cfg.alpha <= 0:
    raise ValueError(f"lora.alpha={cfg.alpha} must be > 0")
  unknown = sorted(set(cfg.targets) - set(TARGETS))
  if unknown or not cfg.targets:
    raise ValueError(f"lora.targets={cfg.targets!r}: choose a non-empty subset of "
                     f"{TARGETS}")


def rank_for(cfg: ModelConfig, projection: str) -> int:
  """The adapter rank of the attention projection ``projection`` (0: none)."""
  validate(cfg.lora)
  return cfg.lora.rank if projection in cfg.lora.targets else 0


def adapter(module: nn.Module, x: jax.Array, in_shape: tuple[int, ...],
            out_shape: tuple[int, ...], in_axes: tuple[str, ...],
            out_axes: tuple[str, ...], rank: int, alpha: float) -> jax.Array:
  """``(x A) B * alpha / rank`` with parameters ``lora_a``/``lora_b`` of ``module``.

  Called from ``Projection`` (``lcjax.model.layers``); the rank axis is
  replicated (logical name None).
  """
  from lcjax.model.layers import param_with_axes  # layers imports this module
  fan_in = 1
  for n in in_shape:
    fan_in *= n
  a = param_with_axes(module, "lora_a", nn.initializers.normal(fan_in ** -0.5),
                      in_shape + (rank,), in_axes + (None,), module.param_dtype)
  b = param_with_axes(module, "lora_b", nn.initializers.zeros, (rank,) + out_shape,
                      (None,) + out_axes, module.param_dtype)
  n_in = len(in_shape)
  contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  h = jax.lax.dot_general(x.astype(module.dtype), a.astype(module.dtype),
                          (contract, ((), ())))
  y = jax.lax.dot_general(h, b.astype(module.dtype), (((h.ndim - 1,), (0,)), ((), ())))
  return y * jnp.asarray(alpha / rank, module.dtype)


def _last_name(path) -> str | None:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return names[-1] if names else None


def trainable_labels(params) -> Any:
  """``"trainable"``/``"frozen"`` per leaf (plain or logically-boxed trees)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "trainable" if _last_name(path) in TRAINABLE_NAMES else "frozen",
      params)


def is_enabled(cfg: ModelConfig) -> bool:
  validate(cfg.lora)
  return cfg.lora.rank > 0


def freeze(tx: optax.GradientTransformation, cfg: ModelConfig
           ) -> optax.GradientTransformation:
  """``tx`` for the trainable parameters only when LoRA is on (else ``tx``)."""
  if not is_enabled(cfg):
    return tx
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                               trainable_labels)


def stop_frozen_gradients(params, cfg: ModelConfig):
  """``params`` with ``stop_gradient`` on every frozen leaf when LoRA is on."""
  if not is_enabled(cfg):
    return params
  labels = trainable_labels(params)
  return jax.tree.map(lambda p, l: p if l == "trainable" else jax.lax.stop_gradient(p),
                      params, labels)


def merge(params, cfg: ModelConfig) -> tuple[Any, ModelConfig]:
  """Folds every adapter into its kernel: ``W + A B * alpha / rank``.

  Returns the merged parameters (no ``lora_*`` leaves) and ``cfg`` with LoRA
  off; the merged model computes the same function (up to float rounding).
  Works on stacked (scanned) layers: leading axes shared by kernel, A and B.
  """
  if not is_enabled(cfg):
    return params, cfg
  scaling = cfg.lora.alpha / cfg.lora.rank

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    if "lora_a" in tree:
      if "kernel" not in tree or "lora_b" not in tree:
        raise ValueError(f"adapter without kernel/lora_b: keys {sorted(tree)}")
      rest = {k: v for k, v in tree.items() if k not in ("lora_a", "lora_b")}
      rest["kernel"] = _merged_kernel(tree["kernel"], tree["lora_a"], tree["lora_b"],
                                      scaling)
      return rest
    return {k: walk(v) for k, v in tree.items()}

  merged = walk(nn.unbox(params))
  off = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0))
  return merged, off


def _merged_kernel(kernel, a, b, scaling):
  lead = a.ndim + b.ndim - 2 - kernel.ndim  # stacked layer axes
  n_in = a.ndim - lead - 1
  lead_shape, in_shape = a.shape[:lead], a.shape[lead:-1]
  out_shape, rank = b.shape[lead + 1:], a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(lead_shape + (-1, rank))
  b2 = b.astype(jnp.float32).reshape(lead_shape + (rank, -1))
  delta = jnp.matmul(a2, b2).reshape(lead_shape + in_shape + out_shape)
  assert delta.shape == kernel.shape and n_in >= 1, (delta.shape, kernel.shape)
  return (kernel.astype(jnp.float32) + scaling * delta).astype(kernel.dtype)
