from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lcjax.data import token_store
from lcjax.data.token_store import (IncompleteStoreError, TokenStore, open_or_write,
                                    write_store)


def random_docs(rng, n, vocab, max_len=300):
  return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]


@pytest.mark.parametrize("vocab,dtype", [(259, "uint16"), (70_000, "int32")])
def test_write_read_reopen(tmp_path, vocab, dtype, monkeypatch):
  monkeypatch.setattr(token_store, "_FLUSH_TOKENS", 1000)  # Many resizes.
  rng = np.random.default_rng(vocab)
  docs = random_docs(rng, 60, vocab)
  stream = np.concatenate(docs)
  store = write_store(tmp_path / "s", iter(docs), vocab_size=vocab, fingerprint="fp",
                      metadata=lambda: {"note": "x"})
  for s in (store, TokenStore(str(tmp_path / "s"))):
    assert s.info["dtype"] == dtype and s.info["metadata"] == {"note": "x"}
    assert s.num_tokens == stream.size and s.num_documents == len(docs)
    assert np.array_equal(s.offsets, np.concatenate([[0], np.cumsum([d.size for d in docs])]))
    full = s.read(0, s.num_tokens)
    assert full.dtype == np.int32 and np.array_equal(full, stream)
    for i in rng.integers(0, len(docs), size=5):
      assert np.array_equal(s.document(int(i)), docs[i])
    starts = rng.integers(0, stream.size - 97, size=33)
    windows = s.read_windows(starts, 97)
    assert windows.dtype == np.int32 and windows.shape == (33, 97)
    for w, st in zip(windows, starts):
      assert np.array_equal(w, stream[st:st + 97])
    pos = rng.integers(0, stream.size, size=50)
    d = s.document_index(pos)
    assert np.all((s.offsets[d] <= pos) & (pos < s.offsets[d + 1]))
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_window_bounds(tmp_path):
  store = write_store(tmp_path / "s", [np.arange(10)], vocab_size=259, fingerprint="f")
  assert np.array_equal(store.read(7, 3), [7, 8, 9])
  with pytest.raises(IndexError, match="start=8 length=3"):
    store.read(8, 3)
  with pytest.raises(IndexError):
    store.read_windows([0, 9], 2)
  with pytest.raises(IndexError):
    store.document(1)


def test_crashed_write_leaves_nothing(tmp_path):
  def docs():
    yield np.arange(100)
    raise RuntimeError("disk on fire")
  with pytest.raises(RuntimeError, match="fire"):
    write_store(tmp_path / "s", docs(), vocab_size=259, fingerprint="f")
  assert os.listdir(tmp_path) == []


def test_store_without_marker_is_not_complete(tmp_path):
  write_store(tmp_path / "s", [np.arange(50)], vocab_size=259, fingerprint="f")
  os.remove(tmp_path / "s" / token_store.MARKER)
  with pytest.raises(IncompleteStoreError, match="interrupted"):
    TokenStore(str(tmp_path / "s"))
  with pytest.raises(IncompleteStoreError):
    open_or_write(str(tmp_path / "s"), lambda: [np.arange(50)], vocab_size=259,
                  fingerprint="f")


def test_marker_disagreeing_with_arrays_is_rejected(tmp_path):
  write_store(tmp_path / "s", [np.arange(50)], vocab_size=259, fingerprint="f")
  marker = tmp_path / "s" / token_store.MARKER
  info = json.loads(marker.read_text())
  info["num_tokens"] = 49
  marker.write_text(json.dumps(info))
  with pytest.raises(IncompleteStoreError, match="disagree"):
    TokenStore(str(tmp_path / "s"))


def test_open_or_write_reuses(tmp_path):
  calls = []

  def docs():
    calls.append(1)
    return [np.arange(5), np.arange(7)]
  path = str(tmp_path / "s")
  a, built_a = open_or_write(path, docs, vocab_size=259, fingerprint="f")
  b, built_b = open_or_write(path, docs, vocab_size=259, fingerprint="f")
  assert (built_a, built_b, len(calls)) == (True, False, 1)
  assert np.array_equal(b.read(0, 12), np.concatenate([np.arange(5), np.arange(7)]))
  with pytest.raises(IncompleteStoreError, match="fingerprint"):
    open_or_write(path, docs, vocab_size=259, fingerprint="other")


def test_rejects_bad_tokens(tmp_path):
  with pytest.raises(ValueError, match=r"\[0, 259\)"):
    write_store(tmp_path / "s", [np.array([3, 259])], vocab_size=259, fingerprint="f")
  with pytest.raises(ValueError, match="1-D integer"):
    write_store(tmp_path / "t", [np.array([0.5])], vocab_size=259, fingerprint="f")
  with pytest.raises(FileExistsError):
    os.makedirs(tmp_path / "u")
    write_store(tmp_path / "u", [np.arange(3)], vocab_size=259, fingerprint="f")
