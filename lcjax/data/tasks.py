"""Synthetic long-context tasks with exact-match scoring.

* Passkey retrieval (Mohtashami & Jaggi, 2023, "Landmark Attention"): a random
  number is hidden in filler text at a chosen depth; the prompt ends by asking
  for it.
* Multi-key needle in a haystack (Hsieh et al., 2024, "RULER"): several
  ``key -> number`` needles are hidden; the prompt asks for one of them.

Numbers are random digit strings of fixed length (default 5) and the filler
contains no digits, so nothing but retrieval gives the answer. Filler is
random sentences drawn from a small digit-free list. Prompts are built at the
token level, so they are exactly ``length_tokens`` long for any tokenizer, and
start with BOS like every training document. ``depth`` is the fraction of
filler tokens before the needle: the needle starts at token
``1 + round(depth * num_filler_tokens)``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from lcjax.data.packing import Batch
from lcjax.data.tokenizer import Tokenizer

TASKS = ("passkey", "multikey")

_FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is warm today.",
    "The river runs down to the sea.", "Birds sing in the early morning.",
    "The road goes on and on.", "Clouds drift slowly over the hills.",
    "The wind moves the tall trees.", "Snow falls on the quiet town.",
    "A cat sleeps by the open door.", "A small boat crosses the lake.",
    "Stars shine above the dark field.", "Here we go again.",
    "There and back once more.",
)
_KEYS = (
    "apple", "river", "candle", "marble", "violet", "harbor", "pepper", "falcon",
    "meadow", "copper", "lantern", "pebble", "orchid", "thunder", "walnut", "glacier",
    "saffron", "compass", "willow", "ember", "quartz", "tundra", "velvet", "cobalt",
    "juniper", "summit", "anchor", "badger", "cactus", "dolphin", "fjord", "granite",
)


@dataclasses.dataclass(frozen=True)
class Example:
  """A prompt (int32 token ids, starting with BOS) and its expected answer."""
  prompt_ids: np.ndarray
  answer: str
  answer_ids: np.ndarray
  needle_start: int  # Token index in prompt_ids where the asked-for needle begins.
  depth: float
  task: str

  @property
  def length(self) -> int:
    return int(self.prompt_ids.size)


def score(prediction: str, answer: str) -> bool:
  """Exact match of the whitespace-stripped prediction and answer."""
  return prediction.strip() == answer.strip()


def make_passkey(rng: np.random.Generator, length_tokens: int, depth: float,
                 tokenizer: Tokenizer, *, digits: int = 5) -> Example:
  """A passkey prompt of exactly ``length_tokens`` tokens; answer = the digits."""
  return _passkey(rng, length_tokens, depth, tokenizer, _digits(rng, digits))


def make_multikey_niah(rng: np.random.Generator, length_tokens: int, depth: float,
                       tokenizer: Tokenizer, *, num_keys: int = 4,
                       digits: int = 5) -> Example:
  """``num_keys`` needles ``key -> number``; the asked-for one sits at ``depth``,
  the others at uniformly random depths. Answer = the asked key's number."""
  if not 1 <= num_keys <= MAX_NIAH_KEYS:
    raise ValueError(f"num_keys must be in [1, {MAX_NIAH_KEYS}], got {num_keys}")
  keys = [_KEYS[i] for i in rng.choice(len(_KEYS), size=num_keys, replace=False)]
  values: list[str] = []
  while len(values) < num_keys:
    v = _digits(rng, digits)
    if v not in values:
      values.append(v)
  return _multikey(rng, length_tokens, depth, tokenizer, keys, values)


def make_example(task: str, rng: np.random.Generator, length_tokens: int, depth: float,
                 tokenizer: Tokenizer, **kwargs) -> Example:
  """``make_passkey`` or ``make_multikey_niah`` by name (see ``TASKS``)."""
  if task == "passkey":
    return make_passkey(rng, length_tokens, depth, tokenizer, **kwargs)
  if task == "multikey":
    return make_multikey_niah(rng, length_tokens, depth, tokenizer, **kwargs)
  raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def eval_examples(task: str, lengths: Sequence[int], depths: Sequence[float],
                  samples: int, tokenizer: Tokenizer, *, seed: int = 0,
                  **kwargs) -> list[Example]:
  """A fixed evaluation set: ``samples`` examples per (length, depth) cell.

  Each cell has its own RNG stream, so adding a length leaves the others as
  they were.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
  out = []
  for length in lengths:
    for d_index, depth in enumerate(depths):
      rng = np.random.default_rng([seed, TASKS.index(task), int(length), d_index])
      out.extend(make_example(task, rng, int(length), float(depth), tokenizer, **kwargs)
                 for _ in range(samples))
  return out


def passkey_training_row(rng: np.random.Generator, seq_len: int, tokenizer: Tokenizer,
                         *, digits: int = 5) -> Batch:
  """A ``[1, seq_len]`` training row: prompt + answer + EOS, one segment.

  The loss mask covers only the answer tokens and the EOS after them (learning
  retrieval, not the filler); the depth is uniform in [0, 1].
  """
  key = _digits(rng, digits)
  answer_ids = tokenizer.encode(key)
  # prompt + answer + EOS = seq_len + 1 tokens (the +1 is the last target).
  example = _passkey(rng, seq_len - answer_ids.size, float(rng.uniform()), tokenizer, key)
  return _training_row(example, seq_len, tokenizer)


def multikey_training_row(rng: np.random.Generator, seq_len: int, tokenizer: Tokenizer,
                          *, num_keys: int = 4, digits: int = 5) -> Batch:
  """Like :func:`passkey_training_row` for a multi-key NIAH prompt."""
  n_answer = len(tokenizer.encode("0" * digits))
  example = make_multikey_niah(rng, seq_len - n_answer, float(rng.uniform()), tokenizer,
                               num_keys=num_keys, digits=digits)
  return _training_row(example, seq_len, tokenizer)


def _training_row(example: Example, seq_len: int, tokenizer: Tokenizer) -> Batch:
  ids = np.concatenate([example.prompt_ids, example.answer_ids,
                        np.array([tokenizer.eos_id], np.int32)])
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[example.length - 1:] = 1.0  # Targets ids[prompt_len:] = answer + EOS.
  return Batch(tokens=ids[None, :-1].astype(np.int32), targets=ids[None, 1:].astype(np.int32),
               segment_ids=np.ones((1, seq_len), np.int32),
               positions=np.arange(seq_len, dtype=np.int32)[None],
               loss_mask=loss_mask[None])


def min_passkey_length(tokenizer: Tokenizer, *, digits: int = 5) -> int:
  """The shortest passkey prompt (no filler) for this tokenizer."""
  key = "0" * digits
  return 1 + _encode(tokenizer, _passkey_needle(key)).size + _encode(
      tokenizer, _PASSKEY_QUESTION).size


def min_multikey_length(tokenizer: Tokenizer, *, num_keys: int = 4, digits: int = 5) -> int:
  """The shortest multi-key NIAH prompt (no filler): the longest keys' needles."""
  longest = sorted(_KEYS, key=len)[-num_keys:]
  needles = sum(_encode(tokenizer, _multikey_needle(k, "0" * digits)).size for k in longest)
  return 1 + needles + _encode(tokenizer, _multikey_question(longest[-1])).size


