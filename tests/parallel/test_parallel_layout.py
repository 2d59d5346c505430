"""Layouts, striped views, exchange plans and communication volumes (host-side)."""
from __future__ import annotations

import numpy as np
import pytest

from lcjax.attention import patterns as P
from lcjax.parallel import comm_volume
from lcjax.parallel.layout import SequenceLayout, StripedView, permute_batch, shard_view
from lcjax.parallel.plan import FULL, PARTIAL, SKIP, build_plan, split_sink


@pytest.mark.parametrize("kind", ["none", "zigzag", "striped"])
@pytest.mark.parametrize("n, T", [(4, 32), (3, 36), (8, 64)])
def test_layouts_are_permutations(kind, n, T):
  layout = SequenceLayout(kind, n, T)
  assert sorted(layout.order) == list(range(T))
  x = np.random.default_rng(0).integers(0, 100, (2, T))
  np.testing.assert_array_equal(layout.unpermute(layout.permute(x)), x)
  np.testing.assert_array_equal(layout.permute(np.arange(T)[None])[0], layout.order)


def test_zigzag_and_striped_shards():
  z = SequenceLayout("zigzag", 4, 32)  # chunks of 4
  np.testing.assert_array_equal(z.positions[1], [4, 5, 6, 7, 24, 25, 26, 27])
  s = SequenceLayout("striped", 4, 16)
  np.testing.assert_array_equal(s.positions[3], [3, 7, 11, 15])


@pytest.mark.parametrize("kind, balanced", [("none", False), ("zigzag", True),
                                            ("striped", False)])
def test_causal_work_per_shard(kind, balanced):
  """Zigzag gives every shard the same number of causal pairs exactly; striped
  nearly (shard r has r more pairs), contiguous is far off."""
  n, T = 4, 64
  pos = SequenceLayout(kind, n, T).positions
  work = [(int(q) + 1 for q in p) for p in pos]
  work = np.array([sum(w) for w in work])
  if balanced:
    assert (work == work[0]).all()
  elif kind == "striped":
    assert work.max() - work.min() == (n - 1) * T // n
  else:
    assert work.max() > 3 * work.min()


def test_permute_batch_moves_every_field_together():
  layout = SequenceLayout("zigzag", 2, 8)
  batch = {"tokens": np.arange(16).reshape(2, 8),
           "positions": np.tile(np.arange(8), (2, 1)),
           "segment_ids": None}
  out = permute_batch(batch, layout)
  np.testing.assert_array_equal(out["positions"][0], layout.order)
  np.testing.assert_array_equal(out["tokens"][1], 8 + layout.order)
  assert out["segment_ids"] is None
  with pytest.raises(ValueError, match="last axis must be the sequence of length 8"):
    permute_batch({"tokens": np.zeros((2, 6))}, layout)


