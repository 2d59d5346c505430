"""Per-layer attention kinds (the LongGen layer schedule) and their patterns.

A model's ``attention.layer_kinds`` names one kind per layer, or
``attention.schedule`` names a placement such as "middle_third:sink_window".
LongGen (Ge et al., 2024, "A Little Goes a Long Way") keeps full attention in
about a third of the layers -- best in the middle third -- and gives the others
a GPU-friendly sparse pattern: attention sink + sliding window, or strided
block-sparse attention. Consecutive layers of the same kind form a *group*
that is compiled once with ``nn.scan``, so compile time grows with the number
of groups, not with depth.

Every layer has the same parameters whatever its kind, so a schedule can be
changed after training: :func:`regroup_params` restacks a checkpoint's groups
for another schedule (pretrain dense, extend as a hybrid).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import Causal, Pattern
from lcjax.attention.patterns import (CausalShiftedGroups, DocumentAnchor, SinkWindow,
                                     StridedBlockSparse)
from lcjax.config import AttentionConfig, ModelConfig


def _sink_window(cfg: AttentionConfig) -> Pattern:
  _check_size("attention.sink", cfg.sink, 0)
  _check_size("attention.window", cfg.window, 1)
  return SinkWindow(cfg.sink, cfg.window)


def _strided(cfg: AttentionConfig) -> Pattern:
  _check_size("attention.block_size", cfg.block_size, 1)
  _check_size("attention.stride", cfg.stride, 1)
  _check_size("attention.local_blocks", cfg.local_blocks, 1)
  return StridedBlockSparse(cfg.block_size, cfg.stride, cfg.local_blocks,
                            head_offsets=cfg.strided_head_offsets)


def _shifted_groups(cfg: AttentionConfig) -> Pattern:
  _check_size("attention.shift_group_size", cfg.shift_group_size, 2)
  _check_size("attention.shift_num_heads", cfg.shift_num_heads, 2)
  return CausalShiftedGroups(cfg.shift_group_size, cfg.shift_num_heads)


# kind name -> builder of the pattern from the sizes in AttentionConfig. Add a
# kind here to use any pattern of ``lcjax.attention`` in a schedule.
PATTERN_BUILDERS: dict[str, Callable[[AttentionConfig], Pattern]] = {
    "full": lambda cfg: Causal(),
    "sink_window": _sink_window,
    "strided": _strided,
    "shifted_groups": _shifted_groups,  # LongLoRA S²-attn (training only)
    # AnchorAttention: causal within documents + the shared anchor at token 0.
    "anchor": lambda cfg: Causal() | DocumentAnchor(),
}

SPARSE_KINDS = ("sink_window", "strided")


def _check_size(name: str, value: int, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} is not allowed; it must be an int >= {minimum}")


# ------------------------------------------------------------------ helpers


def _check_num_layers(num_layers: int) -> None:
  _check_size("num_layers", num_layers, 1)


def _check_kind(kind: str, what: str) -> None:
  if kind not in PATTERN_BUILDERS:
    raise ValueError(f"unknown {what} kind {kind!r}; known kinds: {sorted(PATTERN_BUILDERS)}")


def full_at(num_layers: int, indices: Sequence[int], sparse: str = "sink_window",
            full: str = "full") -> tuple[str, ...]:
  """Kind ``full`` at the given layer ``indices`` (0-based), ``sparse`` elsewhere."""
  _check_num_layers(num_layers)
  _check_kind(sparse, "sparse")
  _check_kind(full, "full")
  seen = set()
  for i in indices:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < num_layers:
      raise ValueError(f"layer index {i!r} is out of range: a model with "
                       f"num_layers={num_layers} has layers 0..{num_layers - 1}")
    if i in seen:
      raise ValueError(f"layer index {i} is given twice in {list(indices)}")
    seen.add(int(i))
  return tuple(full if i in seen else sparse for i in range(num_layers))


def _third(num_layers: int, num_full: int | None) -> int:
  if num_full is None:
    return max(1, round(num_layers / 3))
  if isinstance(num_full, bool) or not isinstance(num_full, (int, np.integer)) or not (
      0 <= num_full <= num_layers):
    raise ValueError(f"num_full={num_full!r} is not allowed for num_layers={num_layers}; "
                     f"it must be an int in [0, {num_layers}]")
  return int(num_full)


def middle_full(num_layers: int, sparse: str = "sink_window",
                num_full: int | None = None) -> tuple[str, ...]:
  """LongGen's best placement: the middle ``num_full`` layers (default a third) full."""
  n = _third(num_layers, num_full)
  start = (num_layers - n) // 2
  return full_at(num_layers, range(start, start + n), sparse)


def bottom_full(num_layers: int, sparse: str = "sink_window",
                num_full: int | None = None) -> tuple[str, ...]:
  """The first ``num_full`` layers (default a third) full."""
  return full_at(num_layers, range(_third(num_layers, num_full)), sparse)


def top_full(num_layers: int, sparse: str = "sink_window",
             num_full: int | None = None) -> tuple[str, ...]:
  """The last ``num_full`` layers (default a third) full."""
  n = _third(num_layers, num_full)
  return full_at(num_layers, range(num_layers - n, num_layers), sparse)


