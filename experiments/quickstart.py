"""The README's main command: a tiny byte-level model trained on the Python
standard library's source on CPU in a few minutes, plus passkey retrieval."""
from __future__ import annotations

from experiments.base import base
from lcjax.config import Config, override
from lcjax.registry import register


@register
def quickstart() -> Config:
  return override(base(), [
      "name=quickstart",
      "model.embed_dim=128", "model.num_layers=4", "model.num_heads=4",
      "model.num_kv_heads=2", "model.head_dim=32", "model.mlp_dim=384",
      "data.seq_len=256", "data.batch_size=16", "data.passkey_fraction=0.25",
      "train.steps=300", "train.learning_rate=3e-3", "train.warmup_steps=30",
      "train.log_every=20", "checkpoint.every=100",
      "eval.passkey_lengths=128,256", "eval.passkey_depths=0.1,0.5,0.9",
      "eval.passkey_samples=16",
  ])
