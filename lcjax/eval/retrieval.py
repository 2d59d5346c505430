"""Exact-match accuracy on synthetic retrieval tasks (passkey, multi-key NIAH).

Answers are decoded greedily. Without a KV cache each new token re-runs the
forward pass over a fixed-size buffer (static shapes, one compilation); this is
cheap at the short lengths used during training. Long-context evaluation uses
the inference engine instead.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.data import tasks
from lcjax.model import Decoder


def greedy_continuations(model: Decoder, params, prompts_NxL: np.ndarray,
                         max_new: int, vocab_limit: int) -> np.ndarray:
  """``[N, max_new]`` greedy continuations of equal-length prompts.

  Only ids below ``vocab_limit`` (the tokenizer's vocabulary; the model's is
  padded) can be chosen.
  """
  N, L = prompts_NxL.shape

  @jax.jit
  def next_token(params, buf_NxT, index):
    h_NxTxD = model.apply({"params": params}, buf_NxT, method=Decoder.hidden)
    h_Nx1xD = jax.lax.dynamic_slice_in_dim(h_NxTxD, index - 1, 1, axis=1)
    logits = model.apply({"params": params}, h_Nx1xD, method=Decoder.logits)
    return jnp.argmax(logits[:, 0, :vocab_limit], axis=-1).astype(jnp.int32)

  buf = jnp.zeros((N, L + max_new), jnp.int32).at[:, :L].set(prompts_NxL)
  for i in range(max_new):
    buf = buf.at[:, L + i].set(next_token(params, buf, L + i))
  return np.asarray(buf[:, L:])


def retrieval_accuracy(model: Decoder, params, tokenizer, make_example: Callable,
                       lengths, depths, samples: int, seed: int = 0
                       ) -> dict[tuple[int, float], float]:
  """Accuracy for each (length, depth); ``make_example(rng, length, depth, tok)``."""
  results = {}
  for length in lengths:
    for depth in depths:
      rng = np.random.default_rng([seed, length, int(depth * 1000)])
      examples = [make_example(rng, length, depth, tokenizer) for _ in range(samples)]
      prompts = np.stack([e.prompt_ids for e in examples])
      max_new = max(len(tokenizer.encode(e.answer)) for e in examples) + 1
      outputs = greedy_continuations(model, params, prompts, max_new,
                                     tokenizer.vocab_size)
      hits = [tasks.score(_decode_until_eos(out, tokenizer), e.answer)
              for out, e in zip(outputs, examples)]
      results[(length, depth)] = float(np.mean(hits))
  return results


def _decode_until_eos(ids: np.ndarray, tokenizer) -> str:
  ids = list(ids)
  if tokenizer.eos_id in ids:
    ids = ids[: ids.index(tokenizer.eos_id)]
  return tokenizer.decode(np.asarray(ids, np.int32))
