from __future__ import annotations

import numpy as np
import pytest

from lcjax.data.tokenizer import ByteTokenizer, Tokenizer


@pytest.mark.parametrize("text", [
    "", "hello world", "def f(x):\n\treturn x  # ok\n",
    "naïve café — Grüße, 東京, ☃, 🎉🦀, e\u0301", "\x00\x7f control",
])
def test_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.size == len(text.encode("utf-8"))
  assert np.all(ids >= 3) and np.all(ids < tok.vocab_size)
  assert tok.decode(ids) == text
  assert tok.decode(ids.tolist()) == text


def test_ids_are_bytes_plus_three():
  tok = ByteTokenizer()
  assert tok.encode("A\u00e9").tolist() == [ord("A") + 3, 0xC3 + 3, 0xA9 + 3]
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)


def test_decode_skips_specials_and_replaces_invalid_utf8():
  tok = ByteTokenizer()
  ids = np.concatenate([[tok.bos_id], tok.encode("ab"), [tok.eos_id, tok.pad_id],
                        tok.encode("c")])
  assert tok.decode(ids) == "abc"
  # 0xFF is never valid UTF-8; a lone continuation byte neither.
  assert tok.decode([ord("x") + 3, 0xFF + 3, 0x80 + 3, ord("y") + 3]) == "x\ufffd\ufffdy"


def test_decode_rejects_ids_outside_vocab():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="259"):
    tok.decode([5, 259])
  with pytest.raises(ValueError, match="-1"):
    tok.decode([-1])


def test_encode_rejects_bytes():
  with pytest.raises(TypeError, match="str"):
    ByteTokenizer().encode(b"abc")


def test_satisfies_protocol():
  assert isinstance(ByteTokenizer(), Tokenizer)
