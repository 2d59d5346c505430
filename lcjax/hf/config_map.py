"""Hugging Face ``config.json`` <-> :class:`lcjax.config.ModelConfig`.

Supported: ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` (q/k/v biases, optional
sliding-window layers) and ``MistralForCausalLM`` (sliding window on every
layer), with grouped-query attention, tied embeddings and ``rope_scaling``.
Both config styles are read: ``rope_theta`` + ``rope_scaling`` (transformers 4)
and ``rope_parameters`` (transformers 5).

Every key of ``config.json`` is either mapped, or known not to change the
forward pass (ids of special tokens, dropout, ...), or rejected by name: a key
we do not understand may change the model, and loading it anyway would be
silently wrong.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from lcjax.config import ModelConfig
from lcjax.hf import rope_map
from lcjax.model import schedule


class UnsupportedCheckpointError(ValueError):
  """A checkpoint field or value that lcjax cannot represent exactly."""


ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}

# The attention kind of a Mistral/Qwen2 sliding-window layer: ``SinkWindow``
# with no sink, i.e. query q sees keys q - window <= k <= q.
SLIDING_KIND = "sink_window"

_COMMON_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
}
_FAMILY_KEYS = {
    "llama": {"attention_bias", "mlp_bias", "pretraining_tp"},
    "qwen2": {"use_sliding_window", "sliding_window", "max_window_layers",
              "layer_types", "use_mrope"},
    "mistral": {"sliding_window", "layer_types"},  # layer_types: rejected below
}
# transformers' defaults for keys a config.json may leave out (the shapes
# themselves are required). Llama's num_key_value_heads defaults to the heads.
_FAMILY_DEFAULTS = {
    "llama": {},
    "qwen2": {"num_key_value_heads": 32, "sliding_window": 4096,
              "max_window_layers": 28},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096},
}
# Keys that do not change the forward pass of a causal LM (metadata, generation
# and training-only settings).
_IGNORED_KEYS = {
    "_name_or_path", "architectures", "model_type", "transformers_version",
    "torch_dtype", "dtype", "use_cache", "initializer_range", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "output_attentions", "output_hidden_states",
    "return_dict", "use_return_dict", "torchscript", "use_bfloat16",
    "tokenizer_class", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "task_specific_params", "prefix", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tf_legacy_loss", "pruned_heads", "_attn_implementation_autoset",
    "attn_implementation", "_attn_implementation",
}


def read_config(path: str) -> dict[str, Any]:
  """``config.json`` of a checkpoint folder (or the file itself) as a dict."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"no config.json in {path!r}: expected a Hugging Face "
                            "checkpoint folder (config.json + *.safetensors)")
  with open(file) as f:
    return json.load(f)


def family_of(hf: dict[str, Any]) -> str:
  """``"llama"``, ``"qwen2"`` or ``"mistral"``, from ``architectures``/``model_type``."""
  archs = hf.get("architectures") or []
  if len(archs) > 1:
    raise UnsupportedCheckpointError(f"architectures={archs}: expected exactly one")
  if archs:
    if archs[0] not in ARCHITECTURES:
      raise UnsupportedCheckpointError(
          f"architectures={archs}: unsupported; lcjax loads {sorted(ARCHITECTURES)}")
    family = ARCHITECTURES[archs[0]]
    if hf.get("model_type", family) != family:
      raise UnsupportedCheckpointError(
          f"model_type={hf['model_type']!r} does not match architectures={archs}")
    return family
  model_type = hf.get("model_type")
  if model_type not in FAMILY_ARCHITECTURE:
    raise UnsupportedCheckpointError(
        f"model_type={model_type!r} (and no architectures): unsupported; lcjax "
        f"loads model types {sorted(FAMILY_ARCHITECTURE)}")
  return model_type


