"""The model's entry point to context parallelism.

:func:`context_attention` has the semantics of ``lcjax.attention.attend`` for
self-attention (same pattern, segment ids, softcap) on rows in the layout
order of :func:`active_layout`. When the current mesh has a ``sequence`` axis
of size 1 (or none, or ``strategy="none"``) it *is* ``attend``: a direct call,
no ``shard_map``, no copies. Otherwise it runs a ``shard_map`` over the
``sequence`` axis (see :func:`manual_specs` for the other mesh axes) and
dispatches per layer:

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
import math
import os
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
from lcjax.sharding import logical_to_spec

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


def avoid_shardy_crash(mesh) -> str | None:
  """Switches jit partitioning from Shardy to GSPMD for GPU meshes whose
  ``sequence`` axis has size > 1, unless ``JAX_USE_SHARDY_PARTITIONER`` is set.

  jax 0.11.2's Shardy pass segfaults compiling the model's context-parallel
  train step on GPUs (4x H100, issue 8: ring, all-gather, unrolled layers, with
  and without remat); with GSPMD the same step compiles and matches the
  data-parallel loss. Returns what it did, for the log, or None.
  """
  if (dict(mesh.shape).get(AXIS, 1) == 1 or jax.default_backend() != "gpu"
      or "JAX_USE_SHARDY_PARTITIONER" in os.environ
      or not jax.config.jax_use_shardy_partitioner):
    return None
  jax.config.update("jax_use_shardy_partitioner", False)
  return ("context parallelism on GPU: partitioning with GSPMD instead of Shardy "
          "(jax 0.11.2's Shardy pass crashes on this program; set "
          "JAX_USE_SHARDY_PARTITIONER=1 to keep it)")


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
  split_degree = {"ulysses": layout.num_shards, "hybrid": config.ulysses_degree}
  manual, spec_BxTxNxH, spec_BxT = manual_specs(
      jax.sharding.get_abstract_mesh(), pattern, q_BxTxNxH.shape,
      k_BxTxKxH.shape[2], split_degree.get(how, 1))
  operands: tuple[Any, ...] = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
  specs = (spec_BxTxNxH,) * 3
  if segment_ids is not None:
    operands += (segment_ids,)
    specs += (spec_BxT,)
  else:
    fn = functools.partial(lambda f, q, k, v: f(q, k, v, None), fn)
  return jax.shard_map(fn, in_specs=specs, out_specs=spec_BxTxNxH,
                       axis_names=manual, check_vma=False)(*operands)


def manual_specs(mesh, pattern: Pattern, q_shape: tuple[int, ...],
                 num_kv_heads: int, head_split: int = 1
                 ) -> tuple[set[str], PartitionSpec, PartitionSpec]:
  """The mesh axes the context-parallel ``shard_map`` is manual over, and the
  specs of ``[B, T, N, H]`` and ``[B, T]`` operands.

  The specs are the activations' own (``logical_to_spec`` of batch, sequence,
  heads), so entering the ``shard_map`` moves no data; the heads axis is
  dropped when it does not divide the K/V heads, leaves no multiple of
  ``head_split`` query heads per device (Ulysses splits them further) or the
  pattern depends on the global head index. Manual: ``sequence``, every axis
  of size 1 and the axes in the specs; only a dropped heads axis stays
  automatic. Fully manual matters on GPUs: XLA's Shardy pass (jax 0.11.2)
  segfaults on Ulysses' cuDNN attention inside a ``shard_map`` manual over
  ``sequence`` only (issue 8; docs/context_parallel.md).
  """
  batch_spec, _, head_spec, _ = logical_to_spec(
      ("batch", "sequence", "heads", None), q_shape, mesh)
  sizes = dict(mesh.shape)
  head_axes = () if head_spec is None else (
      (head_spec,) if isinstance(head_spec, str) else head_spec)
  width = math.prod(sizes[a] for a in head_axes)
  if (pattern.head_dependent or q_shape[2] % (width * head_split)
      or num_kv_heads % width):
    head_spec = None
  manual = {a for a, n in sizes.items() if n == 1} | {AXIS}
  for spec in (batch_spec, head_spec):
    manual |= {spec} if isinstance(spec, str) else set(spec or ())
  return (manual, PartitionSpec(batch_spec, AXIS, head_spec),
          PartitionSpec(batch_spec, AXIS))
