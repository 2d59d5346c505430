from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from lcjax.config import DataConfig
from lcjax.data import corpus as corpus_lib
from lcjax.data.packing import frame
from lcjax.data.pipeline import default_store_dir, make_source
from lcjax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="module")
def cfg(store_dir):
  return DataConfig(source="stdlib", store_dir=store_dir, seq_len=128, batch_size=8,
                    max_documents=30, seed=3)


def assert_same(a, b):
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and np.array_equal(x, y)


def check_text_rows(batch, seq_len):
  assert batch.shape[1] == seq_len
  assert np.all(batch.segment_ids >= 1)  # Windows: no padding.
  # Only a document's final EOS lacks a next token.
  assert np.array_equal(batch.loss_mask == 0, batch.tokens == TOK.eos_id)
  same = (batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1])
  assert np.array_equal(same, batch.positions[:, 1:] == batch.positions[:, :-1] + 1)
  inner = same & (batch.loss_mask[:, :-1] > 0)
  assert np.array_equal(batch.targets[:, :-1][inner], batch.tokens[:, 1:][inner])
  # A segment that is not the row's first begins with BOS.
  starts = ~same
  assert np.all(batch.tokens[:, 1:][starts] == TOK.bos_id)


def test_store_is_the_framed_corpus(cfg):
  source = make_source(cfg)
  corpus = corpus_lib.corpus_from_config("stdlib", "", cfg.max_documents)
  assert len(corpus.train) + len(corpus.eval) == 30 and corpus.eval
  for store, files in ((source.train_store, corpus.train), (source.eval_store, corpus.eval)):
    texts = [corpus_lib.read_text(f, strict_utf8=False) for f in files]
    expected = np.concatenate([frame(TOK.encode(t), TOK.bos_id, TOK.eos_id)
                               for t in texts if t is not None])
    assert np.array_equal(store.read(0, store.num_tokens), expected)


def test_batches_deterministic_and_well_formed(cfg):
  source = make_source(cfg)
  b0 = source.batch(0)
  assert b0.shape == (8, 128)
  check_text_rows(b0, 128)
  assert_same(b0, source.batch(0))
  assert_same(b0, make_source(cfg).batch(0))  # A new source object (resume).
  b1 = source.batch(1)
  assert not np.array_equal(b0.tokens, b1.tokens)
  other_seed = make_source(dataclasses.replace(cfg, seed=4)).batch(0)
  assert not np.array_equal(b0.tokens, other_seed.tokens)
  # Steps are independent: reading step 5 first changes nothing.
  fresh = make_source(cfg)
  b5 = fresh.batch(5)
  assert_same(source.batch(5), b5)


def test_process_shards_make_the_global_batch(cfg):
  source = make_source(cfg)
  full = source.batch(7)
  parts = [source.batch(7, process_index=i, process_count=4) for i in range(4)]
  for field, *pieces in zip(full, *parts):
    assert np.array_equal(field, np.concatenate(pieces))
  with pytest.raises(ValueError, match="split evenly"):
    source.batch(0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="step"):
    source.batch(-1)


def test_store_reused(cfg):
  first = make_source(cfg)
  second = make_source(cfg)
  assert not second.built
  assert second.train_store.path == first.train_store.path
  assert "reused" in second.describe()


def test_eval_batches_fixed(cfg):
  source = make_source(cfg)
  ev = source.eval_batches(3)
  assert len(ev) == 3 and all(b.shape == (8, 128) for b in ev)
  for b in ev:
    check_text_rows(b, 128)
  other = make_source(dataclasses.replace(cfg, seed=99)).eval_batches(3)
  for a, b in zip(ev, other):
    assert_same(a, b)
  # Eval rows come from the eval split, training rows from the train split.
  eval_stream = source.eval_store.read(0, source.eval_store.num_tokens)
  row = ev[1].tokens[2]
  hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(eval_stream, 128)
                        .__eq__(row).all(axis=1))
  assert hits.size >= 1
  with pytest.raises(ValueError, match=">= 1"):
    source.eval_batches(0)


def test_passkey_rows(cfg):
  source = make_source(dataclasses.replace(cfg, passkey_fraction=1.0, batch_size=16))
  b = source.batch(2)
  assert np.all(b.loss_mask.sum(axis=1) == 6)
  assert np.all(b.segment_ids == 1)
  for r in range(16):
    answer = TOK.decode(b.targets[r][b.loss_mask[r] > 0])
    assert len(answer) == 5 and answer.isdigit()
    assert f"The pass key is {answer}.\n" in TOK.decode(b.tokens[r])
  mixed = make_source(dataclasses.replace(cfg, passkey_fraction=0.5, batch_size=64)).batch(0)
  is_passkey = mixed.loss_mask.sum(axis=1) == 6
  assert 16 <= is_passkey.sum() <= 48
  check_text_rows(type(mixed)(*(f[~is_passkey] for f in mixed)), 128)


