"""Tiny random Hugging Face models for the tests (CPU torch, float32)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="transformers tests need torch (CPU)")
transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=101, hidden_size=48, intermediate_size=72,
             num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5)
CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def make_model(family: str, seed: int = 0, **overrides):
  """A randomly initialised model with every weight (norms, biases) random."""
  config_cls, model_cls = CLASSES[family]
  kwargs = dict(SIZES, **overrides)
  torch.manual_seed(seed)
  model = model_cls(config_cls(**kwargs)).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def random_tokens(vocab: int, shape=(2, 19), seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
