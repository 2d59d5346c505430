"""Train state, its logical shardings, and sharded initialisation."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax.model import Decoder
from lcjax.sharding import named_sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _boxed_init(model: Decoder, tx: optax.GradientTransformation, seed: int,
                seq_len: int) -> TrainState:
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(jax.random.key(seed), tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params))


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def state_shardings(model: Decoder, tx: optax.GradientTransformation,
                    mesh: Mesh, seq_len: int) -> TrainState:
  """A ``TrainState`` of ``NamedSharding``s from the logical axis names.

  Optimizer moments inherit their parameter's names (optax maps over the boxed
  tree); scalars such as step counters are replicated.
  """
  abstract = jax.eval_shape(lambda: _boxed_init(model, tx, 0, seq_len))

  def sharding(x):
    if not _is_box(x):
      return NamedSharding(mesh, PartitionSpec())
    if isinstance(x.value, optax.MaskedNode):  # no state (LoRA-frozen params)
      return x.value
    return named_sharding(mesh, x.names, x.value.shape)

  return jax.tree.map(sharding, abstract, is_leaf=_is_box)


def abstract_state(model: Decoder, tx: optax.GradientTransformation,
                   shardings: TrainState, seq_len: int) -> TrainState:
  """Shapes, dtypes and shardings of the unboxed state (for checkpoint restore)."""
  abstract = jax.eval_shape(lambda: nn.unbox(_boxed_init(model, tx, 0, seq_len)))
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def init_state(model: Decoder, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState, seq_len: int) -> TrainState:
  """Initialises parameters directly in their sharded layout (no host copy)."""
  init = jax.jit(lambda: nn.unbox(_boxed_init(model, tx, seed, seq_len)),
                 out_shardings=shardings)
  return init()
