"""Grouped-query self-attention layer with RoPE, calling ``lcjax.attention.attend``."""
from __future__ import annotations

import flax.linen as nn
import jax

from lcjax.attention import Causal, Pattern
from lcjax.config import ModelConfig
from lcjax.inference import kv_cache
from lcjax.model import lora
from lcjax.model.layers import Projection
from lcjax.parallel.context import context_attention, model_cp_config
from lcjax.model.dtypes import dtype_of
from lcjax.positions import dca
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
    lora_kw = lambda name: dict(lora_rank=lora.rank_for(cfg, name),
                                lora_alpha=cfg.lora.alpha)
    q_BxTxNxH = Projection((D,), (N, H), ("embed",), ("heads", "head_dim"),
                           name="q", use_bias=cfg.qkv_bias, **lora_kw("q"),
                           **kw)(x_BxTxD)
    k_BxTxKxH = Projection((D,), (K, H), ("embed",), ("kv_heads", "head_dim"),
                           name="k", use_bias=cfg.qkv_bias, **lora_kw("k"),
                           **kw)(x_BxTxD)
    v_BxTxKxH = Projection((D,), (K, H), ("embed",), ("kv_heads", "head_dim"),
                           name="v", use_bias=cfg.qkv_bias, **lora_kw("v"),
                           **kw)(x_BxTxD)
    if cfg.rope.dca_chunk_size:
      out_BxTxNxH = self._dual_chunk(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    else:
      q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rope)
      k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, cfg.rope)
      q_BxTxNxH = constrain(q_BxTxNxH, ("batch", "sequence", "heads", "head_dim"))
      k_BxTxKxH = constrain(k_BxTxKxH, ("batch", "sequence", "kv_heads", "head_dim"))
      v_BxTxKxH = constrain(v_BxTxKxH, ("batch", "sequence", "kv_heads", "head_dim"))
      if kv_cache.cache_name(self) is not None:  # inference engine: KV cache
        out_BxTxNxH = kv_cache.cached_attention(
            self, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT,
            self.pattern, cfg)
      else:
        # attend() itself unless the mesh has a sequence axis (lcjax.parallel).
        out_BxTxNxH = context_attention(
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, self.pattern,
            segment_ids=segment_ids_BxT, config=model_cp_config(cfg),
            softcap=cfg.attention.softcap or None,
            implementation=cfg.attention.implementation)
    out_BxTxNxH = constrain(out_BxTxNxH, ("batch", "sequence", "heads", "head_dim"))
    return Projection((N, H), (D,), ("heads", "head_dim"), ("embed",),
                      name="o", **lora_kw("o"), **kw)(out_BxTxNxH)

  def _dual_chunk(self, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
    """Dual Chunk Attention (``rope.dca_chunk_size > 0``) in place of causal
    attention. Positions are token indices: ``positions_BxT`` is not used."""
    cfg = self.cfg
    if not isinstance(self.pattern, Causal):
      raise ValueError(f"rope.dca_chunk_size={cfg.rope.dca_chunk_size} replaces causal "
                       f"attention, but this layer's pattern is {self.pattern!r}; use "
                       "'full' layers with DCA")
    if kv_cache.cache_name(self) is not None:
      raise NotImplementedError(
          "the inference engine's KV cache does not run Dual Chunk Attention yet: "
          "cache keys rotated by lcjax.positions.dca.rotate_keys and decode with "
          "lcjax.positions.dca.dca_decode")
    return dca.dca_attend(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, chunk_size=cfg.rope.dca_chunk_size,
        local_window=cfg.rope.dca_local_window, rope=cfg.rope,
        q_segment_ids=segment_ids_BxT, kv_segment_ids=segment_ids_BxT,
        softcap=cfg.attention.softcap or None,
        implementation=cfg.attention.implementation)
