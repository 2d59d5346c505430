"""Block metadata against the dense mask: skipped blocks are all-False, full all-True."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import block_mask as bm
from lcjax.attention import patterns as P

H = 4
PATTERNS = [
    P.Full(), P.Causal(), P.SlidingWindow(7), P.SlidingWindow(5, 3),
    P.Sink(4) & P.Causal(), P.SinkWindow(sink=3, window=9),
    P.TriShape(sink=2, window=6, dense_from=40),
    P.StridedBlockSparse(block_size=8, stride=3),
    P.StridedBlockSparse(block_size=4, stride=4, local_blocks=2, dense_heads=(1,)),
    P.CausalShiftedGroups(group_size=12, num_heads=H),
    P.Causal() | P.DocumentAnchor(),
    P.PerHead((P.Causal(), P.SinkWindow(2, 5), P.Full(), P.SlidingWindow(3, 3))),
    P.BlockMask.from_array(np.random.default_rng(0).random((H, 5, 9)) > 0.5, 12, 9)
    & P.Causal(),
]
SHAPES = [  # q_len, kv_len, block_q, block_k, q_offset, kv_offset
    (53, 61, 16, 8, 0, 0), (40, 40, 8, 16, 5, 0), (33, 70, 16, 32, 37, 2),
]


def _expected_kind(pattern, T, S, bq, bk, qo, ko, seg_q=None, seg_k=None):
  dense = pattern.dense_mask(T, S, qo, ko, H)[None]  # [1, H, T, S]
  if seg_q is not None:
    q_pos = qo + np.arange(T)[:, None]
    k_pos = ko + np.arange(S)[None, :]
    exempt = np.broadcast_to(pattern.segment_exempt(
        q_pos[None], k_pos[None], np.arange(H)[:, None, None]), (H, T, S))
    same = seg_q[:, None, :, None] == seg_k[:, None, None, :]
    dense = dense & (same | exempt[None])
  nq, nk = -(-T // bq), -(-S // bk)
  padded = np.zeros(dense.shape[:2] + (nq * bq, nk * bk), bool)
  padded[..., :T, :S] = dense
  blocks = padded.reshape(dense.shape[:2] + (nq, bq, nk, bk))
  valid = np.zeros((nq * bq, nk * bk), bool)
  valid[:T, :S] = True
  whole = valid.reshape(nq, bq, nk, bk).all(axis=(1, 3))
  return np.where(blocks.all(axis=(3, 5)) & whole, bm.FULL,
                  np.where(blocks.any(axis=(3, 5)), bm.PARTIAL, bm.SKIP))


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: type(p).__name__)
def test_host_classification_is_exact(pattern):
  for T, S, bq, bk, qo, ko in SHAPES:
    kind = bm.classify_blocks(pattern, T, S, bq, bk, qo, ko, H)
    want = _expected_kind(pattern, T, S, bq, bk, qo, ko)[0]
    np.testing.assert_array_equal(np.broadcast_to(kind, want.shape), want)
    if not pattern.head_dependent:
      assert kind.shape[0] == 1


@pytest.mark.parametrize("pattern", PATTERNS[:-1], ids=lambda p: type(p).__name__)
def test_device_path_is_conservative_with_traced_offsets(pattern):
  T, S, bq, bk, qo, ko = SHAPES[2]
  kind = jax.jit(lambda a, b: bm.classify_blocks_device(
      pattern, T, S, bq, bk, a, b, H))(jnp.int32(qo), jnp.int32(ko))
  kind = np.broadcast_to(np.asarray(kind)[0], (H, -(-T // bq), -(-S // bk)))
  want = _expected_kind(pattern, T, S, bq, bk, qo, ko)[0]
  # Never skips a visible block, never calls a partial block full.
  assert not ((kind == bm.SKIP) & (want != bm.SKIP)).any()
  assert not ((kind == bm.FULL) & (want != bm.FULL)).any()
  if isinstance(pattern, (P.Causal, P.SlidingWindow, P.TilePattern)):
    np.testing.assert_array_equal(kind, want)  # exact for primitives


@pytest.mark.parametrize("pattern", [P.Causal(), P.SinkWindow(3, 9),
                                     P.Causal() | P.DocumentAnchor(),
                                     P.StridedBlockSparse(8, 3)],
                         ids=lambda p: type(p).__name__)
def test_device_path_with_segments(pattern):
  rng = np.random.default_rng()
  T, S, bq, bk, qo, ko = 70, 70, 8, 16, 0, 0
  seg = np.sort(rng.integers(0, 5, (2, T)), axis=1).astype(np.int32)
  kind = np.asarray(bm.classify_blocks_device(pattern, T, S, bq, bk, qo, ko, H,
                                              jnp.asarray(seg), jnp.asarray(seg)))
  kind = np.broadcast_to(kind, (2, H) + kind.shape[2:])
  want = _expected_kind(pattern, T, S, bq, bk, qo, ko, seg, seg)
  assert not ((kind == bm.SKIP) & (want != bm.SKIP)).any()
  assert not ((kind == bm.FULL) & (want != bm.FULL)).any()
  # Segment ranges actually prune: sorted ids leave far-apart blocks unvisited.
  if isinstance(pattern, P.Causal):
    assert (kind == bm.SKIP).sum() > (np.asarray(bm.classify_blocks(
        pattern, T, S, bq, bk)) == bm.SKIP).sum() * 2


def test_metadata_lists_match_kinds():
  pattern = P.PerHead((P.Causal(), P.SinkWindow(2, 5), P.Full(), P.Sink(3)))
  T, S, bq, bk = 45, 77, 8, 16
  meta = bm.block_metadata(pattern, T, S, bq, bk, 0, 0, H)
  kind = bm.classify_blocks(pattern, T, S, bq, bk, 0, 0, H)
  assert meta.kv_blocks.shape[:3] == (1, H, kind.shape[1])
  for h in range(H):
    for i in range(kind.shape[1]):
      n = meta.kv_counts[0, h, i]
      visited = meta.kv_blocks[0, h, i, :n]
      np.testing.assert_array_equal(visited, np.nonzero(kind[h, i])[0])
      np.testing.assert_array_equal(meta.kv_full[0, h, i, :n],
                                    kind[h, i, visited] == bm.FULL)
      assert not meta.kv_full[0, h, i, n:].any()
      pad = meta.kv_blocks[0, h, i, n:]
      assert (pad == (visited[-1] if n else 0)).all()
    for j in range(kind.shape[2]):
      n = meta.q_counts[0, h, j]
      np.testing.assert_array_equal(meta.q_blocks[0, h, j, :n],
                                    np.nonzero(kind[h, :, j])[0])
  assert meta.kv_blocks.shape[-1] == max(1, meta.kv_counts.max())


def test_device_metadata_equals_host_without_segments():
  pattern = P.SinkWindow(3, 9)
  host = bm.block_metadata(pattern, 53, 61, 16, 8)
  dev = bm.block_metadata_device(pattern, 53, 61, 16, 8)
  for a, b in zip(host, dev):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_host_metadata_is_cached_and_read_only():
  a = bm.block_metadata(P.Causal(), 64, 64, 16, 16)
  assert bm.block_metadata(P.Causal(), 64, 64, 16, 16) is a
  with pytest.raises(ValueError):
    a.kv_blocks[0, 0, 0, 0] = 3


def test_visible_count_is_exact():
  for pattern in PATTERNS:
    want = int(pattern.dense_mask(70, 90, 3, 1, H).sum())
    assert bm.visible_count(pattern, 70, 90, H, 3, 1, block=16) == want


def test_bad_arguments():
  with pytest.raises(ValueError, match="block_q"):
    bm.block_metadata(P.Causal(), 64, 64, 0, 16)
  with pytest.raises(ValueError, match="num_heads"):
    bm.block_metadata(P.PerHead((P.Causal(), P.Full())), 64, 64, 16, 16,
                      num_heads=3)
  with pytest.raises(TypeError, match="static"):
    jax.jit(lambda o: bm.block_metadata(P.Causal(), 64, 64, 16, 16, o))(1)
