"""Reading and writing a folder of safetensors files, single or sharded.

A sharded checkpoint has ``model.safetensors.index.json`` whose ``weight_map``
names the file of every tensor. Reading is lazy: ``safe_open`` memory-maps each
file and :meth:`CheckpointReader.read` copies only the requested box.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors metadata transformers expects on a PyTorch-style checkpoint.
_METADATA = {"format": "pt"}


class CheckpointReader:
  """The tensors of a checkpoint folder, opened lazily, file by file."""

  def __init__(self, folder: str):
    self.folder = folder
    index = os.path.join(folder, INDEX_FILE)
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' of tensor name -> file")
      self._file_of = dict(weight_map)
    elif os.path.exists(single):
      with safe_open(single, framework="numpy") as f:
        self._file_of = {name: SINGLE_FILE for name in f.keys()}
    else:
      found = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin", ".pt")))
      raise FileNotFoundError(
          f"{folder!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (found {found}); "
          "lcjax reads safetensors checkpoints only")
    missing = sorted({f for f in self._file_of.values()
                      if not os.path.exists(os.path.join(folder, f))})
    if missing:
      raise FileNotFoundError(f"{folder!r}: shard file(s) {missing} named in "
                              f"{INDEX_FILE} do not exist")
    self._handles: dict[str, object] = {}

  def names(self) -> list[str]:
    return sorted(self._file_of)

  def _slice(self, name: str):
    if name not in self._file_of:
      raise KeyError(f"tensor {name!r} is not in the checkpoint {self.folder!r}")
    file = self._file_of[name]
    if file not in self._handles:
      self._handles[file] = safe_open(os.path.join(self.folder, file), framework="numpy")
    return self._handles[file].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, box: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor, or only its ``box`` (a tuple of slices), as numpy."""
    s = self._slice(name)
    return s[box] if box is not None else s[:]

  def slice_reader(self, name: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
    s = self._slice(name)
    return lambda box: s[box]

  def close(self) -> None:
    self._handles.clear()

  def __enter__(self) -> CheckpointReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """Greedy split of ``(name, nbytes)`` in order into shards of at most
  ``max_shard_bytes`` (a tensor larger than that gets a shard of its own)."""
  shards: list[list[str]] = [[]]
  used = 0
  for name, nbytes in sizes:
    if shards[-1] and used + nbytes > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += nbytes
  return shards


def write_checkpoint(folder: str, plan: list[list[str]],
                     tensors: Iterator[tuple[str, np.ndarray]]) -> list[str]:
  """Writes ``tensors`` (in plan order) shard by shard; returns the file names.

  Only one shard's tensors are in host memory at a time. One shard is written
  as ``model.safetensors``; several as ``model-0000k-of-0000n.safetensors``
  plus ``model.safetensors.index.json``.
  """
  os.makedirs(folder, exist_ok=True)
  n = len(plan)
  files = [SINGLE_FILE] if n == 1 else [
      f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  weight_map, total = {}, 0
  tensors = iter(tensors)
  for file, names in zip(files, plan):
    shard = {}
    for expected in names:
      name, array = next(tensors)
      if name != expected:
        raise RuntimeError(f"tensor {name!r} arrived where {expected!r} was planned")
      shard[name] = np.ascontiguousarray(array)
      total += array.nbytes
      weight_map[name] = file
    save_file(shard, os.path.join(folder, file), metadata=_METADATA)
    del shard
  for stale in [SINGLE_FILE, INDEX_FILE] if n > 1 else [INDEX_FILE]:
    path = os.path.join(folder, stale)
    if stale not in files and os.path.exists(path):
      os.remove(path)  # a previous export into this folder
  if n > 1:
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                indent=2, sort_keys=True)
  return files
