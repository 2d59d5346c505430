"""A write-once, read-random-windows token store on tensorstore.

Layout of a store directory::

  tokens/     zarr3 array [num_tokens], uint16 (vocab <= 65536) or int32;
              shards of 2^20 tokens holding inner chunks of 2^12 tokens, so a
              window read touches a few KiB, not a whole shard
  offsets/    zarr3 array [num_documents + 1] int64: document i is
              tokens[offsets[i]:offsets[i+1]]
  COMPLETE.json  written last: token and document counts, dtype, fingerprint
              and any caller metadata (e.g. a content hash of the source)

A store is built in a temporary sibling directory and renamed into place once
``COMPLETE.json`` is written, so a crashed or concurrent build is never
mistaken for a complete store; ``open`` also checks the array shapes against
the marker. Reads return int32 and go through a tensorstore cache pool, so hot
chunks are served from memory.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tensorstore as ts

FORMAT_VERSION = 1
MARKER = "COMPLETE.json"
SHARD_TOKENS = 1 << 20
CHUNK_TOKENS = 1 << 12
_FLUSH_TOKENS = 1 << 23  # Buffer this many tokens in host memory between writes.
_DEFAULT_CACHE_BYTES = 256 << 20


class IncompleteStoreError(RuntimeError):
  """A store directory without a valid completion marker."""


class TokenStore:
  """Read access to a complete store; create one with :func:`write_store`."""

  def __init__(self, path: str, *, cache_bytes: int = _DEFAULT_CACHE_BYTES):
    self.path = os.fspath(path)
    marker = os.path.join(self.path, MARKER)
    if not os.path.exists(marker):
      raise IncompleteStoreError(
          f"{self.path} is not a complete token store (no {MARKER}); a write was "
          "interrupted or it is not a store. Delete it to rebuild.")
    with open(marker) as f:
      self.info: dict[str, Any] = json.load(f)
    if self.info.get("format") != FORMAT_VERSION:
      raise IncompleteStoreError(f"{self.path} has store format {self.info.get('format')}, "
                                 f"this code reads format {FORMAT_VERSION}; delete it to rebuild")
    context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
    self._tokens = ts.open(_array_spec(self.path, "tokens"), open=True,
                           context=context).result()
    offsets = ts.open(_array_spec(self.path, "offsets"), open=True,
                      context=context).result()
    self.offsets: np.ndarray = offsets.read().result()
    n, d = self.info["num_tokens"], self.info["num_documents"]
    if (self._tokens.shape != (n,) or self.offsets.shape != (d + 1,)
        or int(self.offsets[-1]) != n):
      raise IncompleteStoreError(
          f"{self.path}: arrays (tokens {self._tokens.shape}, offsets "
          f"{self.offsets.shape}) disagree with {MARKER} ({n} tokens, {d} documents)")

  @property
  def num_tokens(self) -> int:
    return int(self.info["num_tokens"])

  @property
  def num_documents(self) -> int:
    return int(self.info["num_documents"])

  @property
  def fingerprint(self) -> str:
    return self.info["fingerprint"]

  def read(self, start: int, length: int) -> np.ndarray:
    """Tokens ``[start, start + length)`` as int32."""
    self._check_window(start, length)
    return self._tokens[start:start + length].read().result().astype(np.int32)

  def read_windows(self, starts: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
    """``[len(starts), length]`` int32: many windows, read concurrently.

    All reads are issued at once in one ``ts.Batch`` (tensorstore coalesces
    reads of the same shard) and awaited together.
    """
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    for s in starts:
      self._check_window(int(s), length)
    with ts.Batch() as batch:
      futures = [self._tokens[int(s):int(s) + length].read(batch=batch) for s in starts]
    out = np.empty((len(starts), length), dtype=np.int32)
    for row, future in enumerate(futures):
      out[row] = future.result()
    return out

  def document(self, index: int) -> np.ndarray:
    """All tokens of document ``index`` (int32)."""
    if not 0 <= index < self.num_documents:
      raise IndexError(f"document {index} out of range [0, {self.num_documents})")
    start, end = int(self.offsets[index]), int(self.offsets[index + 1])
    return self.read(start, end - start)

  def document_index(self, positions: np.ndarray) -> np.ndarray:
    """Index of the document holding each token position (same shape, int64)."""
    return np.searchsorted(self.offsets, positions, side="right") - 1

  def _check_window(self, start: int, length: int) -> None:
    if length < 0 or start < 0 or start + length > self.num_tokens:
      raise IndexError(f"window start={start} length={length} is outside the store's "
                       f"{self.num_tokens} tokens ({self.path})")

  def __repr__(self) -> str:
    return (f"TokenStore({self.path!r}, tokens={self.num_tokens}, "
            f"documents={self.num_documents})")


def write_store(path: str, documents: Iterable[np.ndarray], *, vocab_size: int,
                fingerprint: str,
                metadata: Callable[[], dict[str, Any]] | None = None) -> TokenStore:
  """Writes ``documents`` (1-D int arrays, in order) as a store at ``path``.

  ``metadata`` is called after all documents were consumed (so it can report
  e.g. a content hash accumulated while they were produced); its dict goes into
  the marker under ``"metadata"``. Fails if ``path`` already exists.
  """
  path = os.fspath(path)
  if os.path.exists(path):
    raise FileExistsError(f"token store {path} already exists")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    dtype = "uint16" if vocab_size <= 1 << 16 else "int32"
    tokens = ts.open(_array_spec(tmp, "tokens", dtype=dtype, shape=0, shard=SHARD_TOKENS,
                                 chunk=CHUNK_TOKENS), create=True).result()
    offsets, buffer, buffered, written = [0], [], 0, 0

    def flush():
      nonlocal tokens, buffer, buffered, written
      if not buffered:
        return
      data = np.concatenate(buffer)
      tokens = tokens.resize(exclusive_max=[written + buffered], expand_only=True).result()
      tokens[written:written + buffered].write(data.astype(dtype)).result()
      written += buffered
      buffer, buffered = [], 0

    for doc in documents:
      doc = np.asarray(doc)
      if doc.ndim != 1 or not np.issubdtype(doc.dtype, np.integer):
        raise ValueError(f"documents must be 1-D integer arrays, got {doc.dtype}{doc.shape}")
      if doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got range "
                         f"[{doc.min()}, {doc.max()}]")
      buffer.append(doc)
      buffered += doc.size
      offsets.append(offsets[-1] + doc.size)
      if buffered >= _FLUSH_TOKENS:
        flush()
    flush()
    offsets_arr = np.asarray(offsets, dtype=np.int64)
    off_store = ts.open(_array_spec(tmp, "offsets", dtype="int64", shape=offsets_arr.size,
                                    chunk=max(1, offsets_arr.size)), create=True).result()
    off_store.write(offsets_arr).result()
    info = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "num_tokens": written,
            "num_documents": len(offsets) - 1, "dtype": dtype, "vocab_size": vocab_size,
            "metadata": metadata() if metadata else {}}
    with open(os.path.join(tmp, MARKER), "w") as f:
      json.dump(info, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.rename(tmp, path)  # Atomic: readers see a complete store or none.
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return TokenStore(path)


def open_or_write(path: str, documents: Callable[[], Iterable[np.ndarray]], *,
                  vocab_size: int, fingerprint: str,
                  metadata: Callable[[], dict[str, Any]] | None = None
                  ) -> tuple[TokenStore, bool]:
  """Opens the complete store at ``path`` or writes it; returns ``(store, built)``.

  A directory at ``path`` without a marker is an error (never reused, never
  deleted). If another process finishes the same store first, its store is
  used and ours discarded.
  """
  if os.path.exists(path):
    store = TokenStore(path)
    if store.fingerprint != fingerprint:
      raise IncompleteStoreError(f"{path} holds a store with fingerprint "
                                 f"{store.fingerprint}, expected {fingerprint}")
    return store, False
  try:
    return write_store(path, documents(), vocab_size=vocab_size, fingerprint=fingerprint,
                       metadata=metadata), True
  except (FileExistsError, OSError):
    if os.path.exists(os.path.join(path, MARKER)):  # A concurrent writer won.
      return TokenStore(path), False
    raise


def _array_spec(root: str, name: str, *, dtype: str | None = None, shape: int | None = None,
                shard: int | None = None, chunk: int | None = None) -> dict[str, Any]:
  spec: dict[str, Any] = {"driver": "zarr3",
                          "kvstore": {"driver": "file", "path": os.path.join(root, name)}}
  if dtype is None:
    return spec
  little = {"name": "bytes", "configuration": {"endian": "little"}}
  if shard:
    grid, codecs = shard, [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": [chunk], "codecs": [little],
        "index_codecs": [little, {"name": "crc32c"}]}}]
  else:
    grid, codecs = chunk, [little]
  spec["metadata"] = {"shape": [shape], "data_type": dtype, "codecs": codecs,
                      "chunk_grid": {"name": "regular",
                                     "configuration": {"chunk_shape": [grid]}}}
  return spec
