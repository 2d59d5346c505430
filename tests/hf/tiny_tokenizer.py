"""A tiny byte-level BPE ``tokenizer.json`` for the tests."""
from __future__ import annotations

import os

import pytest

tokenizers = pytest.importorskip("tokenizers")

TEXT = ["def add(a, b):\n    return a + b\n", "The passkey is 31415. Remember it.",
        "import numpy as np\nx = np.zeros(3)\n", "ünïcödé — and emoji 🙂"] * 20


def write_bpe_tokenizer(folder: str, vocab_size: int = 300,
                        specials=("<s>", "</s>", "<pad>")):
  """A byte-level BPE tokenizer (any text encodes) saved as ``tokenizer.json``."""
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXT, trainer)
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  return tok
