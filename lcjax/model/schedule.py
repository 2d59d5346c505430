"""Per-layer attention kinds and how they map to patterns.

A model's ``attention.layer_kinds`` names one kind per layer. Consecutive layers
of the same kind form a *group* that is compiled once with ``nn.scan``, so
compile time grows with the number of groups, not with depth.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

from lcjax.attention import Causal, Pattern
from lcjax.config import AttentionConfig, ModelConfig

# kind name -> builder of the pattern from the sizes in AttentionConfig.
PATTERN_BUILDERS: dict[str, Callable[[AttentionConfig], Pattern]] = {
    "full": lambda cfg: Causal(),
}


def layer_kinds(cfg: ModelConfig) -> tuple[str, ...]:
  """The kind of every layer, checked against the layer count and known kinds."""
  kinds = cfg.attention.layer_kinds or ("full",) * cfg.num_layers
  if len(kinds) != cfg.num_layers:
    raise ValueError(f"attention.layer_kinds has {len(kinds)} entries but "
                     f"num_layers={cfg.num_layers}: give one kind per layer")
  unknown = sorted(set(kinds) - set(PATTERN_BUILDERS))
  if unknown:
    raise ValueError(f"unknown attention kinds {unknown}; known kinds: "
                     f"{sorted(PATTERN_BUILDERS)}")
  return tuple(kinds)


def layer_groups(cfg: ModelConfig) -> list[tuple[str, int]]:
  """Runs of identical consecutive kinds: ``[("full", 2), ("sink_window", 4), ...]``."""
  return [(kind, len(list(run)))
          for kind, run in itertools.groupby(layer_kinds(cfg))]


def pattern_for(kind: str, cfg: AttentionConfig) -> Pattern:
  return PATTERN_BUILDERS[kind](cfg)
