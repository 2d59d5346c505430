"""From a ``DataConfig`` to batches: ``make_source(cfg).batch(step)``.

Training rows are random windows of ``seq_len + 1`` tokens of the train
split's token stream (documents framed ``BOS ... EOS`` and concatenated), cut
into segments at document boundaries (see ``packing``): every token is trained
on, nothing is padded, and a window is one tensorstore read. Windows start
uniformly at random, so every token is equally likely to be seen. Row ``r`` of
step ``s`` depends only on ``(seed, s, r)``: a resumed run reads exactly the
data of an uninterrupted one, and each process of a multi-host run can build
just its own rows.

A ``passkey_fraction`` (``niah_fraction``) of rows, chosen per row by the same
RNG, is replaced by a synthetic passkey (multi-key NIAH) example filling the
whole row, with the loss on the answer and its EOS only, weighted
``answer_weight``.

Eval batches are fixed: ``n * batch_size`` windows spread evenly over the eval
split's stream, independent of the seed.

The token stores live in ``<store_dir>/<fingerprint>/{train,eval}``, where
``store_dir`` is ``DataConfig.store_dir`` or, if empty,
``$LCJAX_CACHE/tokens`` or ``~/.cache/lcjax/tokens``. The fingerprint covers the
tokenizer, the source, ``max_documents`` and each file's path, size and mtime;
a changed corpus gets a new store, an unchanged one is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Iterator, Protocol

import numpy as np

from lcjax.data import corpus as corpus_lib
from lcjax.data import packing, tasks
from lcjax.data.packing import Batch
from lcjax.data.token_store import TokenStore, open_or_write
from lcjax.data.tokenizer import ByteTokenizer, Tokenizer


class BatchSource(Protocol):
  """What the trainer needs from a data source."""
  tokenizer: Tokenizer
  seq_len: int
  batch_size: int

  def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> Batch:
    ...

  def eval_batches(self, n: int) -> list[Batch]:
    ...


def default_store_dir() -> str:
  """``$LCJAX_CACHE/tokens`` or ``~/.cache/lcjax/tokens``."""
  cache = os.environ.get("LCJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "lcjax")
  return os.path.join(cache, "tokens")


def make_source(data_cfg: Any, tokenizer: Tokenizer | None = None) -> "WindowSource":
  """The batch source a ``DataConfig`` describes, building its token store
  on first use (about 1 s for the whole standard library) and reusing it after."""
  tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
  _validate(data_cfg, tokenizer)
  corpus = corpus_lib.corpus_from_config(data_cfg.source, data_cfg.paths,
                                         data_cfg.max_documents)
  train, evals, built = build_stores(corpus, tokenizer, data_cfg.store_dir or
                                     default_store_dir())
  return WindowSource(data_cfg, tokenizer, train, evals, built=built)


def build_stores(corpus: corpus_lib.Corpus, tokenizer: Tokenizer, store_dir: str
                 ) -> tuple[TokenStore, TokenStore, bool]:
  """Opens or writes the train and eval stores of ``corpus``; ``built`` says
  whether anything was written."""
  identity = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
              "bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "corpus": corpus.identity()}
  fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
  root = os.path.join(store_dir, fingerprint)
  stores, built_any = [], False
  for split, files in (("train", corpus.train), ("eval", corpus.eval)):
    content, skipped = hashlib.blake2b(digest_size=16), []

    def documents(files=files, content=content, skipped=skipped) -> Iterator[np.ndarray]:
      for f in files:
        text = corpus_lib.read_text(f, strict_utf8=corpus.strict_utf8)
        if text is None:
          skipped.append(f.relpath)
          continue
        content.update(f.relpath.encode() + b"\0" + text.encode("utf-8") + b"\0")
        yield packing.frame(tokenizer.encode(text), tokenizer.bos_id, tokenizer.eos_id)

    def metadata(content=content, skipped=skipped, split=split) -> dict[str, Any]:
      return {"split": split, "source": corpus.kind, "root": corpus.root,
              "tokenizer": tokenizer.name, "content_blake2b": content.hexdigest(),
              "skipped_files": skipped, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}

    store, built = open_or_write(os.path.join(root, split), documents,
                                 vocab_size=tokenizer.vocab_size,
                                 fingerprint=f"{fingerprint}/{split}", metadata=metadata)
    if store.num_documents == 0:
      raise ValueError(f"the {split} split of the {corpus.kind} corpus under {corpus.root} "
                       f"has no readable documents (skipped: {store.info['metadata']})")
    stores.append(store)
    built_any |= built
  return stores[0], stores[1], built_any


class WindowSource:
  """Random-window training batches and fixed eval batches (module docstring)."""

  def __init__(self, data_cfg: Any, tokenizer: Tokenizer, train: TokenStore,
               evals: TokenStore, *, built: bool = False):
    self.tokenizer = tokenizer
    self.seq_len = int(data_cfg.seq_len)
    self.batch_size = int(data_cfg.batch_size)
    self.seed = int(data_cfg.seed)
    self.passkey_fraction = float(data_cfg.passkey_fraction)
    self.niah_fraction = float(data_cfg.niah_fraction)
    self.niah_keys = int(data_cfg.niah_keys)
    self.answer_digits = int(data_cfg.answer_digits)
    self.answer_weight = float(data_cfg.answer_weight)
    self.anchor = bool(getattr(data_cfg, "anchor", False))  # AnchorAttention rows
    self.train_store, self.eval_store = train, evals
    self.built = built  # Whether make_source wrote the stores (False: reused).
    for name, store in (("train", train), ("eval", evals)):
      if store.num_tokens < self.seq_len + 1:
        raise ValueError(f"the {name} split has {store.num_tokens} tokens, fewer than "
                         f"data.seq_len + 1 = {self.seq_len + 1}; lower data.seq_len or "
                         "add documents (data.max_documents=0 uses all)")

  def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> Batch:
    """Training batch ``step``: ``[batch_size / process_count, seq_len]``, the
    rows ``process_index * rows ...`` of the global batch; a pure function of
    ``(seed, step)``."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if not 0 <= process_index < process_count or self.batch_size % process_count:
      raise ValueError(f"process {process_index} of {process_count}: data.batch_size="
                       f"{self.batch_size} must split evenly over the processes")
    per_process = self.batch_size // process_count
    rows = range(process_index * per_process, (process_index + 1) * per_process)
    rngs = [np.random.default_rng([self.seed, step, r]) for r in rows]
    u = np.array([rng.uniform() for rng in rngs])
    is_passkey = u < self.passkey_fraction
    is_niah = ~is_passkey & (u < self.passkey_fraction + self.niah_fraction)
    is_text = ~(is_passkey | is_niah)
    last_start = self.train_store.num_tokens - (self.seq_len + 1)
    starts = [int(rng.integers(0, last_start + 1)) for rng, t in zip(rngs, is_text) if t]
    if is_text.all():
      return self._window_rows(self.train_store, starts)
    out = Batch.concatenate([self._retrieval_row(rng, p) if not t
                             else _placeholder_row(self.seq_len)
                             for rng, p, t in zip(rngs, is_passkey, is_text)])
    if starts:
      for field, text_field in zip(out, self._window_rows(self.train_store, starts)):
        field[is_text] = text_field
    return out

  def _retrieval_row(self, rng: np.random.Generator, passkey: bool) -> Batch:
    if passkey:
      row = tasks.passkey_training_row(rng, self.seq_len, self.tokenizer,
                                       digits=self.answer_digits)
    else:
      row = tasks.multikey_training_row(rng, self.seq_len, self.tokenizer,
                                        num_keys=self.niah_keys, digits=self.answer_digits)
    return row._replace(loss_mask=row.loss_mask * self.answer_weight)

  def eval_batches(self, n: int) -> list[Batch]:
    """``n`` fixed eval batches of ``batch_size`` rows: windows spread evenly
    over the eval split (they overlap if the split is small)."""
    if n < 1:
      raise ValueError(f"number of eval batches must be >= 1, got {n}")
    last_start = self.eval_store.num_tokens - (self.seq_len + 1)
    starts = np.round(np.linspace(0, last_start, n * self.batch_size)).astype(np.int64)
    rows = self._window_rows(self.eval_store, starts)
    b = self.batch_size
    return [Batch(*(field[i * b:(i + 1) * b] for field in rows)) for i in range(n)]

  def describe(self) -> str:
    """One line for logs: corpus size and where the stores are."""
    t, e = self.train_store, self.eval_store
    return (f"data: {t.info['metadata'].get('source')} corpus, train {t.num_documents} docs / "
            f"{t.num_tokens:,} tokens, eval {e.num_documents} docs / {e.num_tokens:,} tokens, "
            f"store {os.path.dirname(t.path)} ({'built' if self.built else 'reused'})")

  def _window_rows(self, store: TokenStore, starts) -> Batch:
    """Rows from the windows of ``seq_len + 1`` tokens at ``starts``."""
    starts = np.asarray(starts, np.int64)
    windows = store.read_windows(starts, self.seq_len + 1)
    doc_ids = store.document_index(starts[:, None] + np.arange(self.seq_len + 1))
    rows = packing.rows_from_windows(windows, doc_ids, self.tokenizer.pad_id)
    return packing.anchor_rows(rows, self.tokenizer.bos_id) if self.anchor else rows


