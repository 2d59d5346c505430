"""A checkpoint's ``tokenizer.json`` behind lcjax's ``Tokenizer`` protocol.

Uses the Hugging Face ``tokenizers`` library (Rust, fast; an optional
dependency imported only here). BOS/EOS/PAD come from ``tokenizer_config.json``
(``bos_token`` ...) or else ``config.json`` (``bos_token_id`` ...). Models
without a BOS token (Qwen2) use EOS as BOS, and models without PAD use EOS as
PAD: documents in packed rows are then separated by EOS, as they were in
pre-training.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np

from lcjax.data.tokenizer import checked_ids


def _import_tokenizers():
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError("reading tokenizer.json needs the 'tokenizers' package: "
                      "pip install tokenizers (or lcjax[hf])") from e
  return tokenizers


def _token_text(value) -> str | None:
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _first_id(value) -> int | None:
  if isinstance(value, list):
    return int(value[0]) if value else None
  return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


class HFTokenizer:
  """``tokenizers.Tokenizer`` from ``tokenizer.json`` as an lcjax ``Tokenizer``."""

  def __init__(self, folder: str, *, bos_id: int | None = None,
               eos_id: int | None = None, pad_id: int | None = None):
    tokenizers = _import_tokenizers()
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer.json in {folder!r}")
    with open(path, "rb") as f:
      raw = f.read()
    self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    self._name = "hf-" + hashlib.sha256(raw).hexdigest()[:16]
    self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    found = self._special_ids(folder)
    eos = eos_id if eos_id is not None else found.get("eos")
    if eos is None:
      raise ValueError(f"{folder!r}: no EOS token in tokenizer_config.json "
                       "(eos_token) or config.json (eos_token_id); pass eos_id=")
    bos = bos_id if bos_id is not None else found.get("bos", eos)
    pad = pad_id if pad_id is not None else found.get("pad", eos)
    for role, value in (("bos", bos), ("eos", eos), ("pad", pad)):
      if not 0 <= value < self._vocab_size:
        raise ValueError(f"{role}_id={value} is outside the vocabulary "
                         f"[0, {self._vocab_size})")
    self._bos, self._eos, self._pad = bos, eos, pad

  def _special_ids(self, folder: str) -> dict[str, int]:
    """Ids of BOS/EOS/PAD named in the checkpoint's config files."""
    out: dict[str, int] = {}
    config = os.path.join(folder, "config.json")
    if os.path.exists(config):
      with open(config) as f:
        hf = json.load(f)
      for role in ("bos", "eos", "pad"):
        value = _first_id(hf.get(f"{role}_token_id"))
        if value is not None:
          out[role] = value
    tok_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(tok_config):  # takes precedence: it names the tokens
      with open(tok_config) as f:
        tc = json.load(f)
      for role in ("bos", "eos", "pad"):
        text = _token_text(tc.get(f"{role}_token"))
        if text is not None:
          token_id = self._tok.token_to_id(text)
          if token_id is None:
            raise ValueError(f"{tok_config}: {role}_token {text!r} is not in the "
                             "vocabulary of tokenizer.json")
          out[role] = token_id
    return out

  @property
  def name(self) -> str:
    return self._name

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  def encode(self, text: str) -> np.ndarray:
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    ids = checked_ids(ids, self._vocab_size)
    return self._tok.decode(ids.tolist(), skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self._name}, vocab_size={self._vocab_size})"


def load_tokenizer(folder: str):
  """The checkpoint's tokenizer if it has ``tokenizer.json``, else ``None``."""
  if os.path.exists(os.path.join(folder, "tokenizer.json")):
    return HFTokenizer(folder)
  return None
