"""Building blocks of the decoder: RMSNorm, projections, SwiGLU MLP.

Every parameter is created with logical axis names (see ``lcjax.sharding``).
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcjax.model import lora
from lcjax.sharding import constrain

Dtype = jnp.dtype


def param_with_axes(module: nn.Module, name: str, init, shape: Sequence[int],
                    axes: Sequence[str | None], dtype) -> jax.Array:
  """A parameter boxed with its logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)),
                      tuple(shape), dtype)


class RMSNorm(nn.Module):
  """Root-mean-square norm (Zhang & Sennrich, 2019), computed in float32."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = param_with_axes(self, "scale", nn.initializers.ones,
                              (x_BxTxD.shape[-1],), ("embed",), self.param_dtype)
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D.astype(jnp.float32)).astype(self.dtype)


class Projection(nn.Module):
  """``einsum`` with a kernel of logical axes ``in_axes + out_axes``, plus an
  optional bias of axes ``out_axes`` (Qwen2's q/k/v projections)."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  use_bias: bool = False
  lora_rank: int = 0  # > 0: a LoRA adapter (lcjax.model.lora)
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = param_with_axes(
        self, "kernel", nn.initializers.normal(self.init_std),
        self.in_shape + self.out_shape, self.in_axes + self.out_axes,
        self.param_dtype)
    n_in = len(self.in_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            (contract, ((), ())))
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, self.out_shape,
                             self.out_axes, self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora_rank:
      y = y + lora.adapter(self, x, self.in_shape, self.out_shape, self.in_axes,
                           self.out_axes, self.lora_rank, self.lora_alpha)
    return y


class SwiGLU(nn.Module):
  """Gated MLP ``W_down(silu(W_gate x) * W_up x)`` (Shazeer, 2020)."""
  embed_dim: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    up = lambda name: Projection((self.embed_dim,), (self.mlp_dim,), ("embed",),
                                 ("mlp",), name=name, **kw)
    gate_BxTxF = up("gate")(x_BxTxD)
    up_BxTxF = up("up")(x_BxTxD)
    h_BxTxF = constrain(nn.silu(gate_BxTxF) * up_BxTxF, ("batch", "sequence", "mlp"))
    return Projection((self.mlp_dim,), (self.embed_dim,), ("mlp",), ("embed",),
                      name="down", **kw)(h_BxTxF)
