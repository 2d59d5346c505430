"""The model's entry point to context parallelism.

:func:`context_attention` has the semantics of ``lcjax.attention.attend`` for
self-attention (same pattern, segment ids, softcap) on rows in the layout
order of :func:`active_layout`. When the current mesh has a ``sequence`` axis
of size 1 (or none, or ``strategy="none"``) it *is* ``attend``: a direct call,
no ``shard_map``, no copies. Otherwise it runs a ``shard_map`` that is manual
over ``sequence`` only (batch and heads stay automatically sharded, so head
indices stay global) and dispatches per layer:

* ``ring``: ring attention on the layer's exchange plan;
* sparse layers (``sparse_exchange`` and ``plan.is_sparse``: even the busiest
  device needs only some shards): the plan-driven exchange, which moves only
  the halo and sink a window needs, or the shards holding needed strided
  blocks, whatever the strategy -- unless the strategy's own volume
  (:mod:`lcjax.parallel.comm_volume`) is smaller for this layer;
* ``allgather``, ``ulysses``, ``hybrid``: as named; Ulysses and hybrid fall
  back to the ring for head-dependent patterns (they split heads).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.sharding import PartitionSpec

from lcjax.attention import Pattern, attend
from lcjax.config import ContextParallelConfig, ModelConfig
from lcjax.parallel import comm_volume, local
from lcjax.parallel.allgather import allgather_attention
from lcjax.parallel.layout import LOAD_BALANCE, SequenceLayout, shard_view
from lcjax.parallel.plan import build_plan
from lcjax.parallel.ring import ring_attention
from lcjax.parallel.ulysses import hybrid_attention, ulysses_attention

AXIS = "sequence"
STRATEGIES = ("none", "ring", "allgather", "ulysses", "hybrid")


def validate(cp: ContextParallelConfig) -> None:
  if cp.strategy not in STRATEGIES:
    raise ValueError(f"context_parallel.strategy={cp.strategy!r} is not one of "
                     f"{STRATEGIES}")
  if cp.load_balance not in LOAD_BALANCE:
    raise ValueError(f"context_parallel.load_balance={cp.load_balance!r} is not one "
                     f"of {LOAD_BALANCE}")
  if cp.ulysses_degree < 1:
    raise ValueError(f"context_parallel.ulysses_degree={cp.ulysses_degree} must be "
                     ">= 1")


def sequence_axis_size() -> int:
  """Size of the current mesh's ``sequence`` axis (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return dict(mesh.shape).get(AXIS, 1)


def active_layout(cp: ContextParallelConfig, seq_len: int
                  ) -> SequenceLayout | None:
  """The layout of the rows under context parallelism, or None when attention
  runs as one ordinary call (no ``sequence`` axis, strategy "none", or a length
  the layout cannot split, e.g. odd-length generation buffers)."""
  validate(cp)
  n = sequence_axis_size()
  if n == 1 or cp.strategy == "none":
    return None
  if cp.strategy == "hybrid" and n % cp.ulysses_degree:
    raise ValueError(f"context_parallel.ulysses_degree={cp.ulysses_degree} must "
                     f"divide the mesh's sequence axis size {n}")
  granularity = 2 * n if cp.load_balance == "zigzag" else n
  if seq_len % granularity:
    return None
  return SequenceLayout(cp.load_balance, n, seq_len)


def permuting_layout(cp: ContextParallelConfig, seq_len: int
                     ) -> SequenceLayout | None:
  """:func:`active_layout` if it reorders the sequence, else None."""
  layout = active_layout(cp, seq_len)
  return None if layout is None or layout.is_identity else layout


def model_cp_config(cfg: ModelConfig) -> ContextParallelConfig:
  """The model's context-parallel config; a model with Dual Chunk Attention
  keeps rows in natural order (DCA indexes its chunks by row)."""
  cp = cfg.context_parallel
  if cfg.rope.dca_chunk_size and cp.load_balance != "none":
    return dataclasses.replace(cp, load_balance="none")
  return cp


