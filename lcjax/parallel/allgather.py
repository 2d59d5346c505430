"""All-gather context parallelism: every device gathers all keys and values.

Each device all-gathers the stacked K/V (and key segment ids) of the
``sequence`` axis once and attends its own queries to them; the backward pass
reduce-scatters dK/dV (the transpose of the all-gather). With grouped-query
attention K/V are ``num_heads / num_kv_heads`` times smaller than the queries,
which makes this the cheapest dense strategy for GQA models at moderate
lengths (MaxText's default). The gathered K/V are recomputed in the backward
pass (``jax.checkpoint``), so they are never stored.

Gathered rows arrive in layout order. Contiguous-run layouts (none, zigzag)
put them back in natural order (a static local permutation) and attend each
local query run with its absolute offset, so the pattern stays a standard one
(cuDNN-capable); striped layouts attend through
:class:`~lcjax.parallel.layout.StripedView`, whose encoded positions make the
gathered rows one contiguous range.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.attention import attend
from lcjax.parallel import local
from lcjax.parallel.layout import SequenceLayout, shard_view


def allgather_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        segment_ids: jax.Array | None, *, layout: SequenceLayout,
                        args: local.AttendArgs, axis: str = "sequence"
                        ) -> jax.Array:
  """Attention of the local rows ``q [B, L, N, H]`` (inside ``shard_map``)."""
  view = shard_view(layout)

  def body(q, k, v, seg):
    r = jax.lax.axis_index(axis)
    kv = jax.lax.all_gather(jnp.stack([k, v]), axis, axis=2, tiled=True)
    seg_all = None if seg is None else jax.lax.all_gather(seg, axis, axis=1,
                                                          tiled=True)
    call = lambda q, q_seg, pattern, q_offset: attend(
        q, kv[0], kv[1], pattern, q_segment_ids=q_seg, kv_segment_ids=seg_all,
        q_offset=q_offset, kv_offset=0, scale=args.scale, softcap=args.softcap,
        implementation=args.implementation)
    if view.striped is not None:
      return call(q, seg, view.view_pattern(args.pattern), r * layout.shard_len)
    kv = layout.unpermute(kv, axis=2)
    seg_all = None if seg_all is None else layout.unpermute(seg_all, axis=1)
    starts = jnp.asarray(view.starts_array)[r]
    outs = [call(q_a, seg_a, args.pattern, starts[a])
            for a, (q_a, seg_a) in enumerate(zip(local.split_runs(q, view.num_runs),
                                                 local.split_runs(seg, view.num_runs)))]
    return local.concat_runs(outs)

  return jax.checkpoint(body)(q, k, v, segment_ids)
