"""Hugging Face RoPE settings (``rope_theta``/``rope_scaling`` or
``rope_parameters``) <-> :class:`lcjax.config.RopeConfig`.

Each HF ``rope_type`` maps to one kind of :mod:`lcjax.positions.rope` and each
of its keys to one ``RopeConfig`` field; a type or key without a counterpart is
an error naming it (a silently different RoPE gives a silently different model).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from lcjax.config import RopeConfig
from lcjax.positions import rope as rope_lib


class UnsupportedRopeError(ValueError):
  """An HF RoPE type or key that lcjax cannot represent exactly."""


@dataclasses.dataclass(frozen=True)
class _TypeMap:
  kind: str                     # our RopeConfig.kind
  fields: dict[str, str]        # HF key -> RopeConfig field
  original_from_max_pos: bool = False  # original length = max_position_embeddings


# HF rope_type -> how it maps (see lcjax/positions/rope.py for our kinds).
_TYPES: dict[str, _TypeMap] = {
    "default": _TypeMap("plain", {}),
    "linear": _TypeMap("linear", {"factor": "factor"}),
    "dynamic": _TypeMap("dynamic", {"factor": "factor"}, original_from_max_pos=True),
    "yarn": _TypeMap(
        "yarn",
        {"factor": "factor", "original_max_position_embeddings": "original_max_len",
         "beta_fast": "beta_fast", "beta_slow": "beta_slow",
         "attention_factor": "attention_factor", "mscale": "mscale",
         "mscale_all_dim": "mscale_all_dim", "truncate": "yarn_truncate"}),
    "llama3": _TypeMap(
        "llama3",
        {"factor": "factor", "original_max_position_embeddings": "original_max_len",
         "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor"}),
}
# RopeConfig fields that are numerics or training-time only: the same model.
_NOT_EXPORTED = ("angles", "augment", "augment_max_scale", "augment_seed")
_ORIGINAL_DEFAULTS_TO_MAX_POS = ("yarn", "llama3")


def hf_rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
  """One flat dict ``{"rope_type", "rope_theta", ...scaling keys}`` from either
  config style (what transformers' ``standardize_rope_params`` produces)."""
  scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if not isinstance(scaling, dict):
    raise UnsupportedRopeError(f"rope_scaling={scaling!r}: expected a dict or null")
  params = dict(scaling)
  if any(isinstance(v, dict) for v in params.values()):
    raise UnsupportedRopeError(
        f"per-layer-type RoPE parameters {sorted(params)} are unsupported")
  if "type" in params:  # the transformers 4 spelling
    legacy = params.pop("type")
    params.setdefault("rope_type", legacy)
  params.setdefault("rope_type", "default")
  params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
  if "partial_rotary_factor" in hf:
    params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
  return params


# Our "unset" value of keys that transformers reads as "absent -> computed".
_ZERO_MEANS_ABSENT = ("attention_factor", "mscale", "mscale_all_dim")
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
  """The :class:`RopeConfig` equivalent to an HF config's RoPE settings."""
  params = hf_rope_parameters(hf)
  rope_type = params.pop("rope_type")
  theta = float(params.pop("rope_theta"))
  partial = params.pop("partial_rotary_factor", 1.0)
  if partial != 1.0:
    raise UnsupportedRopeError(
        f"partial_rotary_factor={partial!r} is unsupported (lcjax rotates the "
        "whole head_dim); allowed: 1.0")
  if rope_type not in _TYPES:
    raise UnsupportedRopeError(
        f"rope_type={rope_type!r} is unsupported; lcjax maps {sorted(_TYPES)}")
  spec = _TYPES[rope_type]
  _check_kind_known(rope_type, spec.kind)
  max_pos = hf.get("max_position_embeddings")
  if rope_type in _ORIGINAL_DEFAULTS_TO_MAX_POS:
    if params.get("original_max_position_embeddings") is None:
      params["original_max_position_embeddings"] = max_pos
  if rope_type == "yarn" and params.get("factor") is None and max_pos:
    params["factor"] = max_pos / params["original_max_position_embeddings"]
  unknown = sorted(set(params) - set(spec.fields))
  if unknown:
    raise UnsupportedRopeError(
        f"rope_type={rope_type!r}: unsupported key(s) {unknown}; allowed: "
        f"{sorted(spec.fields)}")
  absent = [k for k in _REQUIRED.get(rope_type, ()) if params.get(k) is None]
  if absent:
    raise UnsupportedRopeError(f"rope_type={rope_type!r} needs key(s) {absent}")
  values: dict[str, Any] = {"kind": spec.kind, "theta": theta}
  for hf_key, field in spec.fields.items():
    if params.get(hf_key) is not None:  # None: transformers' default, and ours
      values[field] = params[hf_key]
  if spec.original_from_max_pos:
    values["original_max_len"] = max_pos
  return _make_rope(rope_type, values)


def rope_to_hf(cfg: RopeConfig, max_position_embeddings: int) -> dict[str, Any]:
  """``{"rope_theta": ..., "rope_scaling": ...}`` for ``config.json``.

  Written in the transformers-4 spelling, which transformers 5 also reads.
  """
  by_kind = {spec.kind: name for name, spec in _TYPES.items()}
  if cfg.kind not in by_kind:
    raise UnsupportedRopeError(
        f"rope.kind={cfg.kind!r} has no Hugging Face rope_type; exportable kinds: "
        f"{sorted(by_kind)}")
  rope_type = by_kind[cfg.kind]
  spec = _TYPES[rope_type]
  _check_unmapped_fields(cfg, spec)
  out: dict[str, Any] = {"rope_theta": cfg.theta}
  if rope_type == "default":
    out["rope_scaling"] = None
    return out
  scaling: dict[str, Any] = {"rope_type": rope_type}
  for hf_key, field in spec.fields.items():
    value = getattr(cfg, field)
    if not (field in _ZERO_MEANS_ABSENT and value == 0):
      scaling[hf_key] = value
  if spec.original_from_max_pos and cfg.original_max_len != max_position_embeddings:
    raise UnsupportedRopeError(
        f"rope kind {cfg.kind!r} takes its original length from "
        f"max_position_embeddings={max_position_embeddings} in transformers, but "
        f"rope.original_max_len={cfg.original_max_len}")
  out["rope_scaling"] = scaling
  return out


def _check_kind_known(rope_type: str, kind: str) -> None:
  known = getattr(rope_lib, "ROPE_KINDS", ())
  if kind not in known:
    raise UnsupportedRopeError(
        f"rope_type={rope_type!r} needs RoPE kind {kind!r}, which "
        f"lcjax.positions.rope does not implement (kinds: {list(known)})")


def _make_rope(rope_type: str, values: dict[str, Any]) -> RopeConfig:
  fields = {f.name: f for f in dataclasses.fields(RopeConfig)}
  missing = sorted(set(values) - set(fields))
  if missing:
    raise UnsupportedRopeError(
        f"rope_type={rope_type!r} needs RopeConfig field(s) {missing}, which "
        "lcjax.config.RopeConfig does not have yet")
  for name, value in values.items():  # ints in JSON for float fields, etc.
    if fields[name].type in ("float", float) and isinstance(value, int) and \
        not isinstance(value, bool):
      values[name] = float(value)
  return RopeConfig(**values)


def _check_unmapped_fields(cfg: RopeConfig, spec: _TypeMap) -> None:
  """Fields set away from their defaults that the HF type cannot carry."""
  carried = set(spec.fields.values()) | {"kind", "theta"} | set(_NOT_EXPORTED)
  if spec.original_from_max_pos:
    carried.add("original_max_len")
  default = RopeConfig()
  lost = sorted(f.name for f in dataclasses.fields(RopeConfig)
                if f.name not in carried and getattr(cfg, f.name) != getattr(default, f.name))
  if lost:
    raise UnsupportedRopeError(
        f"rope fields {lost} (kind {cfg.kind!r}) cannot be written to a Hugging "
        "Face config")