MAX_NIAH_KEYS = len(_KEYS)
_PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is "


def _multikey_needle(key: str, value: str) -> str:
  return f"\nThe magic number for {key} is {value}.\n"


def _multikey_question(key: str) -> str:
  return f"\nWhat is the magic number for {key}? The magic number for {key} is "


def _passkey_needle(key: str) -> str:
  return f"\nThe pass key is {key}.\n"


def _passkey(rng, length_tokens, depth, tokenizer, key) -> Example:
  needle = _encode(tokenizer, _passkey_needle(key))
  question = _encode(tokenizer, _PASSKEY_QUESTION)
  num_filler = length_tokens - 1 - needle.size - question.size
  _check(length_tokens, depth, num_filler, "passkey")
  at = round(depth * num_filler)
  before = _filler(rng, at, tokenizer, keep="tail")
  after = _filler(rng, num_filler - at, tokenizer, keep="head")
  prompt = np.concatenate([[tokenizer.bos_id], before, needle, after, question])
  return Example(prompt.astype(np.int32), key, tokenizer.encode(key), 1 + at, depth,
                 "passkey")


def _multikey(rng, length_tokens, depth, tokenizer, keys, values) -> Example:
  needles = [_encode(tokenizer, _multikey_needle(k, v)) for k, v in zip(keys, values)]
  asked = 0  # keys are already in random order.
  question = _encode(tokenizer, _multikey_question(keys[asked]))
  num_filler = length_tokens - 1 - sum(n.size for n in needles) - question.size
  _check(length_tokens, depth, num_filler, f"multikey ({len(keys)} keys)")
  at = [round(depth * num_filler)] + [int(rng.integers(0, num_filler + 1))
                                      for _ in keys[1:]]
  order = sorted(range(len(keys)), key=lambda i: (at[i], i))  # asked first on ties.
  pieces, cursor, size, needle_start = [np.array([tokenizer.bos_id])], 0, 1, 0
  for i in order:
    pieces.append(_filler(rng, at[i] - cursor, tokenizer, keep="tail"))
    size += at[i] - cursor
    if i == asked:
      needle_start = size
    pieces.append(needles[i])
    size += needles[i].size
    cursor = at[i]
  pieces += [_filler(rng, num_filler - cursor, tokenizer, keep="head"), question]
  prompt = np.concatenate(pieces).astype(np.int32)
  return Example(prompt, values[asked], tokenizer.encode(values[asked]), needle_start,
                 depth, "multikey")


def _check(length_tokens, depth, num_filler, what) -> None:
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  if num_filler < 0:
    raise ValueError(f"length_tokens={length_tokens} is too short for a {what} prompt: "
                     f"the fixed text alone needs {length_tokens - num_filler} tokens")


def _digits(rng, n: int) -> str:
  if n < 1:
    raise ValueError(f"digits must be >= 1, got {n}")
  return "".join(str(d) for d in rng.integers(0, 10, size=n))


def _encode(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), dtype=np.int32)


def _filler(rng, num_tokens: int, tokenizer, keep: str) -> np.ndarray:
  """``num_tokens`` tokens of random filler sentences, cut to length keeping
  the ``"head"`` or the ``"tail"``: filler before a needle keeps its tail so
  the needle follows a whole sentence; filler after it keeps its head."""
  sentences = [_encode(tokenizer, s + " ") for s in _FILLER]
  mean = sum(s.size for s in sentences) / len(sentences)
  pieces, total = [], 0
  while total < num_tokens:
    for i in rng.integers(0, len(sentences), size=int(num_tokens / mean) + 4):
      pieces.append(sentences[i])
      total += sentences[i].size
      if total >= num_tokens:
        break
  if not pieces:
    return np.zeros(0, np.int32)
  stream = np.concatenate(pieces)
  return stream[:num_tokens] if keep == "head" else stream[stream.size - num_tokens:]
