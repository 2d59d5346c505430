"""Tokenizers: the ``Tokenizer`` protocol and the embedded byte-level default.

The byte tokenizer needs no downloads and no vocabulary file: every UTF-8 byte
``b`` is token ``b + 3``; ids 0, 1, 2 are PAD, BOS and EOS. A later issue can
put a Hugging Face ``tokenizer.json`` tokenizer behind the same protocol.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline, the tasks and the evaluators need of a tokenizer.

  ``name`` identifies the tokenizer and its vocabulary; it is part of the token
  store's fingerprint, so two tokenizers with different vocabularies must have
  different names.
  """

  @property
  def name(self) -> str: ...

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  def encode(self, text: str) -> np.ndarray:
    """Token ids (int32, 1-D) of ``text``, without BOS/EOS."""
    ...

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of ``ids``; special tokens are skipped."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: PAD=0, BOS=1, EOS=2, byte ``b`` -> ``b + 3``.

  ``vocab_size`` is 259; models pad their embedding table beyond it (the
  default model config uses 384), but ids >= 259 never come out of ``encode``
  and are rejected by ``decode``.
  """

  NUM_SPECIAL = 3

  @property
  def name(self) -> str:
    return "byte-v1"

  @property
  def vocab_size(self) -> int:
    return 256 + self.NUM_SPECIAL

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2

  def encode(self, text: str) -> np.ndarray:
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    return self.encode_bytes(text.encode("utf-8"))

  def encode_bytes(self, data: bytes) -> np.ndarray:
    """Token ids of raw bytes (no UTF-8 check): ``byte + 3`` as int32."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.NUM_SPECIAL

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    ids = checked_ids(ids, self.vocab_size)
    data = (ids[ids >= self.NUM_SPECIAL] - self.NUM_SPECIAL).astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def checked_ids(ids: Iterable[int] | np.ndarray, vocab_size: int) -> np.ndarray:
  """``ids`` as a 1-D int64 array, or a ValueError naming an id outside the
  vocabulary (decoders share this check)."""
  ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
  if ids.ndim != 1:
    raise ValueError(f"decode expects a 1-D sequence of ids, got shape {ids.shape}")
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise ValueError(f"token id {int(bad[0])} is outside the vocabulary "
                     f"[0, {vocab_size}); restrict sampling to vocab_size")
  return ids