def model_layout(cfg: ModelConfig, seq_len: int) -> SequenceLayout | None:
  """The permutation a model's rows are in under context parallelism, if any."""
  return permuting_layout(model_cp_config(cfg), seq_len)


def route(cp: ContextParallelConfig, pattern: Pattern, layout: SequenceLayout,
          num_heads: int, shape: comm_volume.Shape | None = None) -> str:
  """Which implementation a layer runs: "ring", "allgather", "ulysses", "hybrid".

  ``shape`` (the layer's sizes) lets a sparse layer keep the strategy when
  that moves fewer bytes than the sparse exchange.
  """
  if cp.strategy == "ring":
    return "ring"
  how = cp.strategy
  if cp.strategy in ("ulysses", "hybrid") and pattern.head_dependent:
    how = "ring"
  elif cp.strategy == "hybrid" and cp.ulysses_degree == 1:
    how = "ring"
  elif cp.strategy == "hybrid" and cp.ulysses_degree == layout.num_shards:
    how = "ulysses"
  if how != "ring" and cp.sparse_exchange and build_plan(
      pattern, shard_view(layout), num_heads).is_sparse:
    if shape is None:
      return "ring"
    volume = lambda s: sum(comm_volume.layer_bytes(
        s, shape, layout.num_shards, pattern, layout.kind, cp.ulysses_degree))
    if volume("ring") <= volume(how):
      return "ring"
  return how


def _local_attention(q, k, v, seg, *, how: str, layout: SequenceLayout,
                     cp: ContextParallelConfig, args: local.AttendArgs):
  if how == "ring":
    view = shard_view(layout)
    plan = build_plan(args.pattern, view, q.shape[2])
    ring_args = local.AttendArgs(view.view_pattern(args.pattern), args.scale,
                                 args.softcap, args.implementation)
    return ring_attention(q, k, v, seg, plan=plan, args=ring_args, axis=AXIS)
  if how == "allgather":
    return allgather_attention(q, k, v, seg, layout=layout, args=args, axis=AXIS)
  if how == "ulysses":
    return ulysses_attention(q, k, v, seg, layout=layout, args=args, axis=AXIS)
  return hybrid_attention(q, k, v, seg, layout=layout,
                          ulysses_degree=cp.ulysses_degree, args=args, axis=AXIS)


def context_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array,
                      v_BxTxKxH: jax.Array, pattern: Pattern, *,
                      segment_ids: jax.Array | None = None,
                      config: ContextParallelConfig = ContextParallelConfig(),
                      scale: float | None = None, softcap: float | None = None,
                      implementation: str = "auto") -> jax.Array:
  """Self-attention over rows in :func:`active_layout` order.

  Same result as ``attend(q, k, v, pattern, q_segment_ids=segment_ids,
  kv_segment_ids=segment_ids, ...)`` on the rows in natural order.
  """
  T = q_BxTxNxH.shape[1]
  layout = active_layout(config, T)
  if layout is None:
    return attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, pattern,
                  q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                  scale=scale, softcap=softcap, implementation=implementation)
  args = local.AttendArgs(pattern, scale, softcap, implementation)
  B, _, N, H = q_BxTxNxH.shape
  shape = comm_volume.Shape(B, T, N, k_BxTxKxH.shape[2], H,
                            q_BxTxNxH.dtype.itemsize, segment_ids is not None)
  how = route(config, pattern, layout, N, shape)
  fn = functools.partial(_local_attention, how=how, layout=layout, cp=config,
                         args=args)
  spec = PartitionSpec(None, AXIS)
  operands: tuple[Any, ...] = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
  if segment_ids is not None:
    operands += (segment_ids,)
  else:
    fn = functools.partial(lambda f, q, k, v: f(q, k, v, None), fn)
  return jax.shard_map(fn, in_specs=(spec,) * len(operands), out_specs=spec,
                       axis_names={AXIS}, check_vma=False)(*operands)
