from __future__ import annotations

import numpy as np
import pytest

from lcjax.data.packing import Batch, frame, pack_documents, rows_from_windows

BOS, EOS, PAD = 1, 2, 0


def random_docs(rng, n, max_len):
  return [frame(rng.integers(3, 259, size=int(rng.integers(0, max_len))), BOS, EOS)
          for _ in range(n)]


def check_common(batch: Batch, seq_len: int):
  for field in batch:
    assert field.shape == batch.tokens.shape and field.shape[1] == seq_len
  assert batch.tokens.dtype == batch.targets.dtype == np.int32
  assert batch.segment_ids.dtype == batch.positions.dtype == np.int32
  assert batch.loss_mask.dtype == np.float32
  pad = batch.segment_ids == 0
  # Padding only at the end of a row, and inert.
  assert np.all(np.diff(pad.astype(int), axis=1) >= 0)
  assert np.all(batch.tokens[pad] == PAD) and np.all(batch.positions[pad] == 0)
  assert np.all(batch.loss_mask[pad] == 0) and np.all(batch.targets[pad] == PAD)
  assert np.all(batch.targets[batch.loss_mask == 0] == PAD)


def pieces_of(batch: Batch):
  """(row, segment) -> dict of that segment's arrays, in row-major order."""
  out = []
  for r in range(batch.tokens.shape[0]):
    seg = batch.segment_ids[r]
    n = seg.max()
    assert sorted(set(seg[seg > 0].tolist())) == list(range(1, n + 1))
    for s in range(1, n + 1):
      idx = np.nonzero(seg == s)[0]
      assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
      out.append({"row": r, "idx": idx, **{k: getattr(batch, k)[r, idx]
                                           for k in Batch._fields}})
  return out


@pytest.mark.parametrize("seed,seq_len,max_len", [(0, 16, 40), (1, 33, 20), (2, 7, 30),
                                                  (3, 64, 200)])
def test_pack_documents_against_per_document_construction(seed, seq_len, max_len):
  rng = np.random.default_rng(seed)
  docs = random_docs(rng, 25, max_len)
  batch = pack_documents(docs, seq_len, PAD)
  check_common(batch, seq_len)
  pieces = pieces_of(batch)
  # Walk the pieces: they must be the documents, in order, each cut into
  # consecutive pieces, every piece built exactly as from its document alone.
  d, offset = 0, 0
  prev_row_end = None
  for p in pieces:
    doc = docs[d]
    n = p["tokens"].size
    assert np.array_equal(p["tokens"], doc[offset:offset + n])
    assert np.array_equal(p["positions"], np.arange(n))
    assert (p["tokens"][0] == BOS) == (offset == 0)
    expected_targets = np.full(n, PAD)
    nxt = doc[offset + 1:offset + n + 1]
    expected_targets[:nxt.size] = nxt
    assert np.array_equal(p["targets"], expected_targets)
    assert np.array_equal(p["loss_mask"], (np.arange(n) + offset + 1 < doc.size).astype(float))
    if offset > 0:  # A continuation piece starts a row.
      assert p["idx"][0] == 0
    if doc.size <= seq_len:  # Short documents are never split.
      assert n == doc.size
    if p["idx"][0] == 0 and p["row"] > 0 and offset == 0:
      # Started a fresh row: it must not have fit in the previous one's space.
      assert doc.size > seq_len - prev_row_end
    prev_row_end = p["idx"][-1] + 1
    offset += n
    if offset == doc.size:
      d, offset = d + 1, 0
  assert d == len(docs), "every document is packed completely"


def test_pack_documents_num_rows_and_errors():
  rng = np.random.default_rng(5)
  docs = random_docs(rng, 40, 30)
  full = pack_documents(docs, 16, PAD)
  part = pack_documents(docs, 16, PAD, num_rows=3)
  assert part.shape == (3, 16)
  for a, b in zip(part, full):
    assert np.array_equal(a, b[:3])
  with pytest.raises(ValueError, match="seq_len"):
    pack_documents(docs, 0, PAD)
  with pytest.raises(ValueError, match="non-empty"):
    pack_documents([np.array([], np.int32)], 8, PAD)


@pytest.mark.parametrize("seed,seq_len", [(0, 8), (1, 31), (2, 100)])
def test_rows_from_windows_against_direct_construction(seed, seq_len):
  rng = np.random.default_rng(seed)
  docs = random_docs(rng, 30, 50)
  stream = np.concatenate(docs)
  offsets = np.concatenate([[0], np.cumsum([d.size for d in docs])])
  doc_of = np.searchsorted(offsets, np.arange(stream.size), side="right") - 1
  starts = rng.integers(0, stream.size - seq_len, size=12)
  windows = np.stack([stream[s:s + seq_len + 1] for s in starts])
  doc_ids = np.stack([doc_of[s:s + seq_len + 1] for s in starts])
  batch = rows_from_windows(windows, doc_ids, PAD)
  check_common(batch, seq_len)
  assert np.all(batch.segment_ids > 0), "windows have no padding"
  for r, s in enumerate(starts):
    for i in range(seq_len):
      t = s + i
      d = doc_of[t]
      assert batch.tokens[r, i] == stream[t]
      assert batch.segment_ids[r, i] == d - doc_of[s] + 1
      assert batch.positions[r, i] == t - max(offsets[d], s)
      has_next = t + 1 < offsets[d + 1]
      assert batch.loss_mask[r, i] == float(has_next)
      assert batch.targets[r, i] == (stream[t + 1] if has_next else PAD)
      if batch.loss_mask[r, i] == 0:
        assert batch.tokens[r, i] == EOS


def test_rows_from_windows_rejects_bad_shapes():
  with pytest.raises(ValueError, match="seq_len"):
    rows_from_windows(np.zeros((2, 5)), np.zeros((2, 4)), PAD)
  with pytest.raises(ValueError, match="at least 2"):
    rows_from_windows(np.zeros((2, 1)), np.zeros((2, 1)), PAD)


def test_batch_is_a_pytree_with_concatenate():
  rng = np.random.default_rng(7)
  b = pack_documents(random_docs(rng, 10, 20), 8, PAD)
  both = Batch.concatenate([b, b])
  assert both.shape == (2 * b.shape[0], 8)
  assert np.array_equal(both.tokens[b.shape[0]:], b.tokens)
  import jax
  leaves = jax.tree_util.tree_leaves(b)
  assert len(leaves) == 5
