"""Pattern masks against hand-written numpy masks, and pattern algebra."""
from __future__ import annotations

import numpy as np
import pytest

from lcjax.attention import patterns as P

T, S = 37, 45


def _grid(q_offset=0, k_offset=0):
  q = q_offset + np.arange(T)[:, None]
  k = k_offset + np.arange(S)[None, :]
  return q, k


def _by_loops(fn, num_heads=1, q_offset=0, k_offset=0):
  """The mask written as plain Python loops (independent of the vectorised code)."""
  out = np.zeros((num_heads, T, S), bool)
  for h in range(num_heads):
    for i in range(T):
      for j in range(S):
        out[h, i, j] = fn(h, q_offset + i, k_offset + j)
  return out


CASES = [
    (P.Full(), lambda h, q, k: True),
    (P.Causal(), lambda h, q, k: k <= q),
    (P.SlidingWindow(5), lambda h, q, k: q - 5 <= k <= q),
    (P.SlidingWindow(3, 2), lambda h, q, k: q - 3 <= k <= q + 2),
    (P.SlidingWindow(None, 4), lambda h, q, k: k <= q + 4),
    (P.Sink(4), lambda h, q, k: k < 4),
    (P.SinkWindow(sink=3, window=6),
     lambda h, q, k: k <= q and (q - k <= 6 or k < 3)),
    (P.TriShape(sink=2, window=4, dense_from=30),
     lambda h, q, k: k <= q and (q - k <= 4 or k < 2 or q >= 30)),
    (P.QueryRange(10, 20), lambda h, q, k: 10 <= q < 20),
    (P.StridedBlockSparse(block_size=4, stride=3, local_blocks=2),
     lambda h, q, k: k <= q and (q // 4 - k // 4 < 2 or (k // 4) % 3 == h % 3)),
    (P.StridedBlockSparse(block_size=4, stride=3, head_offsets=False,
                          dense_heads=(2,)),
     lambda h, q, k: k <= q and (q // 4 == k // 4 or (k // 4) % 3 == 0 or h == 2)),
    (P.ShiftedGroups(group_size=8, num_heads=4),
     lambda h, q, k: (q // 8 == k // 8) if h < 2 else
     ((q + 4) // 8 == (k + 4) // 8)),
    (P.CausalShiftedGroups(group_size=8, num_heads=4),
     lambda h, q, k: k <= q and ((q // 8 == k // 8) if h < 2 else
                                 ((q + 4) // 8 == (k + 4) // 8))),
    (P.Causal() | P.DocumentAnchor(2), lambda h, q, k: k <= q),
    (P.SlidingWindow(3) & P.Sink(20), lambda h, q, k: q - 3 <= k <= q and k < 20),
    (P.PerHead((P.Causal(), P.Full(), P.SlidingWindow(2, 2), P.Sink(3))),
     lambda h, q, k: [k <= q, True, abs(q - k) <= 2, k < 3][h]),
]


@pytest.mark.parametrize("pattern,fn", CASES, ids=lambda x: type(x).__name__)
@pytest.mark.parametrize("offsets", [(0, 0), (11, 3)])
def test_dense_mask_matches_loops(pattern, fn, offsets):
  got = pattern.dense_mask(T, S, *offsets, num_heads=4)
  want = _by_loops(fn, 4, *offsets)
  np.testing.assert_array_equal(got, want)


def test_mask_works_on_jnp_and_scalar_heads():
  import jax.numpy as jnp
  q, k = _grid(5, 0)
  for pattern, _ in CASES:
    for head in range(4):
      want = np.broadcast_to(pattern.mask(q, k, np.int64(head)), (T, S))
      got = np.broadcast_to(np.asarray(pattern.mask(jnp.asarray(q),
                                                    jnp.asarray(k),
                                                    jnp.int32(head))), (T, S))
      np.testing.assert_array_equal(got, want, err_msg=repr(pattern))


def test_block_mask_pattern():
  rng = np.random.default_rng()
  blocks = rng.random((3, 5, 6)) > 0.5
  pattern = P.BlockMask.from_array(blocks, 8, 8)
  dense = pattern.dense_mask(40, 48, num_heads=3)
  want = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)
  np.testing.assert_array_equal(dense, want)
  assert hash(pattern) == hash(P.BlockMask.from_array(blocks, 8, 8))
  assert not pattern.in_kernel_mask and pattern.required_num_heads == 3


def test_composition_flattens_and_hashes():
  a, b, c = P.Causal(), P.Sink(4), P.SlidingWindow(8)
  u = a | b | c
  assert isinstance(u, P.Union) and len(u.parts) == 3
  assert u == P.Union((a, b, c)) and hash(u) == hash(P.Union((a, b, c)))
  i = a & b & c
  assert isinstance(i, P.Intersection) and len(i.parts) == 3
  assert {P.Causal(): 1}[P.Causal()] == 1  # usable as a static jit argument


def test_segment_exemption_only_for_anchor():
  q, k = _grid()
  assert not P.Causal().has_segment_exemptions
  anchor = P.Causal() | P.DocumentAnchor()
  assert anchor.has_segment_exemptions
  ex = np.broadcast_to(anchor.segment_exempt(q, k), (T, S))
  np.testing.assert_array_equal(ex, (k == 0) & (k <= q) | np.zeros((T, S), bool))


def test_head_dependence_flags():
  assert not P.SinkWindow(4, 8).head_dependent
  assert P.StridedBlockSparse().head_dependent
  assert not P.StridedBlockSparse(head_offsets=False).head_dependent
  assert P.PerHead((P.Causal(), P.Full())).required_num_heads == 2
  assert (P.Causal() & P.ShiftedGroups(8, 4)).required_num_heads == 4


@pytest.mark.parametrize("bad", [
    lambda: P.SlidingWindow(-1),
    lambda: P.SlidingWindow(2.5),
    lambda: P.Sink(-3),
    lambda: P.ShiftedGroups(7, 4),
    lambda: P.StridedBlockSparse(block_size=0),
    lambda: P.PerHead(()),
    lambda: P.PerHead((P.Causal(), P.ShiftedGroups(8, 4))),
    lambda: P.BlockMask.from_array(np.ones(3, bool), 8, 8),
    lambda: P.Causal() | "causal",
])
def test_bad_arguments_raise(bad):
  with pytest.raises((ValueError, TypeError)):
    bad()


def test_pattern_density():
  assert P.pattern_density(P.Full(), 64, 64) == 1.0
  assert P.pattern_density(P.Causal(), 64, 64) == pytest.approx(65 / 128)
