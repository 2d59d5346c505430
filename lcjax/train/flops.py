"""Model FLOPs per token, for tokens/s -> MFU.

Counts matrix multiplies only: ``6 x`` the matmul parameters touched per token
(forward + backward), plus attention's ``QK^T`` and ``PV`` over the keys each
query actually sees under its layer's pattern (so sparse layers count less).
"""
from __future__ import annotations

import numpy as np

from lcjax.attention import Pattern
from lcjax.config import ModelConfig
from lcjax.model import schedule


def mean_visible_keys(pattern: Pattern, seq_len: int, max_rows: int = 256) -> float:
  """Average number of keys a query sees (exact up to ``max_rows`` sampled rows)."""
  rows = np.unique(np.linspace(0, seq_len - 1, min(seq_len, max_rows)).astype(np.int64))
  visible = 0.0
  for start in range(0, len(rows), 64):
    q_pos = rows[start:start + 64, None]
    mask = np.asarray(pattern.mask(q_pos, np.arange(seq_len)[None, :]))
    visible += np.broadcast_to(mask, (len(q_pos), seq_len)).sum()
  return visible / len(rows)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  D, N, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
  dense = cfg.num_layers * per_layer + D * cfg.vocab_size
  attention_fwd = 0.0
  for kind, count in schedule.layer_groups(cfg):
    keys = mean_visible_keys(schedule.pattern_for(kind, cfg.attention), seq_len)
    attention_fwd += count * 4 * keys * H * N
  return 6 * dense + 3 * attention_fwd
