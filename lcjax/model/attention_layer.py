"""Grouped-query self-attention layer with RoPE, calling ``lcjax.attention.attend``."""
from __future__ import annotations

import flax.linen as nn
import jax

from lcjax.attention import Pattern, attend
from lcjax.config import ModelConfig
from lcjax.model.layers import Projection
from lcjax.model.dtypes import dtype_of
from lcjax.positions.rope import apply_rope
from lcjax.sharding import constrain


class SelfAttention(nn.Module):
  """Projects to q/k/v (``num_kv_heads`` < ``num_heads`` gives GQA), rotates q/k,
  attends under ``pattern`` within segments, projects back."""
  cfg: ModelConfig
  pattern: Pattern

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               segment_ids_BxT: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    q_BxTxNxH = Projection((D,), (N, H), ("embed",), ("heads", "head_dim"),
                           name="q", **kw)(x_BxTxD)
    k_BxTxKxH = Projection((D,), (K, H), ("embed",), ("kv_heads", "head_dim"),
                           name="k", **kw)(x_BxTxD)
    v_BxTxKxH = Projection((D,), (K, H), ("embed",), ("kv_heads", "head_dim"),
                           name="v", **kw)(x_BxTxD)
    q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rope)
    k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, cfg.rope)
    q_BxTxNxH = constrain(q_BxTxNxH, ("batch", "sequence", "heads", "head_dim"))
    k_BxTxKxH = constrain(k_BxTxKxH, ("batch", "sequence", "kv_heads", "head_dim"))
    v_BxTxKxH = constrain(v_BxTxKxH, ("batch", "sequence", "kv_heads", "head_dim"))
    out_BxTxNxH = attend(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, self.pattern,
        q_segment_ids=segment_ids_BxT, kv_segment_ids=segment_ids_BxT,
        softcap=cfg.attention.softcap or None,
        implementation=cfg.attention.implementation)
    out_BxTxNxH = constrain(out_BxTxNxH, ("batch", "sequence", "heads", "head_dim"))
    return Projection((N, H), (D,), ("heads", "head_dim"), ("embed",),
                      name="o", **kw)(out_BxTxNxH)
