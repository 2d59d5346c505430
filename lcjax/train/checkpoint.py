"""Checkpoints through orbax's ``CheckpointManager``.

Each checkpoint holds the sharded train state and a small JSON record (step,
config). The data pipeline is a pure function of the step, so restoring the step
restores the data order too: a resumed run continues the same loss curve.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lcjax.config import CheckpointConfig
from lcjax.train.state import TrainState


class Checkpointer:
  def __init__(self, directory: str, cfg: CheckpointConfig):
    if cfg.every <= 0 or cfg.keep <= 0:
      raise ValueError(f"checkpoint.every={cfg.every} and checkpoint.keep="
                       f"{cfg.keep} must be positive")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.every, max_to_keep=cfg.keep, create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, record: dict[str, Any],
           force: bool = False) -> bool:
    """Saves if ``step`` is on the interval (or ``force``); returns whether it did."""
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      record=ocp.args.JsonSave(record)),
        force=force)

  def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
    """Restores into the shapes, dtypes and shardings of ``abstract``."""
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      record=ocp.args.JsonRestore()))
    return restored.state, restored.record

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_params(run_dir: str, like: Any, model_cfg: Any) -> Any:
  """The latest params of the lcjax run in ``run_dir``, laid out like ``like``.

  For fine-tuning from an earlier run (``checkpoint.init_params_from``): the
  saved layers are restacked into ``model_cfg``'s layer groups, each leaf of
  ``like`` found there is replaced by the saved value (same shape, placed with
  ``like``'s sharding), and leaves absent there (LoRA adapters) keep ``like``'s.
  Saved leaves with no place in ``like`` or a different shape are an error.
  """
  from lcjax.model.schedule import regroup_params  # the model imports are heavy
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {run_dir}/checkpoints to take params from")
  saved = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state["params"]
  manager.close()
  saved = regroup_params(saved, model_cfg)
  used = set()

  def take(path, leaf):
    key = jax.tree_util.keystr(path)
    node = saved
    for k in path:
      if not isinstance(node, dict) or k.key not in node:
        return leaf
      node = node[k.key]
    if tuple(node.shape) != tuple(leaf.shape):
      raise ValueError(f"param {key}: {run_dir} has shape {tuple(node.shape)}, this "
                       f"model {tuple(leaf.shape)}")
    used.add(key)
    return jax.device_put(jnp.asarray(node, leaf.dtype), leaf.sharding)

  out = jax.tree_util.tree_map_with_path(take, like)
  unused = sorted(set(jax.tree_util.keystr(p) for p, _ in
                      jax.tree_util.tree_leaves_with_path(saved)) - used)
  if unused:
    raise ValueError(f"params {unused} of {run_dir} have no place in this model "
                     "(merge LoRA adapters with lcjax.model.lora.merge first)")
  return out
