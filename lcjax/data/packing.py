"""Packing documents into fixed-length training rows.

Every row of a :class:`Batch` holds pieces of one or more documents. Conventions
(the same for stream windows and for document packing):

* A document is framed as ``BOS tokens... EOS`` (see :func:`frame`).
* ``segment_ids`` number the pieces in a row 1, 2, 3, ... from the left;
  0 marks padding. Attention is restricted to equal segment ids.
* ``positions`` count from 0 at the start of every piece. A document that does
  not fit is split: its continuation is a new piece (new segment id in the
  next row) whose positions restart at 0 and which has no BOS. With RoPE only
  position differences matter, so restarting is harmless; it keeps positions
  within ``[0, seq_len)``.
* ``targets[i]`` is the token that follows ``tokens[i]`` *in its document*,
  even when that token is just past the row end (the row is built from
  ``seq_len + 1`` tokens). Where there is none -- a document's final EOS and
  padding -- the target is PAD and ``loss_mask`` is 0.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Batch(NamedTuple):
  """A training or eval batch; every field is ``[batch, seq_len]`` numpy.

  A NamedTuple, so it is a JAX pytree (``jax.device_put(batch, sharding)``).
  """
  tokens: np.ndarray       # int32
  targets: np.ndarray      # int32, next token in the same document (PAD if none)
  segment_ids: np.ndarray  # int32, 1, 2, ... per piece in the row; 0 = padding
  positions: np.ndarray    # int32, 0-based within each piece
  loss_mask: np.ndarray    # float32, 1 where ``targets`` is a real next token

  @property
  def shape(self) -> tuple[int, int]:
    return self.tokens.shape

  @staticmethod
  def concatenate(batches: Sequence["Batch"]) -> "Batch":
    """Stacks the rows of several batches."""
    return Batch(*(np.concatenate(fields, axis=0) for fields in zip(*batches)))


def frame(tokens: np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
  """``[BOS] + tokens + [EOS]`` as int32: a document as stored and packed."""
  tokens = np.asarray(tokens, dtype=np.int32)
  return np.concatenate([np.array([bos_id], np.int32), tokens, np.array([eos_id], np.int32)])


def rows_from_windows(windows_BxL1: np.ndarray, doc_ids_BxL1: np.ndarray,
                      pad_id: int) -> Batch:
  """Rows of length L from windows of ``L + 1`` consecutive stream tokens.

  ``doc_ids_BxL1`` says which document each token belongs to (any integers,
  equal within a document, constant runs); -1 marks padding, which may only
  appear at the end of a row. This is the core both of the pipeline's random
  windows and of :func:`pack_documents`.
  """
  windows_BxL1 = np.asarray(windows_BxL1)
  doc_ids_BxL1 = np.asarray(doc_ids_BxL1)
  if windows_BxL1.ndim != 2 or windows_BxL1.shape != doc_ids_BxL1.shape:
    raise ValueError(f"windows {windows_BxL1.shape} and doc ids {doc_ids_BxL1.shape} "
                     "must both be [batch, seq_len + 1]")
  if windows_BxL1.shape[1] < 2:
    raise ValueError(f"windows need at least 2 tokens (seq_len >= 1), got "
                     f"{windows_BxL1.shape[1]}")
  doc_BxL = doc_ids_BxL1[:, :-1]
  real_BxL = doc_BxL >= 0
  has_next_BxL = real_BxL & (doc_ids_BxL1[:, 1:] == doc_BxL)
  tokens = np.where(real_BxL, windows_BxL1[:, :-1], pad_id).astype(np.int32)
  targets = np.where(has_next_BxL, windows_BxL1[:, 1:], pad_id).astype(np.int32)
  starts_BxL = real_BxL.copy()
  starts_BxL[:, 1:] &= doc_BxL[:, 1:] != doc_BxL[:, :-1]
  segment_ids = np.where(real_BxL, np.cumsum(starts_BxL, axis=1), 0).astype(np.int32)
  index_L = np.arange(doc_BxL.shape[1])
  piece_start_BxL = np.maximum.accumulate(np.where(starts_BxL, index_L, 0), axis=1)
  positions = np.where(real_BxL, index_L - piece_start_BxL, 0).astype(np.int32)
  return Batch(tokens, targets, segment_ids, positions, has_next_BxL.astype(np.float32))


def pack_documents(documents: Sequence[np.ndarray], seq_len: int, pad_id: int,
                   num_rows: int | None = None) -> Batch:
  """Greedy in-order packing of framed documents into rows of ``seq_len``.

  A document starts in the current row if it fits in the space left, else in
  a fresh row (the rest of the current row is padding); a document longer than
  ``seq_len`` is cut into ``seq_len`` pieces, each starting a fresh row, and
  its last piece shares its row with the following documents. Short documents
  are therefore never split. Rows end at ``num_rows`` (default: when the
  documents run out).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  windows, doc_ids = [], []
  row_tok = np.full(seq_len + 1, pad_id, np.int64)
  row_doc = np.full(seq_len + 1, -1, np.int64)
  used = 0

  def close_row():
    nonlocal row_tok, row_doc, used
    windows.append(row_tok)
    doc_ids.append(row_doc)
    row_tok = np.full(seq_len + 1, pad_id, np.int64)
    row_doc = np.full(seq_len + 1, -1, np.int64)
    used = 0

  for d, doc in enumerate(documents):
    doc = np.asarray(doc)
    if doc.ndim != 1 or doc.size == 0:
      raise ValueError(f"document {d} must be a non-empty 1-D token array, got shape "
                       f"{doc.shape}")
    if used and doc.size > seq_len - used:
      close_row()
    for start in range(0, doc.size, seq_len):
      if num_rows is not None and len(windows) >= num_rows:
        break
      if used == seq_len:
        close_row()
      piece = doc[start:start + seq_len + 1]  # +1: the next token, if any, is the target.
      row_tok[used:used + piece.size] = piece
      row_doc[used:used + piece.size] = d
      used += min(piece.size, seq_len)
    if num_rows is not None and len(windows) >= num_rows:
      break
  if used and (num_rows is None or len(windows) < num_rows):
    close_row()
  if not windows:
    raise ValueError("no documents to pack")
  return rows_from_windows(np.stack(windows), np.stack(doc_ids), pad_id)


def anchor_rows(batch: Batch, bos_id: int) -> Batch:
  """AnchorAttention's layout (Wang et al., 2024, "When Precision Meets Position").

  Token 0 of every row becomes the shared anchor (BOS) and ``positions`` count
  the whole row (``0 .. seq_len - 1``), not restarting per document. Train with
  the "anchor" layer kind (``Causal() | DocumentAnchor()``): segment ids still
  keep documents apart, and every token also sees the anchor at position 0.
  The anchor keeps the first piece's segment id, target and loss mask.
  """
  tokens = batch.tokens.copy()
  tokens[:, 0] = bos_id
  index = np.arange(tokens.shape[1], dtype=np.int32)
  positions = np.where(batch.segment_ids > 0, index, 0).astype(np.int32)
  return batch._replace(tokens=tokens, positions=positions)