def test_bad_layouts_name_the_problem():
  with pytest.raises(ValueError, match="seq_len=30 is not divisible by 8"):
    SequenceLayout("zigzag", 4, 30)
  with pytest.raises(ValueError, match="unknown load balancing 'zag'"):
    SequenceLayout("zag", 4, 32)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_shard_views_cover_the_rows(group):
  """Every virtual shard's runs (after its group reordering) are exactly the
  positions its devices hold; zigzag keeps two runs per group."""
  for kind in ("none", "zigzag"):
    layout = SequenceLayout(kind, 4, 64)
    view = shard_view(layout, group)
    rows = layout.positions.reshape(4 // group, -1)
    for g in range(view.num_shards):
      ordered = rows[g] if view.group_order is None else rows[g][list(view.group_order)]
      expect = np.concatenate([np.arange(s, s + view.run_len) for s in view.starts[g]])
      np.testing.assert_array_equal(ordered, expect)
    assert view.num_runs == (1 if kind == "none" else 2 if group < 4 else 1)


@pytest.mark.parametrize("group", [1, 2])
def test_striped_view_decodes_positions(group):
  layout = SequenceLayout("striped", 4, 32)
  view = shard_view(layout, group)
  base = P.SinkWindow(2, 5)
  vp = view.view_pattern(base)
  assert isinstance(vp, StripedView)
  rows = layout.positions.reshape(4 // group, -1)
  for g in range(view.num_shards):
    ordered = rows[g] if view.group_order is None else rows[g][list(view.group_order)]
    enc = view.starts[g][0] + np.arange(view.run_len)
    np.testing.assert_array_equal(vp.decode(enc), ordered)
  # mask on encoded positions == base mask on absolute positions
  enc = np.arange(32)
  np.testing.assert_array_equal(vp.mask(enc[:, None], enc[None]),
                                base.mask(vp.decode(enc)[:, None],
                                          vp.decode(enc)[None]))


def test_striped_view_block_bounds_are_conservative():
  rng = np.random.default_rng(1)
  for base in [P.SlidingWindow(7), P.Causal(), P.SinkWindow(2, 9)] * 100:
    vp = StripedView(base, 4, 1, 16)
    q0, k0 = rng.integers(0, 64 - 4, 2)  # blocks may cross shard boundaries
    vis = vp.mask(np.arange(q0, q0 + 4)[:, None], np.arange(k0, k0 + 4)[None])
    g = P.BlockGrid(*(np.asarray([[[x]]]) for x in (q0, q0 + 3, k0, k0 + 3)),
                    np.zeros((1, 1, 1), int), 4, 4, q0, k0, 4, 4)
    any_, all_ = vp.block_bounds(g)
    assert bool(np.asarray(any_).all()) or not vis.any()
    assert not bool(np.asarray(all_).all()) or vis.all()


def test_zigzag_causal_plan_is_a_chained_ring_of_mask_free_blocks():
  """Off-diagonal zigzag steps use mask-free half blocks: every pair a device
  computes after the local step is FULL, and each device does the same work."""
  plan = build_plan(P.Causal(), shard_view(SequenceLayout("zigzag", 4, 64)), 1)
  assert plan.is_dense and plan.chained and len(plan.steps) == 4
  for step in plan.steps[1:]:
    assert set(np.unique(step.kinds)) == {SKIP, FULL}
    assert ((step.kinds == FULL).sum(axis=(1, 2)) == 2).all()
  assert set(np.unique(plan.steps[0].kinds)) == {SKIP, PARTIAL, FULL}


def test_contiguous_causal_plan_sends_only_to_later_shards():
  plan = build_plan(P.Causal(), shard_view(SequenceLayout("none", 4, 64)), 1)
  assert not plan.chained
  for step in plan.steps[1:]:
    assert all(dst - src == step.shift for src, dst in step.perm)
  np.testing.assert_array_equal(plan.received, [0, 1, 2, 3])


def test_sink_window_plan_is_halo_plus_sink():
  view = shard_view(SequenceLayout("none", 8, 8 * 64))
  plan = build_plan(P.SinkWindow(4, 50), view, 1)
  assert [s.shift for s in plan.steps] == [0, 1]
  assert plan.sink is not None and plan.sink.num_tokens == 4
  # shards 0 and 1 hold or fetch the sink themselves; the others take it from
  # the broadcast
  np.testing.assert_array_equal(plan.sink.kinds[:, 0] != SKIP, [0, 0] + [1] * 6)
  without = build_plan(P.SinkWindow(4, 50), view, 1, sink_broadcast=False)
  assert without.received.sum() > plan.received.sum()


def test_split_sink():
  assert split_sink(P.SinkWindow(4, 9)) == (4, P.SlidingWindow(9, 0))
  assert split_sink(P.Causal()) is None
  n, rest = split_sink(P.SlidingWindow(3) | (P.Sink(2) & P.Causal()))
  assert n == 2 and rest == P.SlidingWindow(3)


def test_comm_volume_formulas():
  s = comm_volume.Shape(batch=1, seq_len=1024, num_heads=8, num_kv_heads=2,
                        head_dim=16, dtype_bytes=2, segment_ids=False)
  kv_shard = 2 * 128 * 2 * 16 * 2  # one shard of K and V, bf16, P = 8
  f, b = comm_volume.layer_bytes("ring", s, 8)
  assert f == 7 * kv_shard and b == 7 * kv_shard * 3  # again + f32 dK/dV
  f, b = comm_volume.layer_bytes("allgather", s, 8)
  assert f == 7 * kv_shard and b == 14 * kv_shard
  q = 128 * 8 * 16 * 2
  f, b = comm_volume.layer_bytes("ulysses", s, 8)  # K/V heads repeated 4x
  assert f == b == 7 * (2 * q + 4 * kv_shard) // 8
  f, _ = comm_volume.layer_bytes("ring", s, 8, P.SinkWindow(4, 50), "none")
  assert f < 2 * kv_shard  # one halo + the sink
