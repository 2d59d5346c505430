"""Activation rematerialisation policies for the scanned decoder layers.

"offload" keeps matmul outputs but moves them to pinned host memory between the
forward and backward pass (the MEMO paper's idea: host RAM as a second tier for
activations of very long sequences); it needs a backend with a ``pinned_host``
memory space (GPUs; the CPU backend has one too).
"""
from __future__ import annotations

import jax

REMAT_POLICIES = ("none", "full", "dots", "offload")


def checkpoint_policy(name: str):
  """The ``jax.checkpoint`` policy for ``name``; ``None`` means no remat at all."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; choose one of {REMAT_POLICIES}")
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  memories = {m.kind for m in jax.devices()[0].addressable_memories()}
  if "pinned_host" not in memories:
    raise ValueError(f"remat='offload' needs a 'pinned_host' memory space; "
                     f"{jax.devices()[0].platform} offers {sorted(memories)}")
  return jax.checkpoint_policies.offload_dot_with_no_batch_dims(
      offload_src="device", offload_dst="pinned_host")