def model_config_from_hf(hf: dict[str, Any], base: ModelConfig | None = None
                         ) -> ModelConfig:
  """Maps a Hugging Face config dict onto a :class:`ModelConfig`.

  Fields the checkpoint does not determine (``dtype``, ``param_dtype``,
  ``remat``, ``attention.implementation``) come from ``base``.
  """
  base = base or ModelConfig()
  family = family_of(hf)
  _check_keys(hf, family)
  hf = {**_FAMILY_DEFAULTS[family], **hf}
  _require(hf, "hidden_act", ("silu",), default="silu")
  n_heads = _int(hf, "num_attention_heads")
  embed = _int(hf, "hidden_size")
  head_dim = hf.get("head_dim") or embed // n_heads
  n_layers = _int(hf, "num_hidden_layers")
  if family == "llama":
    _require(hf, "attention_bias", (False,), default=False,
             why="o_proj biases are not part of lcjax's attention layer")
    _require(hf, "mlp_bias", (False,), default=False,
             why="the SwiGLU MLP has no biases")
  if family == "qwen2":
    _require(hf, "use_mrope", (False,), default=False,
             why="multimodal RoPE belongs to Qwen2-VL, not Qwen2ForCausalLM")
  window, kinds = _sliding_layers(hf, family, n_layers)
  attention = dataclasses.replace(base.attention, layer_kinds=kinds, schedule="")
  if window is not None:
    attention = dataclasses.replace(attention, sink=0, window=window - 1)
  return dataclasses.replace(
      base,
      vocab_size=_int(hf, "vocab_size"),
      embed_dim=embed,
      num_layers=n_layers,
      num_heads=n_heads,
      num_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=int(head_dim),
      mlp_dim=_int(hf, "intermediate_size"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=family == "qwen2",
      rope=rope_map.rope_from_hf(hf),
      attention=attention,
  )


def hf_config_from_model(cfg: ModelConfig, family: str | None = None,
                         base: dict[str, Any] | None = None,
                         dtype: str = "bfloat16") -> dict[str, Any]:
  """A ``config.json`` dict for ``cfg`` (the inverse of :func:`model_config_from_hf`).

  ``base`` (e.g. the config of the checkpoint a run started from) provides the
  unmapped fields: special token ids, ``max_position_embeddings``, ...
  """
  family = family or export_family(cfg)
  if family not in FAMILY_ARCHITECTURE:
    raise ValueError(f"family {family!r} is not one of {sorted(FAMILY_ARCHITECTURE)}")
  if cfg.qkv_bias != (family == "qwen2"):
    raise UnsupportedCheckpointError(
        f"model.qkv_bias={cfg.qkv_bias} does not fit family {family!r} (only qwen2 "
        "has q/k/v biases)")
  out = {k: v for k, v in (base or {}).items()
         if k in _IGNORED_KEYS or k == "max_position_embeddings"}
  for stale in ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype",
                "_name_or_path", "transformers_version"):
    out.pop(stale, None)
  out.update(
      architectures=[FAMILY_ARCHITECTURE[family]], model_type=family,
      vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
      intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, dtype=dtype)
  out.setdefault("max_position_embeddings", _max_positions(cfg))
  out.update(rope_map.rope_to_hf(cfg.rope, out["max_position_embeddings"]))
  window, kinds = _export_sliding(cfg, family)
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  elif family == "mistral":
    out["sliding_window"] = window
  else:
    out.update(use_sliding_window=window is not None, sliding_window=window,
               max_window_layers=cfg.num_layers,
               layer_types=["sliding_attention" if k == SLIDING_KIND else
                            "full_attention" for k in kinds])
  return out


def _max_positions(cfg: ModelConfig) -> int:
  """``max_position_embeddings`` when no base config gives it: the trained
  length for dynamic NTK (which reads it as such), else the extended one."""
  rope = cfg.rope
  if rope.kind == "dynamic":
    return rope.original_max_len
  if rope.original_max_len:
    return int(rope.original_max_len * rope.factor)
  return 4096


def export_family(cfg: ModelConfig) -> str:
  """The family that represents ``cfg`` exactly: qwen2 for q/k/v biases,
  mistral for sliding windows on every layer, else llama."""
  if cfg.qkv_bias:
    return "qwen2"
  kinds = set(_kinds(cfg))
  return "mistral" if kinds == {SLIDING_KIND} else "llama"


# --------------------------------------------------------------------- helpers


def _kinds(cfg: ModelConfig) -> tuple[str, ...]:
  return schedule.layer_kinds(cfg)


