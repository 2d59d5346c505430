"""Typed, frozen experiment configuration.

An experiment is a function returning a :class:`Config` (see ``experiments/``).
Configs compose with :func:`replace` (``replace(base(), "model.num_layers", 8)``)
and command-line overrides (``--set model.num_layers=8``). Every key is checked:
a misspelt key fails with the list of valid keys, a bad value with its type.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding (Su et al., 2021) and its long-context scalings.

  See ``lcjax/positions/rope.py`` and ``docs/positions.md``. ``kind``: "plain",
  "linear" (position interpolation), "ntk", "dynamic" (dynamic NTK), "yarn",
  "llama3"; ABF is "plain" with a larger ``theta``. ``original_max_len`` is the
  trained context length (dynamic, yarn, llama3).
  """
  kind: str = "plain"
  theta: float = 10_000.0
  factor: float = 1.0
  original_max_len: int = 0
  beta_fast: float = 32.0          # yarn: ramp ends (rotations in original_max_len)
  beta_slow: float = 1.0
  attention_factor: float = 0.0    # yarn: 0 = 0.1 ln(factor) + 1
  mscale: float = 0.0              # yarn, DeepSeek style: attention factor from
  mscale_all_dim: float = 0.0      # mscale / mscale_all_dim when both are set
  yarn_truncate: bool = True
  low_freq_factor: float = 1.0     # llama3
  high_freq_factor: float = 4.0
  angles: str = "float32"          # "float64": exact angles past ~1M positions
  # E2-LLM training-time augmentation (lcjax/positions/augment.py): "none" or
  # "e2llm" (random scale in 1..augment_max_scale and position offset per row).
  augment: str = "none"
  augment_max_scale: int = 1
  augment_seed: int = 0
  # Dual Chunk Attention (lcjax/positions/dca.py); 0 = off.
  dca_chunk_size: int = 0
  dca_local_window: int = 0


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Per-layer attention *kinds* and the sizes of the sparse patterns.

  ``layer_kinds`` names one kind per layer; when empty, ``schedule`` names a
  LongGen-style placement "<placement>:<sparse kind>" (e.g.
  "middle_third:sink_window", "all:strided"; see ``lcjax/model/schedule.py``),
  and when both are empty every layer is "full". The model scans over runs of
  identical consecutive kinds. Kinds: "full" (causal), "sink_window" (``sink``
  first tokens + the ``window`` keys before the query), "strided" (blocks of
  ``block_size``: ``local_blocks`` local blocks + every ``stride``-th block,
  offset per head if ``strided_head_offsets``). ``decode_implementation`` is
  the cache attention of the inference engine: "auto", "reference", "xla",
  "pallas".
  """
  layer_kinds: tuple[str, ...] = ()
  schedule: str = ""
  implementation: str = "auto"
  sink: int = 64
  window: int = 1024
  block_size: int = 64
  stride: int = 16
  local_blocks: int = 1
  strided_head_offsets: bool = True
  softcap: float = 0.0
  decode_implementation: str = "auto"
  # LongLoRA S²-attn (kind "shifted_groups"): causal attention within groups of
  # ``shift_group_size`` tokens, the groups of the second half of the
  # ``shift_num_heads`` heads (= model.num_heads) shifted by half a group.
  shift_group_size: int = 0
  shift_num_heads: int = 0


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters (Hu et al., 2021) as in LongLoRA (Chen et al., 2023).

  ``rank > 0`` adds ``x A B * alpha / rank`` to the projections named in
  ``targets`` and makes only the adapters, the embedding and the norms
  trainable (``lcjax/model/lora.py``).
  """
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "k", "v", "o")


