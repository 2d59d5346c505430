"""Write lcjax params as a Hugging Face checkpoint folder that transformers loads.

``config.json`` + ``model.safetensors`` (or shards + index). Tensors are fetched
from the mesh one layer at a time, cast on device to the export dtype, and
written shard by shard, so host memory peaks at one shard file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lcjax.config import ModelConfig
from lcjax.hf import layout
from lcjax.hf.config_map import (SLIDING_KIND, hf_config_from_model,
                                 model_config_from_hf, read_config)
from lcjax.hf.loader import SHAPE_FIELDS, layer_sources
from lcjax.hf.safetensors_io import plan_shards, write_checkpoint
from lcjax.model import lora, schedule
from lcjax.model.dtypes import dtype_of

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


def parse_size(size: int | str) -> int:
  """Bytes from ``5_000_000``, ``"5GB"``, ``"500MB"``, ``"64KiB"``."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size={size!r}: expected bytes or e.g. '5GB', '500MB'")
  unit = (m.group(2) or "B").upper()
  base = 1024 if "I" in unit else 1000
  power = " KMGT".index(unit[0]) if unit != "B" else 0
  return int(float(m.group(1)) * base ** power)


def _fetch(x) -> np.ndarray:
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _leaves(params: Any) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(k.key for k in kp): v for kp, v in flat}


def hf_tensors(params: Any, cfg: ModelConfig, dtype: str
               ) -> list[tuple[str, tuple[int, ...], Any]]:
  """``(hf_name, hf_shape, fetch)`` in checkpoint order; ``fetch()`` gives the
  numpy tensor in the export dtype."""
  leaves = _leaves(params)
  sources = layer_sources(cfg)
  extra = sorted("/".join(p) for p in set(leaves) - set(sources))
  if extra:
    raise ValueError(f"params {extra} have no Hugging Face tensor")
  missing = sorted("/".join(p) for p in set(sources) - set(leaves))
  if missing:
    raise ValueError(f"params {missing} are missing: do params and config fit?")
  target = dtype_of(dtype)
  group_of = []  # layer -> (group, index in group)
  for g, (_, count) in enumerate(schedule.layer_groups(cfg)):
    group_of.extend((g, j) for j in range(count))
  rules = layout.tensor_rules(cfg)

  def fetcher(rule, leaf, j=None):
    def fetch():
      x = leaf if j is None else leaf[j]
      return rule.to_hf(_fetch(jnp.asarray(x).astype(target)))
    return fetch

  globals_ = [r for r in rules if not r.per_layer]
  per_layer = [r for r in rules if r.per_layer]
  out = [(r.hf_name, r.hf_shape, fetcher(r, leaves[r.path])) for r in globals_]
  for i, (g, j) in enumerate(group_of):
    for rule in per_layer:
      leaf = leaves[(f"group_{g}",) + rule.path]
      out.append((rule.hf_name.format(i=i), rule.hf_shape, fetcher(rule, leaf, j)))
  return out


def save_pretrained(params: Any, cfg: ModelConfig, folder: str, *,
                    family: str | None = None, dtype: str = "bfloat16",
                    base: str | dict | None = None,
                    max_shard_size: int | str = "5GB",
                    dense_attention: bool = False) -> list[str]:
  """Writes ``params`` of ``Decoder(cfg)`` as an HF checkpoint in ``folder``.

  LoRA adapters (``cfg.lora.rank > 0``) are merged into their kernels first.

  Args:
    family: "llama", "qwen2" or "mistral" (default: the one that represents
      ``cfg`` exactly, see :func:`lcjax.hf.config_map.export_family`).
    dtype: of the written tensors ("bfloat16", "float16" or "float32").
    base: the original checkpoint folder (or its config dict) the run started
      from: its special token ids, ``max_position_embeddings`` etc. are kept,
      and (for a folder) its tokenizer files are copied.
    max_shard_size: larger checkpoints are split into shards with an index.
    dense_attention: write every layer as full attention. transformers has no
      sink or strided layers, so a LongGen hybrid is only exportable this way
      (the params are the same; the attention then differs).
  Returns the names of the written safetensors files.
  """
  params, cfg = lora.merge(params, cfg)  # a no-op without adapters
  if dense_attention:
    dense = schedule.with_layer_kinds(cfg, ())
    params, cfg = schedule.regroup_params(params, dense), dense
  base_dir = base if isinstance(base, str) else None
  base_cfg = read_config(base) if isinstance(base, str) else base
  hf_cfg = hf_config_from_model(cfg, family, base_cfg, dtype)
  _check_round_trip(hf_cfg, cfg)
  tensors = hf_tensors(params, cfg, dtype)
  itemsize = np.dtype(dtype_of(dtype)).itemsize
  plan = plan_shards([(n, int(np.prod(s)) * itemsize) for n, s, _ in tensors],
                     parse_size(max_shard_size))
  stream: Iterator = ((name, fetch()) for name, _, fetch in tensors)
  if jax.process_index() != 0:
    for _ in stream:  # every process takes part in gathering sharded arrays
      pass
    return []
  files = write_checkpoint(folder, plan, stream)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2, sort_keys=True)
  if base_dir is not None:
    for name in TOKENIZER_FILES:
      src = os.path.join(base_dir, name)
      if os.path.exists(src) and os.path.abspath(base_dir) != os.path.abspath(folder):
        shutil.copyfile(src, os.path.join(folder, name))
  return files


def _check_round_trip(hf_cfg: dict[str, Any], cfg: ModelConfig) -> None:
  """The written config must read back as ``cfg`` (shapes, RoPE, attention)."""
  back = model_config_from_hf(hf_cfg, base=cfg)
  fields = SHAPE_FIELDS + ("norm_eps", "rope")
  diffs = [f for f in fields if getattr(back, f) != getattr(cfg, f)]
  kinds = schedule.layer_kinds(cfg)
  if schedule.layer_kinds(back) != kinds:
    diffs.append("attention.layer_kinds")
  if SLIDING_KIND in kinds and (back.attention.sink, back.attention.window) != (
      cfg.attention.sink, cfg.attention.window):
    diffs.append("attention.window")
  if diffs:
    raise ValueError(f"the exported config.json would not read back as the model "
                     f"config (fields {diffs}); this is a bug in lcjax.hf")
