"""Logits parity with transformers: HF -> lcjax -> HF for Llama, Qwen2, Mistral.

Each case builds a tiny random model with transformers (CPU torch, float32),
saves it, loads it into lcjax and compares logits on random tokens; then
exports the lcjax params and reloads them in transformers, which must give
identical logits.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import CLASSES, hf_logits, make_model, random_tokens, rel_error, transformers

from lcjax import hf
from lcjax.model import Decoder, schedule
from lcjax.hf.safetensors_io import CheckpointReader

CASES = {
    # GQA, untied head, plain RoPE with a non-default base.
    "llama": ("llama", dict(rope_theta=500.0)),
    # Tied embeddings, linear position interpolation.
    "llama_tied_linear": ("llama", dict(tie_word_embeddings=True,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_llama3": ("llama", dict(rope_theta=10_000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_yarn": ("llama", dict(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    # Dynamic NTK becomes active: 19 tokens > max_position_embeddings=8.
    "llama_dynamic": ("llama", dict(max_position_embeddings=8, rope_scaling={
        "rope_type": "dynamic", "factor": 2.0})),
    # Qwen2: q/k/v biases, tied embeddings (as the small Qwen2 models).
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1_000_000.0)),
    # Qwen2 with sliding-window layers from max_window_layers on.
    "qwen2_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=5,
                                    max_window_layers=1)),
    # Mistral: a 6-token sliding window on every layer (19 tokens: it matters).
    "mistral": ("mistral", dict(sliding_window=6)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """``name -> (folder, transformers model)``, built lazily once per case."""
  cache = {}

  def get(name):
    if name not in cache:
      family, overrides = CASES[name]
      model = make_model(family, seed=len(cache), **overrides)
      folder = str(tmp_path_factory.mktemp(name))
      model.save_pretrained(folder)
      cache[name] = (folder, model)
    return cache[name]
  return get


def _our_logits(cfg, params, tokens):
  return np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(tokens)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_matches_transformers_and_export_reloads_identically(name, saved, tmp_path):
  folder, model = saved(name)
  cfg = hf.model_config_from_hf(hf.read_config(folder))
  params = hf.load_params(folder, cfg)
  tokens = random_tokens(cfg.vocab_size, seed=len(name))
  ref = hf_logits(model, tokens)
  ours = _our_logits(cfg, params, tokens)
  assert ours.shape == ref.shape
  assert rel_error(ours, ref) < 1e-4, rel_error(ours, ref)

  out = str(tmp_path / "export")
  files = hf.save_pretrained(params, cfg, out, dtype="float32", base=folder)
  assert files == ["model.safetensors"]
  with CheckpointReader(folder) as a, CheckpointReader(out) as b:
    assert b.names() == sorted(n for n in a.names()
                               if not (cfg.tie_embeddings and n == "lm_head.weight"))
    for n in b.names():  # bit-identical tensors
      np.testing.assert_array_equal(b.read(n), a.read(n), err_msg=n)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), ref)


def test_sliding_window_is_mapped_and_matters(saved):
  folder, model = saved("mistral")
  cfg = hf.model_config_from_hf(hf.read_config(folder))
  assert schedule.layer_kinds(cfg) == ("sink_window",) * 3
  assert (cfg.attention.sink, cfg.attention.window) == (0, 5)  # 6 keys incl. self
  folder, _ = saved("qwen2_sliding")
  qcfg = hf.model_config_from_hf(hf.read_config(folder))
  assert schedule.layer_kinds(qcfg) == ("full", "sink_window", "sink_window")
  # Without the window the logits differ: the parity above tests the window.
  dense = schedule.with_layer_kinds(cfg, ())
  params = hf.load_params(saved("mistral")[0], dense)
  tokens = random_tokens(cfg.vocab_size)
  assert rel_error(_our_logits(dense, params, tokens), hf_logits(model, tokens)) > 1e-3


def test_bfloat16_export_loads_in_transformers(saved, tmp_path):
  folder, model = saved("qwen2")
  cfg = hf.model_config_from_hf(hf.read_config(folder))
  params = hf.load_params(folder, cfg)
  out = str(tmp_path / "bf16")
  hf.save_pretrained(params, cfg, out, dtype="bfloat16", base=folder)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32")
  theirs = dict(reloaded.named_parameters())
  for name, p in model.named_parameters():  # each weight rounded to bf16
    np.testing.assert_array_equal(theirs[name].detach().numpy(),
                                  p.detach().bfloat16().float().numpy(), err_msg=name)
  # And loading the bf16 files into lcjax at float32 gives the same values.
  back = hf.load_params(out, cfg)
  np.testing.assert_array_equal(np.asarray(back["embed"]),
                                theirs["model.embed_tokens.weight"].detach().numpy())


@pytest.mark.parametrize("family, extra", [
    ("llama", {}), ("mistral", {}), ("qwen2", {}),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 1}),
])
def test_missing_keys_take_transformers_defaults(family, extra):
  """A minimal config.json means what transformers makes of it."""
  minimal = {"architectures": [CLASSES[family][1].__name__], "model_type": family,
             "vocab_size": 50, "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 3, "num_attention_heads": 16, **extra}
  theirs = CLASSES[family][0](**{k: v for k, v in minimal.items() if k != "architectures"})
  ours = hf.model_config_from_hf(minimal)
  assert ours.num_kv_heads == theirs.num_key_value_heads
  assert ours.head_dim == (getattr(theirs, "head_dim", None) or 64 // 16)
  assert ours.norm_eps == theirs.rms_norm_eps
  assert ours.tie_embeddings == theirs.tie_word_embeddings
  assert ours.rope.theta == theirs.rope_parameters["rope_theta"]
  layer_types = getattr(theirs, "layer_types", None)
  if family == "mistral":
    layer_types = ["sliding_attention" if theirs.sliding_window else "full_attention"] * 3
  expected = tuple("sink_window" if t == "sliding_attention" and theirs.sliding_window
                   else "full" for t in layer_types or ["full_attention"] * 3)
  assert schedule.layer_kinds(ours) == expected
  if "sink_window" in expected:
    assert ours.attention.window == theirs.sliding_window - 1
