"""The pure, jitted train and eval steps.

``train_step(state, batch) -> (state, metrics)`` is a pure function of the
state and the batch. The batch carries a leading micro-batch axis
``[grad_accum, batch / grad_accum, length]``; gradients are summed over
micro-batches in a ``scan`` and normalised by the total number of counted tokens,
so any ``grad_accum`` gives the same update as one big batch.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax.model import Decoder, lora
from lcjax.positions import augment
from lcjax.sharding import named_sharding
from lcjax.train.loss import loss_sums
from lcjax.train.state import TrainState

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def make_train_step(model: Decoder, tx: optax.GradientTransformation):
  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    def micro_step(carry, micro_batch):
      grads_acc, loss_acc, count_acc = carry
      (loss_sum, count), grads = jax.value_and_grad(
          lambda p: loss_sums(model, lora.stop_frozen_gradients(p, model.cfg),
                              micro_batch), has_aux=True)(state.params)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, loss_acc + loss_sum, count_acc + count), None

    batch = augment.augment_batch(model.cfg.rope, batch, state.step)  # E2-LLM
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, loss_sum, count), _ = jax.lax.scan(
        micro_step, (zeros, jnp.zeros(()), jnp.zeros(())), batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denom, "tokens": count,
               "grad_norm": optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def batch_shardings(mesh: Mesh, shape: tuple[int, ...]) -> dict[str, NamedSharding]:
  names = (None, "batch", "sequence") if len(shape) == 3 else ("batch", "sequence")
  sharding = named_sharding(mesh, names, shape)
  return {k: sharding for k in BATCH_KEYS}


def jit_train_step(model: Decoder, tx: optax.GradientTransformation, mesh: Mesh,
                   state_sharding: TrainState, batch_shape: tuple[int, int, int]
                   ) -> Callable:
  """Jits the step with explicit in/out shardings; the old state is donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(make_train_step(model, tx),
                 in_shardings=(state_sharding, batch_shardings(mesh, batch_shape)),
                 out_shardings=(state_sharding, replicated),
                 donate_argnums=(0,))


def jit_eval_step(model: Decoder, mesh: Mesh, param_sharding, batch_shape) -> Callable:
  """``(params, batch) -> (loss_sum, count)`` for evaluation batches ``[B, T]``."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(lambda params, batch: loss_sums(model, params, batch),
                 in_shardings=(param_sharding, batch_shardings(mesh, batch_shape)),
                 out_shardings=(replicated, replicated))
