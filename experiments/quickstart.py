"""The README's main command: a tiny byte-level model trained on the Python
standard library's own source on CPU in a few minutes, plus passkey retrieval."""
from __future__ import annotations

from experiments.base import base
from lcjax.config import Config, override
from lcjax.registry import register


@register
def quickstart() -> Config:
  """0.8M parameters, 128-token rows: 90% 2-digit passkey rows (answers
  weighted 16x) and 10% text. At this size and budget retrieval forms only
  when most rows ask for it and the learning rate is 1e-3 (with 50% passkey
  rows, or lr 2e-3, accuracy stays at chance after 500-600 steps)."""
  return override(base(), [
      "name=quickstart",
      "model.embed_dim=128", "model.num_layers=4", "model.num_heads=4",
      "model.num_kv_heads=2", "model.head_dim=32", "model.mlp_dim=384",
      "data.seq_len=128", "data.batch_size=24", "data.passkey_fraction=0.9",
      "data.answer_digits=2", "data.answer_weight=16",
      "train.steps=600", "train.learning_rate=1e-3", "train.warmup_steps=30",
      "train.log_every=50", "checkpoint.every=300",
      "eval.passkey_lengths=128", "eval.passkey_depths=0.1,0.5,0.9",
      "eval.passkey_samples=16",
  ])
