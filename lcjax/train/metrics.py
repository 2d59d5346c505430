"""Metrics to a JSONL file, TensorBoard event files and a progress bar."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import tqdm

# Dense bf16 tensor-core peak per chip (vendor datasheets), for MFU estimates.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
              "B200": 2250e12}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


class MetricsWriter:
  """Writes on process 0 only; other processes get a silent writer."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
    self.active = jax.process_index() == 0
    self.history: list[dict[str, Any]] = []
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      print("tensorboardX is not installed: no TensorBoard event files")
      self.tb = None
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                         desc="train")

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    record = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
    self.history.append(record)
    if not self.active:
      return
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in record.items():
        if k != "step":
          self.tb.add_scalar(k, v, step)

  def progress(self, step: int, postfix: dict[str, str]) -> None:
    if self.active:
      self.bar.n = step
      self.bar.set_postfix(postfix, refresh=True)

  def print(self, text: str) -> None:
    if self.active:
      self.bar.write(text)

  def close(self) -> None:
    if self.active:
      self.bar.close()
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()