@dataclasses.dataclass(frozen=True)
class ContextParallelConfig:
  """Attention when the mesh's ``sequence`` axis has size > 1 (lcjax.parallel).

  ``strategy``: "ring", "allgather", "ulysses", "hybrid" (Ulysses inside groups
  of ``ulysses_degree`` consecutive sequence devices, ring across groups) or
  "none" (no context parallelism: XLA partitions ``attend`` itself).
  ``load_balance``: "zigzag", "striped" or "none" (contiguous shards); the
  sequence is permuted once in the data path. ``sparse_exchange``: layers whose
  pattern needs only some shards (windows, sinks, strided blocks) exchange just
  those unless the strategy moves fewer bytes. See docs/context_parallel.md.
  """
  strategy: str = "ring"
  load_balance: str = "zigzag"
  ulysses_degree: int = 1
  sparse_exchange: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Llama-style decoder: RMSNorm, SwiGLU, grouped-query attention, RoPE."""
  vocab_size: int = 384
  embed_dim: int = 256
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 768
  tie_embeddings: bool = True
  qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
  norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  rope: RopeConfig = RopeConfig()
  attention: AttentionConfig = AttentionConfig()
  lora: LoraConfig = LoraConfig()
  context_parallel: ContextParallelConfig = ContextParallelConfig()
  # A Hugging Face checkpoint folder to start from (see lcjax.hf): its
  # config.json fixes the architecture, its safetensors the initial params.
  init_from: str = ""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from and how rows are built.

  ``source``: "stdlib" (the Python standard library's own source files, present
  on every machine) or "files" (``paths`` is a glob of UTF-8 text files).
  """
  source: str = "stdlib"
  paths: str = ""
  store_dir: str = ""
  seq_len: int = 256
  batch_size: int = 8
  # Synthetic retrieval rows mixed into the text (``lcjax.data.tasks``): each
  # row is passkey with probability ``passkey_fraction``, multi-key NIAH with
  # ``niah_fraction``, else text. Their loss is on the answer + EOS only, scaled
  # by ``answer_weight`` (a few answer tokens beside whole text rows otherwise
  # barely move a small model).
  passkey_fraction: float = 0.0
  niah_fraction: float = 0.0
  niah_keys: int = 4
  answer_digits: int = 5
  answer_weight: float = 1.0
  max_documents: int = 0
  seed: int = 0
  # AnchorAttention rows (lcjax.data.packing.anchor_rows): token 0 is a shared
  # BOS anchor, positions not reset per document; use "anchor" layer kinds.
  anchor: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 200
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  beta1: float = 0.9
  beta2: float = 0.95
  grad_clip: float = 1.0
  grad_accum: int = 1
  log_every: int = 10
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 100
  keep: int = 3
  resume: bool = True
  # Workdir of an earlier lcjax run whose latest params start this one (fine-
  # tuning, context extension); params it lacks (LoRA adapters) keep their init.
  init_params_from: str = ""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = 0
  batches: int = 4
  passkey_lengths: tuple[int, ...] = (128,)
  passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
  passkey_samples: int = 8


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh: the product of the four sizes must equal the device count.

  One size may be -1 to take whatever devices remain.
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "base"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  eval: EvalConfig = EvalConfig()
  mesh: MeshConfig = MeshConfig()


class ConfigError(ValueError):
  """A config key or value that does not exist or does not fit its field."""


def replace(cfg: Any, key: str, value: Any, *, _prefix: str = "") -> Any:
  """Returns ``cfg`` with the dotted ``key`` set to ``value`` (type-checked)."""
  head, _, rest = key.partition(".")
  fields = {f.name: f for f in dataclasses.fields(cfg)}
  if head not in fields:
    valid = ", ".join(_prefix + name for name in sorted(fields))
    raise ConfigError(f"unknown config key {_prefix + key!r}; valid keys here: {valid}")
  current = getattr(cfg, head)
  if rest:
    if not dataclasses.is_dataclass(current):
      raise ConfigError(f"{_prefix + head!r} is a value, not a section; cannot set "
                        f"{_prefix + key!r}")
    new = replace(current, rest, value, _prefix=f"{_prefix}{head}.")
  else:
    if dataclasses.is_dataclass(current):
      raise ConfigError(f"{_prefix + head!r} is a section; set one of its keys: " +
                        ", ".join(f"{_prefix}{head}.{f.name}"
                                  for f in dataclasses.fields(current)))
    hint = typing.get_type_hints(type(cfg))[head]
    new = _coerce(value, hint, _prefix + key)
  return dataclasses.replace(cfg, **{head: new})


def override(cfg: Any, assignments: list[str]) -> Any:
  """Applies ``["a.b=1", ...]`` overrides, parsing each value by its field type."""
  for item in assignments:
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} must look like key=value")
    cfg = replace(cfg, key.strip(), value.strip())
  return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """``{"model.num_layers": 4, ...}`` — for printing and logging."""
  out = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v):
      out.update(flatten(v, f"{prefix}{f.name}."))
    else:
      out[f"{prefix}{f.name}"] = v
  return out


def to_text(cfg: Any) -> str:
  return "\n".join(f"  {k} = {v!r}" for k, v in flatten(cfg).items())


def _coerce(value: Any, hint: Any, key: str) -> Any:
  """Parses strings from the command line and checks types of Python values."""
  origin = typing.get_origin(hint)
  if origin is tuple:
    (elem, *_) = typing.get_args(hint)
    if isinstance(value, str):
      value = [v for v in value.split(",") if v.strip()] if value.strip() else []
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key} expects a tuple of {elem.__name__}, got {value!r}")
    return tuple(_coerce(v, elem, key) for v in value)
  if origin in (typing.Union, types.UnionType):
    errors = []
    for option in typing.get_args(hint):
      try:
        return _coerce(value, option, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"{key}: {value!r} matches none of {hint}: {errors}")
  if hint is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
      return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{key} expects a bool (true/false), got {value!r}")
  if hint is int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
      raise ConfigError(f"{key} expects an int, got {value!r}")
    try:
      return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
    except (TypeError, ValueError):
      raise ConfigError(f"{key} expects an int, got {value!r}") from None
  if hint is float:
    if isinstance(value, bool):
      raise ConfigError(f"{key} expects a float, got {value!r}")
    try:
      return float(value)
    except (TypeError, ValueError):
      raise ConfigError(f"{key} expects a float, got {value!r}") from None
  if hint is str:
    if not isinstance(value, str):
      raise ConfigError(f"{key} expects a string, got {value!r}")
    return value
  raise ConfigError(f"{key}: unsupported field type {hint}")
