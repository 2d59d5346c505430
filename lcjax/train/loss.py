"""Next-token cross-entropy computed chunk by chunk over the sequence.

The full ``[batch, length, vocab]`` logits of a long sequence can outweigh the
whole model, so logits are formed one sequence chunk at a time inside a
rematerialised scan and never stored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.model import Decoder
from lcjax.parallel.context import model_layout
from lcjax.parallel.layout import permute_batch

_PERMUTED_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def _chunk_size(length: int, target: int) -> int:
  size = min(length, target)
  while length % size:
    size -= 1
  return size


def loss_sums(model: Decoder, params, batch: dict[str, jax.Array],
              chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
  """Returns ``(sum of token losses, number of counted tokens)`` in float32."""
  # Context-parallel load balancing: the rows are permuted once here (integer
  # arrays, cheap) and the hidden states stay permuted; the sum is unchanged.
  layout = model_layout(model.cfg, batch["tokens"].shape[-1])
  batch = permute_batch({k: batch[k] for k in _PERMUTED_KEYS}, layout)
  h_BxTxD = model.apply({"params": params}, batch["tokens"], batch["positions"],
                        batch["segment_ids"], method=Decoder.hidden,
                        layout_order=True)
  B, T, D = h_BxTxD.shape
  C = _chunk_size(T, chunk)
  to_chunks = lambda x: jnp.moveaxis(x.reshape(B, T // C, C, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_loss(total, xs):
    h_BxCxD, targets_BxC, mask_BxC = xs
    logits_BxCxV = model.apply({"params": params}, h_BxCxD, method=Decoder.logits)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(
        logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return total + jnp.sum((lse_BxC - target_logit_BxC) * mask_BxC), None

  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32),
                          (to_chunks(h_BxTxD), to_chunks(batch["targets"]),
                           to_chunks(mask_BxT)))
  return total, jnp.sum(mask_BxT)


def mean_loss(model: Decoder, params, batch, chunk: int = 1024) -> jax.Array:
  total, count = loss_sums(model, params, batch, chunk)
  return total / jnp.maximum(count, 1.0)