def every_nth_full(num_layers: int, sparse: str = "sink_window", n: int = 3,
                   offset: int | None = None) -> tuple[str, ...]:
  """Layers ``offset, offset + n, ...`` full (default offset ``n // 2``: the
  middle layer of every run of ``n``), ``sparse`` elsewhere."""
  _check_size("n", n, 1)
  offset = n // 2 if offset is None else offset
  if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or not 0 <= offset < n:
    raise ValueError(f"offset={offset!r} is not allowed; it must be an int in [0, {n})")
  return full_at(num_layers, range(offset, num_layers, n), sparse)


def all_sparse(num_layers: int, sparse: str = "sink_window") -> tuple[str, ...]:
  """Every layer ``sparse`` (the all-sparse ablation)."""
  return full_at(num_layers, (), sparse)


# placement name -> (num_layers, sparse kind) -> kinds
PLACEMENTS: dict[str, Callable[[int, str], tuple[str, ...]]] = {
    "middle_third": middle_full,
    "bottom_third": bottom_full,
    "top_third": top_full,
    "every_third": every_nth_full,
    "all": all_sparse,
    "none": lambda num_layers, sparse: ("full",) * num_layers,
}


def named_schedule(spec: str, num_layers: int) -> tuple[str, ...]:
  """Kinds for a spec "<placement>:<sparse kind>", e.g. "middle_third:strided"."""
  placement, sep, sparse = spec.partition(":")
  if not sep or placement not in PLACEMENTS:
    raise ValueError(f"attention.schedule={spec!r} is not allowed; expected "
                     f"'<placement>:<sparse kind>' with placement one of "
                     f"{sorted(PLACEMENTS)}, e.g. 'middle_third:sink_window'")
  return PLACEMENTS[placement](num_layers, sparse)


# ------------------------------------------------------------ config -> layers


def layer_kinds(cfg: ModelConfig) -> tuple[str, ...]:
  """The kind of every layer, checked against the layer count and known kinds."""
  att = cfg.attention
  if att.layer_kinds and att.schedule:
    raise ValueError(f"set attention.layer_kinds or attention.schedule, not both "
                     f"(got {att.layer_kinds!r} and {att.schedule!r})")
  if att.schedule:
    kinds = named_schedule(att.schedule, cfg.num_layers)
  else:
    kinds = att.layer_kinds or ("full",) * cfg.num_layers
  if len(kinds) != cfg.num_layers:
    raise ValueError(f"attention.layer_kinds has {len(kinds)} entries but "
                     f"num_layers={cfg.num_layers}: give one kind per layer")
  unknown = sorted(set(kinds) - set(PATTERN_BUILDERS))
  if unknown:
    raise ValueError(f"unknown attention kinds {unknown}; known kinds: "
                     f"{sorted(PATTERN_BUILDERS)}")
  for kind in set(kinds):
    pattern = pattern_for(kind, att)  # checks the sizes this kind uses
    required = pattern.required_num_heads
    if required is not None and required != cfg.num_heads:
      raise ValueError(f"attention kind {kind!r} is written for {required} heads but "
                       f"num_heads={cfg.num_heads}")
  return tuple(kinds)


def layer_groups(cfg: ModelConfig) -> list[tuple[str, int]]:
  """Runs of identical consecutive kinds: ``[("full", 2), ("sink_window", 4), ...]``."""
  return [(kind, len(list(run)))
          for kind, run in itertools.groupby(layer_kinds(cfg))]


def pattern_for(kind: str, cfg: AttentionConfig) -> Pattern:
  _check_kind(kind, "attention")
  return PATTERN_BUILDERS[kind](cfg)


def with_layer_kinds(cfg: ModelConfig, kinds: Sequence[str]) -> ModelConfig:
  """``cfg`` with an explicit per-layer schedule (and no named one)."""
  att = dataclasses.replace(cfg.attention, layer_kinds=tuple(kinds), schedule="")
  out = dataclasses.replace(cfg, attention=att)
  layer_kinds(out)
  return out


# ------------------------------------------------------------ parameters


def unstack_layers(params: dict[str, Any]) -> list[Any]:
  """Per-layer parameter trees, in depth order, from the stacked ``group_i``."""
  layers = []
  for g in itertools.count():
    group = params.get(f"group_{g}")
    if group is None:
      break
    count = jax.tree.leaves(group)[0].shape[0]
    layers.extend(jax.tree.map(lambda x, i=i: x[i], group) for i in range(count))
  return layers


def regroup_params(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """``params`` of any schedule restacked into the groups of ``cfg``'s schedule.

  Works for any source grouping (group sizes are read from the arrays); the
  layer count must match.
  """
  layers = unstack_layers(params)
  if len(layers) != cfg.num_layers:
    raise ValueError(f"params have {len(layers)} layers but num_layers={cfg.num_layers}")
  out = {k: v for k, v in params.items() if not k.startswith("group_")}
  start = 0
  for g, (_, count) in enumerate(layer_groups(cfg)):
    out[f"group_{g}"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers[start:start + count])
    start += count
  return out
