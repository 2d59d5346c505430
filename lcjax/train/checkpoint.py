"""Checkpoints through orbax's ``CheckpointManager``.

Each checkpoint holds the sharded train state and a small JSON record (step,
config). The data pipeline is a pure function of the step, so restoring the step
restores the data order too: a resumed run continues the same loss curve.
"""
from __future__ import annotations

import os
from typing import Any

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
