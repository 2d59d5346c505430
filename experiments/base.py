"""The base configs that other experiments derive from."""
from __future__ import annotations

from lcjax.config import Config, override
from lcjax.registry import register


@register
def base() -> Config:
  """Defaults of every field (a ~2M-parameter byte-level model)."""
  return Config(name="base")


@register
def gpu_150m_8k() -> Config:
  """A ~150M-parameter model at 8K context in bf16, for one H100."""
  return override(base(), [
      "name=gpu_150m_8k",
      "model.vocab_size=384", "model.embed_dim=1024", "model.num_layers=12",
      "model.num_heads=16", "model.num_kv_heads=4", "model.head_dim=64",
      "model.mlp_dim=2816", "model.dtype=bfloat16", "model.remat=dots",
      "data.seq_len=8192", "data.batch_size=8",
      "train.steps=200", "train.learning_rate=1e-3", "train.warmup_steps=20",
      "checkpoint.every=100", "eval.passkey_lengths=512,2048",
  ])
