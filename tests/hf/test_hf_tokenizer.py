"""``tokenizer.json`` through the ``tokenizers`` library behind the Tokenizer protocol."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_tokenizer import TEXT, write_bpe_tokenizer

from lcjax.data.tokenizer import Tokenizer
from lcjax.hf import HFTokenizer, load_tokenizer


def test_protocol_round_trip_and_special_ids(tmp_path):
  folder = str(tmp_path)
  tok = write_bpe_tokenizer(folder)
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": {"content": "</s>"},
               "pad_token": "<pad>"}, f)
  ours = HFTokenizer(folder)
  assert isinstance(ours, Tokenizer)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2)
  assert ours.vocab_size == tok.get_vocab_size() <= 300
  for text in TEXT[:4] + ["never seen: 量子 ∮ \t\r\n"]:
    ids = ours.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    np.testing.assert_array_equal(ids, tok.encode(text, add_special_tokens=False).ids)
    assert ours.decode(ids) == text
  assert ours.decode([0, *ours.encode("hi"), 1]) == "hi"  # specials skipped
  with pytest.raises(ValueError, match="outside the vocabulary"):
    ours.decode([ours.vocab_size])
  assert load_tokenizer(folder).name == ours.name


def test_ids_from_config_json_and_eos_fallbacks(tmp_path):
  write_bpe_tokenizer(str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"eos_token_id": [1, 0]}, f)
  tok = HFTokenizer(str(tmp_path))
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (1, 1, 1)  # Qwen2 style: no BOS
  assert HFTokenizer(str(tmp_path), bos_id=0, pad_id=2).bos_id == 0


def test_names_differ_with_the_vocabulary(tmp_path):
  write_bpe_tokenizer(str(tmp_path / "a"), vocab_size=280)
  write_bpe_tokenizer(str(tmp_path / "b"), vocab_size=300)
  for d in ("a", "b"):
    with open(tmp_path / d / "config.json", "w") as f:
      json.dump({"eos_token_id": 1}, f)
  assert HFTokenizer(str(tmp_path / "a")).name != HFTokenizer(str(tmp_path / "b")).name


def test_clear_errors(tmp_path):
  assert load_tokenizer(str(tmp_path)) is None
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    HFTokenizer(str(tmp_path))
  write_bpe_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="no EOS token"):
    HFTokenizer(str(tmp_path))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": "<|im_end|>"}, f)
  with pytest.raises(ValueError, match="'<|im_end|>' is not in the vocabulary"):
    HFTokenizer(str(tmp_path))


def test_matches_transformers_fast_tokenizer(tmp_path):
  transformers = pytest.importorskip("transformers")
  write_bpe_tokenizer(str(tmp_path))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
  theirs = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(tmp_path / "tokenizer.json"))
  ours = HFTokenizer(str(tmp_path))
  for text in TEXT[:4]:
    assert ours.encode(text).tolist() == theirs.encode(text, add_special_tokens=False)
