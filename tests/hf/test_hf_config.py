"""config.json mapping: both RoPE spellings, round trips, and clear errors."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from lcjax import hf
from lcjax.config import ModelConfig, RopeConfig
from lcjax.hf import config_map
from lcjax.model import schedule

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False, "rope_theta": 10000.0, "bos_token_id": 1,
    "eos_token_id": [2, 3], "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
}


def _with(**changes):
  out = dict(LLAMA, **changes)
  return {k: v for k, v in out.items() if v is not ...}


def test_llama_fields_and_gqa():
  cfg = hf.model_config_from_hf(LLAMA)
  assert (cfg.vocab_size, cfg.embed_dim, cfg.num_layers, cfg.num_heads,
          cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (64, 32, 2, 4, 2, 8, 48)
  assert not cfg.tie_embeddings and not cfg.qkv_bias and cfg.norm_eps == 1e-5
  assert cfg.rope == RopeConfig(kind="plain", theta=10000.0)
  assert schedule.layer_kinds(cfg) == ("full", "full")
  # num_key_value_heads absent: multi-head attention.
  assert hf.model_config_from_hf(_with(num_key_value_heads=...)).num_kv_heads == 4


def test_base_keeps_training_fields():
  base = ModelConfig(dtype="bfloat16", param_dtype="bfloat16", remat="dots")
  cfg = hf.model_config_from_hf(LLAMA, base=base)
  assert (cfg.dtype, cfg.param_dtype, cfg.remat) == ("bfloat16", "bfloat16", "dots")


@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_both_rope_spellings(style):
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
  if style == "transformers4":
    hf_cfg = _with(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling})
  else:
    hf_cfg = _with(rope_theta=..., rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, **scaling})
  rope = hf.model_config_from_hf(hf_cfg).rope
  assert rope == RopeConfig(kind="llama3", theta=500000.0, factor=8.0,
                            original_max_len=8192, low_freq_factor=1.0,
                            high_freq_factor=4.0)


def test_legacy_type_key_and_defaults():
  rope = hf.model_config_from_hf(_with(rope_scaling={"type": "linear", "factor": 4})).rope
  assert rope.kind == "linear" and rope.factor == 4.0 and isinstance(rope.factor, float)
  yarn = hf.model_config_from_hf(_with(rope_scaling={"rope_type": "yarn", "factor": 4.0})).rope
  assert yarn.original_max_len == 128  # transformers: max_position_embeddings
  dyn = hf.model_config_from_hf(_with(rope_scaling={"rope_type": "dynamic", "factor": 2.0})).rope
  assert dyn.kind == "dynamic" and dyn.original_max_len == 128


@pytest.mark.parametrize("rope", [
    RopeConfig(theta=1e6),
    RopeConfig(kind="linear", factor=4.0),
    RopeConfig(kind="dynamic", factor=2.0, original_max_len=4096),
    RopeConfig(kind="yarn", factor=4.0, original_max_len=2048, beta_fast=16.0,
               attention_factor=1.2, yarn_truncate=False),
    RopeConfig(kind="yarn", factor=4.0, original_max_len=2048, mscale=0.7,
               mscale_all_dim=0.5),
    RopeConfig(kind="llama3", theta=5e5, factor=8.0, original_max_len=8192,
               low_freq_factor=2.0, high_freq_factor=8.0),
])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_config_round_trip(rope, family):
  cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=3, num_heads=4,
                    num_kv_heads=1, head_dim=16, mlp_dim=40, tie_embeddings=False,
                    qkv_bias=family == "qwen2", norm_eps=1e-6, rope=rope)
  hf_cfg = hf.hf_config_from_model(cfg, base={"max_position_embeddings": 4096,
                                              "bos_token_id": 7})
  assert hf_cfg["architectures"] == [config_map.FAMILY_ARCHITECTURE[family]]
  assert hf_cfg["bos_token_id"] == 7
  back = hf.model_config_from_hf(json.loads(json.dumps(hf_cfg)), base=cfg)
  assert back == dataclasses.replace(cfg, attention=back.attention)
  assert schedule.layer_kinds(back) == schedule.layer_kinds(cfg)
  no_base = hf.hf_config_from_model(cfg)  # max_position_embeddings chosen to fit
  assert hf.model_config_from_hf(no_base, base=cfg).rope == rope


def test_sliding_round_trips_as_mistral_and_qwen2():
  base = ModelConfig(num_layers=4, tie_embeddings=False)
  mistral = schedule.with_layer_kinds(base, ("sink_window",) * 4)
  mistral = dataclasses.replace(mistral, attention=dataclasses.replace(
      mistral.attention, sink=0, window=255))
  out = hf.hf_config_from_model(mistral)
  assert out["model_type"] == "mistral" and out["sliding_window"] == 256
  assert schedule.layer_kinds(hf.model_config_from_hf(out)) == ("sink_window",) * 4
  mixed = schedule.with_layer_kinds(dataclasses.replace(mistral, qkv_bias=True),
                                    ("full", "sink_window", "full", "sink_window"))
  out = hf.hf_config_from_model(mixed)
  assert out["model_type"] == "qwen2" and out["use_sliding_window"]
  assert out["layer_types"] == ["full_attention", "sliding_attention"] * 2
  back = hf.model_config_from_hf(out)
  assert schedule.layer_kinds(back) == schedule.layer_kinds(mixed)
  assert back.attention.window == 255


@pytest.mark.parametrize("changes, match", [
    (dict(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel.*unsupported"),
    (dict(architectures=..., model_type="gemma"), "model_type='gemma'"),
    (dict(model_type="qwen2"), "does not match"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True.*o_proj"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(quantization_config={"quant_method": "gptq"}), r"\['quantization_config'\]"),
    (dict(sliding_window=4096), r"\['sliding_window'\]"),  # not a Llama field
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "rope_type='longrope'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "alpha": 1}),
     r"unsupported key\(s\) \['alpha'\]"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs key"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), "per-layer"),
    (dict(num_hidden_layers=0), "num_hidden_layers=0"),
])
def test_unsupported_fields_are_named(changes, match):
  with pytest.raises(ValueError, match=match):
    hf.model_config_from_hf(_with(**changes))


def test_mistral_and_qwen2_specific_errors():
  mistral = dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral")
  with pytest.raises(hf.UnsupportedCheckpointError, match="sliding_window=0"):
    hf.model_config_from_hf(dict(mistral, sliding_window=0))
  with pytest.raises(hf.UnsupportedCheckpointError, match="layer_types in a Mistral"):
    hf.model_config_from_hf(dict(mistral, layer_types=["full_attention"] * 2))
  qwen = dict(LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
              use_sliding_window=True, sliding_window=16)
  with pytest.raises(hf.UnsupportedCheckpointError, match="chunked_attention"):
    hf.model_config_from_hf(dict(qwen, layer_types=["full_attention", "chunked_attention"]))
  with pytest.raises(hf.UnsupportedCheckpointError, match="use_mrope=True"):
    hf.model_config_from_hf(dict(qwen, use_mrope=True))
  assert hf.model_config_from_hf(dict(qwen, use_mrope=False)).qkv_bias
  with pytest.raises(hf.UnsupportedCheckpointError, match="3 entries"):
    hf.model_config_from_hf(dict(qwen, layer_types=["full_attention"] * 3))
  # use_sliding_window=False: transformers ignores sliding_window and layer_types.
  off = dict(qwen, use_sliding_window=False, layer_types=["sliding_attention"] * 2)
  assert schedule.layer_kinds(hf.model_config_from_hf(off)) == ("full", "full")


def test_export_errors():
  strided = schedule.with_layer_kinds(ModelConfig(num_layers=2), ("full", "strided"))
  with pytest.raises(hf.UnsupportedCheckpointError, match="strided"):
    hf.hf_config_from_model(strided)
  sinks = schedule.with_layer_kinds(ModelConfig(num_layers=2), ("sink_window",) * 2)
  with pytest.raises(hf.UnsupportedCheckpointError, match="attention.sink=64"):
    hf.hf_config_from_model(sinks)
  with pytest.raises(hf.UnsupportedCheckpointError, match="qkv_bias"):
    hf.hf_config_from_model(ModelConfig(), family="qwen2")
  with pytest.raises(hf.UnsupportedRopeError, match="'ntk' has no Hugging Face"):
    hf.hf_config_from_model(ModelConfig(rope=RopeConfig(kind="ntk", factor=2.0)))
  with pytest.raises(hf.UnsupportedRopeError, match="dca_chunk_size"):
    hf.hf_config_from_model(ModelConfig(rope=RopeConfig(dca_chunk_size=128)))


def _write_checkpoint(folder, hf_cfg, tensors):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_cfg, f)
  save_file(tensors, os.path.join(folder, "model.safetensors"))


def _llama_tensors(cfg: ModelConfig, rng) -> dict[str, np.ndarray]:
  from lcjax.hf import layout
  out = {}
  for rule in layout.tensor_rules(cfg):
    names = ([rule.hf_name.format(i=i) for i in range(cfg.num_layers)]
             if rule.per_layer else [rule.hf_name])
    for n in names:
      out[n] = rng.normal(size=rule.hf_shape).astype(np.float32)
  return out


def test_tensor_and_config_mismatches_are_named(tmp_path):
  cfg = hf.model_config_from_hf(LLAMA)
  rng = np.random.default_rng(0)
  good = _llama_tensors(cfg, rng)
  folder = str(tmp_path / "ok")
  _write_checkpoint(folder, LLAMA, dict(good, **{
      "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
  hf.load_params(folder, cfg)  # old RoPE buffers are ignored

  cases = {
      "missing": ({k: v for k, v in good.items() if "layers.1.mlp.up" not in k},
                  "lacks 1 tensor.*layers.1.mlp.up_proj"),
      "extra": (dict(good, **{"model.layers.0.self_attn.o_proj.bias":
                              np.zeros(32, np.float32)}), "o_proj.bias"),
      "shape": (dict(good, **{"model.norm.weight": np.ones(31, np.float32)}),
                r"model.norm.weight: \(31,\) != expected \(32,\)"),
  }
  for name, (tensors, match) in cases.items():
    folder = str(tmp_path / name)
    _write_checkpoint(folder, LLAMA, tensors)
    with pytest.raises(hf.CheckpointMismatchError, match=match):
      hf.load_params(folder, cfg)
  with pytest.raises(hf.CheckpointMismatchError, match="num_layers: config 4 vs checkpoint 2"):
    hf.load_params(str(tmp_path / "ok"), dataclasses.replace(cfg, num_layers=4))


def test_params_the_checkpoint_lacks_need_init_seed(tmp_path):
  cfg = hf.model_config_from_hf(LLAMA)
  folder = str(tmp_path / "ckpt")
  _write_checkpoint(folder, LLAMA, _llama_tensors(cfg, np.random.default_rng(1)))
  lora = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=2))
  from lcjax.hf import loader
  extra = sorted(set(loader.param_shardings(lora, _one_device_mesh())) -
                 set(loader.layer_sources(lora)))
  assert extra and all("lora" in "/".join(p) for p in extra)
  with pytest.raises(hf.CheckpointMismatchError, match="init_seed"):
    hf.load_params(folder, lora)
  params = hf.load_params(folder, lora, init_seed=0)
  plain = hf.load_params(folder, cfg)
  np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(plain["embed"]))


def _one_device_mesh():
  import jax
  from lcjax.config import MeshConfig
  from lcjax.sharding import make_mesh
  return make_mesh(MeshConfig(data=1), jax.devices()[:1])