def _export_sliding(cfg: ModelConfig, family: str) -> tuple[int | None, tuple[str, ...]]:
  """HF ``sliding_window`` (keys per window, incl. the query's own) and kinds."""
  kinds = _kinds(cfg)
  other = sorted(set(kinds) - {"full", SLIDING_KIND})
  sliding = SLIDING_KIND in kinds
  if sliding and cfg.attention.sink:
    other.append(f"{SLIDING_KIND} with attention.sink={cfg.attention.sink}")
  if other:
    raise UnsupportedCheckpointError(
        f"attention kinds {other} have no Hugging Face equivalent; to write the "
        "same params with full attention on every layer, export with "
        "dense_attention=True (command line: --dense-attention)")
  window = cfg.attention.window + 1 if sliding else None
  if family == "llama" and sliding:
    raise UnsupportedCheckpointError(
        "Llama has no sliding-window layers; export as family 'mistral' (every "
        "layer sliding) or 'qwen2' (any mix, needs model.qkv_bias)")
  if family == "mistral" and sliding and set(kinds) != {SLIDING_KIND}:
    raise UnsupportedCheckpointError(
        f"Mistral slides on every layer but the schedule mixes kinds {kinds}")
  return window, kinds


def _sliding_layers(hf: dict[str, Any], family: str, n_layers: int
                    ) -> tuple[int | None, tuple[str, ...]]:
  """The window size (HF convention) and our per-layer kinds (() = all full)."""
  if family == "llama":
    return None, ()
  if family == "mistral":
    if "layer_types" in hf:
      raise UnsupportedCheckpointError(
          "layer_types in a Mistral config: MistralForCausalLM ignores it (it "
          "slides on every layer), so its meaning is ambiguous; remove the field")
    window = hf.get("sliding_window")
    if window is None:
      return None, ()
    _check_window(window)
    return window, (SLIDING_KIND,) * n_layers
  window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
  types = hf.get("layer_types")
  if types is None:
    start = hf["max_window_layers"]
    types = ["sliding_attention" if window is not None and i >= start
             else "full_attention" for i in range(n_layers)]
  if len(types) != n_layers:
    raise UnsupportedCheckpointError(
        f"layer_types has {len(types)} entries but num_hidden_layers={n_layers}")
  bad = sorted(set(types) - {"full_attention", "sliding_attention"})
  if bad:
    raise UnsupportedCheckpointError(
        f"layer_types {bad} are unsupported; allowed: full_attention, "
        "sliding_attention")
  if window is None or "sliding_attention" not in types:
    return None, ()  # transformers runs every layer dense then
  _check_window(window)
  return window, tuple(SLIDING_KIND if t == "sliding_attention" else "full"
                       for t in types)


def _check_window(window: Any) -> None:
  if not isinstance(window, int) or isinstance(window, bool) or window < 1:
    raise UnsupportedCheckpointError(
        f"sliding_window={window!r} is not allowed; expected a positive int or null")


def _check_keys(hf: dict[str, Any], family: str) -> None:
  allowed = _COMMON_KEYS | _FAMILY_KEYS[family] | _IGNORED_KEYS
  unknown = sorted(set(hf) - allowed)
  if unknown:
    raise UnsupportedCheckpointError(
        f"unsupported field(s) {unknown} in a {FAMILY_ARCHITECTURE[family]} "
        f"config.json; lcjax maps {sorted(_COMMON_KEYS | _FAMILY_KEYS[family])} "
        "and ignores metadata such as token ids; remove a field only if it does "
        "not change the model's forward pass")


def _int(hf: dict[str, Any], key: str) -> int:
  value = hf.get(key)
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise UnsupportedCheckpointError(
        f"config.json field {key}={value!r} is not allowed; expected a positive int")
  return value


def _require(hf: dict[str, Any], key: str, allowed: tuple, default: Any,
             why: str = "") -> None:
  value = hf.get(key, default)
  if value not in allowed:
    raise UnsupportedCheckpointError(
        f"config.json field {key}={value!r} is unsupported; allowed: "
        f"{list(allowed)}" + (f" ({why})" if why else ""))
