"""Where each Hugging Face tensor lives in lcjax's params, and how it is laid out.

An HF ``nn.Linear`` weight is ``[out_features, in_features]``; our einsum
kernels are ``in_shape + out_shape`` with heads split out, e.g. ``q_proj.weight``
``[heads * head_dim, embed]`` is our ``attn/q/kernel`` ``[embed, heads, head_dim]``.
A :class:`TensorRule` says this as "split the HF axes into these dims, then
permute", which is all the loader needs to read any *slice* of our array
straight from the file, and all the exporter needs to go back.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from lcjax.config import ModelConfig

LAYER_PREFIX = "model.layers.{i}."


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """``ours = hf.reshape(flatten(split)).transpose(perm)``.

  ``split[a]`` are the dims HF axis ``a`` is made of (outermost first); ``perm``
  orders the flattened split dims into our axes. ``hf_name`` contains ``{i}``
  for per-layer tensors, whose params are stacked on a leading layers axis.
  """
  hf_name: str
  path: tuple[str, ...]
  split: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(dims) for dims in self.split)

  @property
  def shape(self) -> tuple[int, ...]:
    """Our shape for one layer."""
    flat = [d for dims in self.split for d in dims]
    return tuple(flat[p] for p in self.perm)

  def to_ours(self, hf: np.ndarray) -> np.ndarray:
    flat = [d for dims in self.split for d in dims]
    return hf.reshape(flat).transpose(self.perm)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ours.transpose(np.argsort(self.perm)).reshape(self.hf_shape))

  def read_slice(self, get_slice, index: Sequence[slice]) -> np.ndarray:
    """Our array's ``[index]`` (one layer), reading only the rows it needs.

    ``get_slice(tuple_of_slices)`` reads a box of the HF tensor (e.g.
    ``safe_open(...).get_slice(name).__getitem__``). Each HF axis is read over
    the range of its outermost split dim; the inner dims are selected after.
    """
    flat = [d for dims in self.split for d in dims]
    ours_to_flat = {p: j for j, p in enumerate(self.perm)}
    flat_index = [index[ours_to_flat[k]] for k in range(len(flat))]
    boxes, inner, k = [], [], 0
    for dims in self.split:
      start, stop, _ = flat_index[k].indices(dims[0])
      rest = math.prod(dims[1:])
      boxes.append(slice(start * rest, stop * rest))
      inner.append((stop - start,) + dims[1:])
      k += len(dims)
    box = np.asarray(get_slice(tuple(boxes)))
    box = box.reshape([d for dims in inner for d in dims])
    local = []
    k = 0
    for dims in self.split:
      local.append(slice(None))  # outer dim already cut
      local.extend(flat_index[k + 1:k + len(dims)])
      k += len(dims)
    return box[tuple(local)].transpose(self.perm)


def tensor_rules(cfg: ModelConfig) -> list[TensorRule]:
  """The rules of every tensor of a Llama/Qwen2/Mistral checkpoint for ``cfg``."""
  D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  F, V = cfg.mlp_dim, cfg.vocab_size
  L = LAYER_PREFIX
  rules = [
      TensorRule("model.embed_tokens.weight", ("embed",), ((V,), (D,)), (0, 1)),
      TensorRule("model.norm.weight", ("final_norm", "scale"), ((D,),), (0,)),
      TensorRule(L + "input_layernorm.weight", ("attn_norm", "scale"), ((D,),), (0,)),
      TensorRule(L + "post_attention_layernorm.weight", ("mlp_norm", "scale"),
                 ((D,),), (0,)),
      TensorRule(L + "self_attn.q_proj.weight", ("attn", "q", "kernel"),
                 ((N, H), (D,)), (2, 0, 1)),
      TensorRule(L + "self_attn.k_proj.weight", ("attn", "k", "kernel"),
                 ((K, H), (D,)), (2, 0, 1)),
      TensorRule(L + "self_attn.v_proj.weight", ("attn", "v", "kernel"),
                 ((K, H), (D,)), (2, 0, 1)),
      TensorRule(L + "self_attn.o_proj.weight", ("attn", "o", "kernel"),
                 ((D,), (N, H)), (1, 2, 0)),
      TensorRule(L + "mlp.gate_proj.weight", ("mlp", "gate", "kernel"),
                 ((F,), (D,)), (1, 0)),
      TensorRule(L + "mlp.up_proj.weight", ("mlp", "up", "kernel"), ((F,), (D,)), (1, 0)),
      TensorRule(L + "mlp.down_proj.weight", ("mlp", "down", "kernel"),
                 ((D,), (F,)), (1, 0)),
  ]
  if cfg.qkv_bias:
    for name, heads in (("q", N), ("k", K), ("v", K)):
      rules.append(TensorRule(L + f"self_attn.{name}_proj.bias",
                              ("attn", name, "bias"), ((heads, H),), (0, 1)))
  if not cfg.tie_embeddings:
    rules.append(TensorRule("lm_head.weight", ("lm_head",), ((V,), (D,)), (1, 0)))
  return rules


def is_ignorable(hf_name: str) -> bool:
  """Checkpoint tensors that carry no parameters (old RoPE buffers)."""
  return hf_name.endswith("rotary_emb.inv_freq")