def test_retrieval_mix_rows_and_weights(cfg):
  """Passkey + multi-key NIAH + text rows, short answers, weighted answer loss."""
  mix = dataclasses.replace(cfg, seq_len=256, batch_size=48, passkey_fraction=0.3,
                            niah_fraction=0.4, niah_keys=3, answer_digits=2,
                            answer_weight=8.0)
  b = make_source(mix).batch(5)
  weighted = (b.loss_mask == 8.0).any(axis=1)
  text = ~weighted
  np.testing.assert_array_equal(b.tokens[weighted, 1:], b.targets[weighted, :-1])
  kinds = {"passkey": 0, "niah": 0}
  for r in np.flatnonzero(weighted):
    assert set(np.unique(b.loss_mask[r]).tolist()) == {0.0, 8.0}
    answer = TOK.decode(b.targets[r][b.loss_mask[r] > 0])  # 2 digits + EOS (dropped)
    assert len(answer) == 2 and answer.isdigit()
    prompt = TOK.decode(b.tokens[r])
    if "pass key" in prompt:
      kinds["passkey"] += 1
    else:
      assert prompt.count("The magic number for") == 4  # 3 needles + the question
      assert prompt.endswith(f"is {answer}")
      kinds["niah"] += 1
  assert kinds["passkey"] >= 5 and kinds["niah"] >= 8 and text.sum() >= 5
  check_text_rows(type(b)(*(f[text] for f in b)), 256)
  np.testing.assert_array_equal(make_source(mix).batch(5).tokens, b.tokens)


@pytest.mark.parametrize("field,value,match", [
    ("niah_fraction", 1.5, "niah_fraction must be in"),
    ("answer_digits", 0, "answer_digits must be >= 1"),
    ("answer_weight", 0.0, "answer_weight must be > 0"),
    ("niah_keys", 99, "niah_keys must be in"),
])
def test_retrieval_mix_rejects_bad_fields(cfg, field, value, match):
  bad = dataclasses.replace(cfg, **{"niah_fraction": 0.2, field: value})
  with pytest.raises(ValueError, match=match):
    make_source(bad)
  with pytest.raises(ValueError, match="passkey_fraction \\+ data.niah_fraction"):
    make_source(dataclasses.replace(cfg, passkey_fraction=0.6, niah_fraction=0.6))


def test_files_source(tmp_path):
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "δέλτα", "東京", "🙂", "\n"]
  texts = {}
  for i in range(60):
    sub = tmp_path / "corpus" / f"d{i % 3}"
    sub.mkdir(parents=True, exist_ok=True)
    text = " ".join(rng.choice(words, size=int(rng.integers(20, 200))))
    (sub / f"f{i:02d}.txt").write_text(text, encoding="utf-8")
    texts[f"d{i % 3}/f{i:02d}.txt"] = text
  (tmp_path / "corpus" / "ignored.md").write_text("not matched")
  cfg = DataConfig(source="files", paths=str(tmp_path / "corpus" / "**" / "*.txt"),
                   store_dir=str(tmp_path / "stores"), seq_len=32, batch_size=4)
  source = make_source(cfg)
  corpus = corpus_lib.files_corpus(cfg.paths)
  names = [f.relpath for f in corpus.train + corpus.eval]
  assert sorted(names) == sorted(texts) and len(corpus.eval) >= 1
  assert [f.relpath for f in corpus.train] == sorted(f.relpath for f in corpus.train)
  expected = np.concatenate([frame(TOK.encode(texts[f.relpath]), 1, 2) for f in corpus.train])
  assert np.array_equal(source.train_store.read(0, source.train_store.num_tokens), expected)
  check_text_rows(source.batch(0), 32)
  # Changing a file changes the fingerprint: a new store is built.
  (tmp_path / "corpus" / "d0" / "f00.txt").write_text("changed text " * 30)
  again = make_source(cfg)
  assert again.built and again.train_store.path != source.train_store.path


def test_files_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="matches no files"):
    make_source(DataConfig(source="files", paths=str(tmp_path / "*.txt"),
                           store_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="needs data.paths"):
    make_source(DataConfig(source="files", store_dir=str(tmp_path)))
  (tmp_path / "a.txt").write_text("only one")
  with pytest.raises(ValueError, match="at least 2"):
    make_source(DataConfig(source="files", paths=str(tmp_path / "*.txt"),
                           store_dir=str(tmp_path / "s")))
  (tmp_path / "b.txt").write_bytes(b"caf\xe9 latin-1")
  with pytest.raises(ValueError, match="b.txt is not valid UTF-8"):
    make_source(DataConfig(source="files", paths=str(tmp_path / "*.txt"),
                           store_dir=str(tmp_path / "s"), seq_len=4))
  assert not os.path.exists(tmp_path / "s") or all(
      not p.startswith(".tmp") for _, _, ps in os.walk(tmp_path / "s") for p in ps)


@pytest.mark.parametrize("field,value,match", [
    ("source", "web", "unknown data.source"),
    ("passkey_fraction", 1.5, "passkey_fraction"),
    ("seq_len", 0, "seq_len"),
    ("batch_size", 0, "batch_size"),
    ("max_documents", -1, "max_documents"),
])
def test_bad_config(cfg, field, value, match):
  with pytest.raises(ValueError, match=match):
    make_source(dataclasses.replace(cfg, **{field: value}))


def test_too_short_for_passkey_or_split(cfg):
  with pytest.raises(ValueError, match="too short for passkey rows"):
    make_source(dataclasses.replace(cfg, seq_len=60, passkey_fraction=0.1))
  with pytest.raises(ValueError, match="fewer than data.seq_len"):
    make_source(dataclasses.replace(cfg, seq_len=10_000_000))


def test_default_store_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("LCJAX_CACHE", str(tmp_path))
  assert default_store_dir() == os.path.join(str(tmp_path), "tokens")
  monkeypatch.delenv("LCJAX_CACHE")
  assert default_store_dir() == os.path.expanduser("~/.cache/lcjax/tokens")
