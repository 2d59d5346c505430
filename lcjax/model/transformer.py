"""Llama-style decoder whose layers are scanned in groups of identical kinds.

Parameters: ``{"embed": [vocab, embed], "group_0": {...stacked over its
layers...}, "group_1": ..., "final_norm", ["lm_head"]}``. Because every layer has
the same parameters whatever its attention kind, a schedule can be changed
after training (see :func:`regroup_params`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import Pattern
from lcjax.config import ModelConfig
from lcjax.model import schedule
from lcjax.model.attention_layer import SelfAttention
from lcjax.model.dtypes import dtype_of
from lcjax.model.layers import RMSNorm, SwiGLU, param_with_axes
from lcjax.model.remat import checkpoint_policy
from lcjax.parallel.context import model_layout
from lcjax.sharding import constrain


class DecoderLayer(nn.Module):
  """Pre-norm residual block: ``x + attn(norm(x))``, then ``+ mlp(norm(.))``."""
  cfg: ModelConfig
  pattern: Pattern

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    cfg = self.cfg
    kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    h = RMSNorm(cfg.norm_eps, name="attn_norm", **kw)(x_BxTxD)
    x_BxTxD = x_BxTxD + SelfAttention(cfg, self.pattern, name="attn")(
        h, positions_BxT, segment_ids_BxT)
    h = RMSNorm(cfg.norm_eps, name="mlp_norm", **kw)(x_BxTxD)
    x_BxTxD = x_BxTxD + SwiGLU(cfg.embed_dim, cfg.mlp_dim, name="mlp", **kw)(h)
    return constrain(x_BxTxD, ("batch", "sequence", "embed")), None


class Decoder(nn.Module):
  """Token ids -> next-token logits. ``positions`` default to ``0..T-1``."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pdtype = dtype_of(cfg.param_dtype)
    self.embedding = param_with_axes(self, "embed", nn.initializers.normal(0.02),
                                     (cfg.vocab_size, cfg.embed_dim),
                                     ("vocab", "embed"), pdtype)
    policy = checkpoint_policy(cfg.remat)
    groups = []
    for i, (kind, count) in enumerate(schedule.layer_groups(cfg)):
      layer_cls = DecoderLayer
      if cfg.remat != "none":
        layer_cls = nn.remat(DecoderLayer, policy=policy, prevent_cse=False)
      scanned = nn.scan(layer_cls, variable_axes={"params": 0},
                        split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=count,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      groups.append(scanned(cfg, schedule.pattern_for(kind, cfg.attention),
                            name=f"group_{i}"))
    self.groups = groups
    self.final_norm = RMSNorm(cfg.norm_eps, dtype=dtype_of(cfg.dtype),
                              param_dtype=pdtype)
    if not cfg.tie_embeddings:
      self.lm_head = param_with_axes(self, "lm_head", nn.initializers.normal(0.02),
                                     (cfg.embed_dim, cfg.vocab_size),
                                     ("embed", "vocab"), pdtype)

  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    return self.logits(self.hidden(tokens_BxT, positions_BxT, segment_ids_BxT))

  def hidden(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None,
             layout_order: bool = False):
    """Final normalised hidden states ``[B, T, embed]``.

    Under context parallelism with load balancing the layers work on rows in
    a permuted order (``lcjax.parallel.context.model_layout``): inputs in
    natural order are permuted here and the output is put back. With
    ``layout_order=True`` the inputs are already permuted and the output stays
    so (the training loss, which is permutation invariant).
    """
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    layout = None if layout_order else model_layout(self.cfg, T)
    if layout is not None:
      tokens_BxT = layout.permute(tokens_BxT)
      positions_BxT = layout.permute(positions_BxT)
      if segment_ids_BxT is not None:
        segment_ids_BxT = layout.permute(segment_ids_BxT)
    x_BxTxD = self.embed(tokens_BxT)
    for group in self.groups:
      x_BxTxD, _ = group(x_BxTxD, positions_BxT, segment_ids_BxT)
    h_BxTxD = self.final_norm(x_BxTxD)
    return h_BxTxD if layout is None else layout.unpermute(h_BxTxD)

  def embed(self, tokens_BxT):
    """Token embeddings ``[B, T, embed]`` in the compute dtype (also used by
    the inference engine, which runs the layers one by one)."""
    x_BxTxD = jnp.take(self.embedding, tokens_BxT, axis=0).astype(
        dtype_of(self.cfg.dtype))
    return constrain(x_BxTxD, ("batch", "sequence", "embed"))

  def logits(self, h_BxTxD):
    """Vocabulary logits in float32 for (a chunk of) hidden states."""
    w_DxV = self.embedding.T if self.cfg.tie_embeddings else self.lm_head
    logits = jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV.astype(h_BxTxD.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "sequence", "vocab"))


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
