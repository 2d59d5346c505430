"""Ulysses (DeepSpeed-Ulysses, Jacobs et al., 2023) and the hybrid with ring
attention (USP, Fang & Zhao, 2024).

Ulysses: an all-to-all turns sequence-sharded q/k/v ``[B, L, N, H]`` into
head-sharded ``[B, P L, N / P, H]``; each device runs ordinary attention over
the whole sequence for its heads; a second all-to-all brings the output back.
Per device it moves ``(2 N + 2 K) / P`` head-rows per token, independent of the
pattern, and needs ``num_heads`` divisible by ``P`` (K/V heads are repeated
when ``num_kv_heads`` is not).

Hybrid: the ``sequence`` axis is split into groups of ``ulysses_degree``
consecutive devices (the fastest links); Ulysses runs inside each group and
ring attention runs between the groups, on virtual shards that hold the
group's rows (see :func:`lcjax.parallel.layout.shard_view`).

Both give every device a subset of the *heads*, so head-dependent patterns
(``pattern.head_dependent``) are routed to the ring by
:mod:`lcjax.parallel.context`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import attend
from lcjax.parallel import local
from lcjax.parallel.layout import SequenceLayout, shard_view
from lcjax.parallel.plan import build_plan
from lcjax.parallel.ring import ring_attention


def kv_head_repeats(num_heads: int, num_kv_heads: int, degree: int) -> int:
  """How often each K/V head is repeated so heads split over ``degree`` devices."""
  if num_heads % degree:
    raise ValueError(f"Ulysses splits the heads over {degree} devices, but "
                     f"num_heads={num_heads} is not divisible by {degree}; use a "
                     "head count divisible by the Ulysses degree, or the ring / "
                     "allgather strategy")
  if num_kv_heads % degree == 0:
    return 1
  repeats = degree // math.gcd(num_kv_heads, degree)
  if (num_heads // num_kv_heads) % repeats:
    raise ValueError(f"Ulysses over {degree} devices cannot split num_kv_heads="
                     f"{num_kv_heads} for num_heads={num_heads}")
  return repeats


def _to_heads(x, axis, groups, head_axis, seq_axis):
  return jax.lax.all_to_all(x, axis, head_axis, seq_axis, tiled=True,
                            axis_index_groups=groups)


def _gather_seg(seg, axis, groups):
  if seg is None:
    return None
  return jax.lax.all_gather(seg, axis, axis=1, tiled=True, axis_index_groups=groups)


def _scatter(q, k, v, seg, axis, degree, groups):
  """Sequence-sharded q/k/v -> head-sharded over ``degree`` devices."""
  repeats = kv_head_repeats(q.shape[2], k.shape[2], degree)
  kv = jnp.stack([k, v])
  if repeats > 1:
    kv = jnp.repeat(kv, repeats, axis=3)
  q = _to_heads(q, axis, groups, 2, 1)
  kv = _to_heads(kv, axis, groups, 3, 2)
  return q, kv, _gather_seg(seg, axis, groups)


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      segment_ids: jax.Array | None, *, layout: SequenceLayout,
                      args: local.AttendArgs, axis: str = "sequence") -> jax.Array:
  """Attention of the local rows ``q [B, L, N, H]`` (inside ``shard_map``)."""
  q, kv, seg = _scatter(q, k, v, segment_ids, axis, layout.num_shards, None)
  q, kv = layout.unpermute(q, axis=1), layout.unpermute(kv, axis=2)
  seg = None if seg is None else layout.unpermute(seg, axis=1)
  out = attend(q, kv[0], kv[1], args.pattern, q_segment_ids=seg,
               kv_segment_ids=seg, scale=args.scale, softcap=args.softcap,
               implementation=args.implementation)
  out = layout.permute(out, axis=1)
  return _to_heads(out, axis, None, 1, 2)


def _reorder(x, order, axis):
  if order is None:
    return x
  return jnp.take(x, jnp.asarray(order, jnp.int32), axis=axis)


def hybrid_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segment_ids: jax.Array | None, *, layout: SequenceLayout,
                     ulysses_degree: int, args: local.AttendArgs,
                     axis: str = "sequence") -> jax.Array:
  """Ulysses inside groups of ``ulysses_degree`` devices, ring across groups."""
  U = ulysses_degree
  view = shard_view(layout, U)
  groups = [[g * U + u for u in range(U)] for g in range(layout.num_shards // U)]
  q, kv, seg = _scatter(q, k, v, segment_ids, axis, U, groups)
  order = view.group_order
  inverse = None if order is None else np.argsort(order)
  q, kv = _reorder(q, order, 1), _reorder(kv, order, 2)
  seg = None if seg is None else _reorder(seg, order, 1)
  plan = build_plan(args.pattern, view, q.shape[2], sink_broadcast=False)
  ring_args = local.AttendArgs(view.view_pattern(args.pattern), args.scale,
                               args.softcap, args.implementation)
  out = ring_attention(q, kv[0], kv[1], seg, plan=plan, args=ring_args, axis=axis)
  out = _reorder(out, inverse, 1)
  return _to_heads(out, axis, groups, 1, 2)
