from __future__ import annotations

import re

import numpy as np
import pytest

from lcjax.data import tasks
from lcjax.data.tasks import (eval_examples, make_multikey_niah, make_passkey,
                              passkey_training_row, score)
from lcjax.data.tokenizer import ByteTokenizer


class PairTokenizer:
  """A test tokenizer whose tokens are byte *pairs* (lengths not = bytes)."""
  name, vocab_size, pad_id, bos_id, eos_id = "pair-test", 3 + 256 * 257, 0, 1, 2

  def encode(self, text):
    b = text.encode("utf-8")
    return np.array([3 + b[i] * 257 + (b[i + 1] + 1 if i + 1 < len(b) else 0)
                     for i in range(0, len(b), 2)], np.int32)

  def decode(self, ids):
    out = bytearray()
    for t in ids:
      if t < 3:
        continue
      hi, lo = divmod(int(t) - 3, 257)
      out.append(hi)
      if lo:
        out.append(lo - 1)
    return out.decode("utf-8", errors="replace")


TOKENIZERS = [ByteTokenizer(), PairTokenizer()]


@pytest.mark.parametrize("tok", TOKENIZERS, ids=lambda t: t.name)
@pytest.mark.parametrize("length", [70, 128, 301, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.13, 0.5, 0.97, 1.0])
def test_passkey_length_depth_answer(tok, length, depth):
  rng = np.random.default_rng([length, int(depth * 100)])
  ex = make_passkey(rng, length, depth, tok)
  assert ex.prompt_ids.dtype == np.int32 and ex.length == length
  assert ex.prompt_ids[0] == tok.bos_id and not np.any(ex.prompt_ids[1:] < 3)
  assert re.fullmatch(r"\d{5}", ex.answer)
  text = tok.decode(ex.prompt_ids)
  assert text.endswith("What is the pass key? The pass key is ")
  # The number appears exactly once, and no other digit anywhere.
  assert re.findall(r"\d+", text) == [ex.answer]
  # The needle starts exactly at 1 + round(depth * filler tokens).
  needle = tok.encode(f"\nThe pass key is {ex.answer}.\n")
  question = tok.encode("\nWhat is the pass key? The pass key is ")
  num_filler = length - 1 - needle.size - question.size
  assert ex.needle_start == 1 + round(depth * num_filler)
  assert np.array_equal(ex.prompt_ids[ex.needle_start:ex.needle_start + needle.size], needle)
  assert np.array_equal(ex.answer_ids, tok.encode(ex.answer))


def test_passkey_varies_and_errors():
  tok = ByteTokenizer()
  rng = np.random.default_rng(0)
  answers = {make_passkey(rng, 100, 0.5, tok).answer for _ in range(50)}
  assert len(answers) > 45
  with pytest.raises(ValueError, match="depth"):
    make_passkey(rng, 100, 1.5, tok)
  with pytest.raises(ValueError, match=r"too short.*needs 64"):
    make_passkey(rng, 40, 0.5, tok)
  assert tasks.min_passkey_length(tok) == 64
  make_passkey(rng, 64, 0.5, tok)  # Exactly the minimum: no filler.


@pytest.mark.parametrize("tok", TOKENIZERS, ids=lambda t: t.name)
@pytest.mark.parametrize("num_keys", [1, 3, 6])
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_multikey_niah(tok, num_keys, depth):
  rng = np.random.default_rng([num_keys, int(depth * 10)])
  length = 900
  ex = make_multikey_niah(rng, length, depth, tok, num_keys=num_keys)
  assert ex.length == length and ex.prompt_ids[0] == tok.bos_id
  text = tok.decode(ex.prompt_ids)
  pairs = re.findall(r"\nThe magic number for (\w+) is (\d{5})\.\n", text)
  assert len(pairs) == num_keys
  keys, values = zip(*pairs)
  assert len(set(keys)) == num_keys and len(set(values)) == num_keys
  asked = re.search(r"What is the magic number for (\w+)\? The magic number for \1 is $",
                    text).group(1)
  assert dict(pairs)[asked] == ex.answer
  needle = tok.encode(f"\nThe magic number for {asked} is {ex.answer}.\n")
  assert np.array_equal(ex.prompt_ids[ex.needle_start:ex.needle_start + needle.size], needle)
  others = sum(tok.encode(f"\nThe magic number for {k} is {v}.\n").size for k, v in pairs)
  question = tok.encode(f"\nWhat is the magic number for {asked}? "
                        f"The magic number for {asked} is ")
  num_filler = length - 1 - others - question.size
  # Filler tokens before the asked needle = round(depth * filler).
  before_needles = sum(tok.encode(f"\nThe magic number for {k} is {v}.\n").size
                       for k, v in pairs[:keys.index(asked)])
  assert ex.needle_start - 1 - before_needles == round(depth * num_filler)


def test_multikey_errors():
  rng = np.random.default_rng(1)
  with pytest.raises(ValueError, match="too short"):
    make_multikey_niah(rng, 128, 0.5, ByteTokenizer(), num_keys=4)
  with pytest.raises(ValueError, match="num_keys"):
    make_multikey_niah(rng, 4000, 0.5, ByteTokenizer(), num_keys=0)


def test_score():
  assert score(" 01234\n", "01234")
  assert not score("1234", "01234")
  assert not score("01234 5", "01234")
  assert not score("", "01234")


@pytest.mark.parametrize("seq_len", [69, 256, 1000])
def test_passkey_training_row(seq_len):
  tok = ByteTokenizer()
  row = passkey_training_row(np.random.default_rng(seq_len), seq_len, tok)
  assert row.shape == (1, seq_len)
  assert np.array_equal(row.targets[0, :-1], row.tokens[0, 1:])
  assert np.all(row.segment_ids == 1) and np.array_equal(row.positions[0], np.arange(seq_len))
  mask = row.loss_mask[0] > 0
  assert mask.sum() == 6 and np.all(mask[-6:])  # 5 digits + EOS.
  answer_targets = row.targets[0, mask]
  assert answer_targets[-1] == tok.eos_id
  digits = tok.decode(answer_targets)
  prompt = tok.decode(row.tokens[0, :seq_len - 5])
  assert prompt.endswith("The pass key is ") and f"pass key is {digits}.\n" in prompt


def test_eval_examples_fixed():
  tok = ByteTokenizer()
  a = eval_examples("passkey", [100, 200], [0.0, 0.5, 1.0], 3, tok, seed=4)
  b = eval_examples("passkey", [100, 200], [0.0, 0.5, 1.0], 3, tok, seed=4)
  assert len(a) == 18 and [e.length for e in a] == [100] * 9 + [200] * 9
  assert all(np.array_equal(x.prompt_ids, y.prompt_ids) and x.answer == y.answer
             for x, y in zip(a, b))
  c = eval_examples("multikey", [400], [0.5], 2, tok, num_keys=2)
  assert [e.task for e in c] == ["multikey"] * 2
  with pytest.raises(ValueError, match="unknown task"):
    eval_examples("nope", [100], [0.5], 1, tok)