def _placeholder_row(seq_len: int) -> Batch:
  """A row that ``batch`` overwrites with a text row."""
  zeros = np.zeros((1, seq_len), np.int32)
  return Batch(zeros, zeros, zeros, zeros, np.zeros((1, seq_len), np.float32))


def _validate(cfg: Any, tokenizer: Tokenizer) -> None:
  if cfg.seq_len < 1:
    raise ValueError(f"data.seq_len must be >= 1, got {cfg.seq_len}")
  if cfg.batch_size < 1:
    raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
  fractions = {"passkey_fraction": cfg.passkey_fraction, "niah_fraction": cfg.niah_fraction}
  for name, value in fractions.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"data.{name} must be in [0, 1], got {value}")
  if cfg.passkey_fraction + cfg.niah_fraction > 1.0:
    raise ValueError(f"data.passkey_fraction + data.niah_fraction must be <= 1, got "
                     f"{cfg.passkey_fraction} + {cfg.niah_fraction}")
  if cfg.answer_digits < 1:
    raise ValueError(f"data.answer_digits must be >= 1, got {cfg.answer_digits}")
  if cfg.answer_weight <= 0:
    raise ValueError(f"data.answer_weight must be > 0, got {cfg.answer_weight}")
  answer = len(tokenizer.encode("0" * cfg.answer_digits))
  if cfg.passkey_fraction > 0:
    need = tasks.min_passkey_length(tokenizer, digits=cfg.answer_digits) + answer
    if cfg.seq_len < need:
      raise ValueError(f"data.seq_len={cfg.seq_len} is too short for passkey rows "
                       f"(data.passkey_fraction={cfg.passkey_fraction}); it needs >= {need}")
  if cfg.niah_fraction > 0:
    if not 1 <= cfg.niah_keys <= tasks.MAX_NIAH_KEYS:
      raise ValueError(f"data.niah_keys must be in [1, {tasks.MAX_NIAH_KEYS}], "
                       f"got {cfg.niah_keys}")
    need = tasks.min_multikey_length(tokenizer, num_keys=cfg.niah_keys,
                                     digits=cfg.answer_digits) + answer
    if cfg.seq_len < need:
      raise ValueError(f"data.seq_len={cfg.seq_len} is too short for {cfg.niah_keys}-key NIAH "
                       f"rows (data.niah_fraction={cfg.niah_fraction}); it needs >= {need}")
