"""Long-context evaluation with the inference engine.

* :func:`retrieval_grid`: exact-match accuracy of greedy answers on passkey or
  multi-key NIAH prompts (``lcjax.data.tasks``) over lengths x depths, one
  batch of prompts per cell, decoded with the KV caches of the model's kinds.
* :func:`perplexity_by_position`: next-token perplexity of held-out text in
  position buckets -- does the model use (or at least survive) the longer context?
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.data import tasks
from lcjax.inference.engine import Engine
from lcjax.model import Decoder


def _answer(ids: np.ndarray, tokenizer) -> str:
  ids = list(ids)
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode(np.asarray(ids, np.int32))


def retrieval_grid(engine: Engine, tokenizer, task: str, lengths: Sequence[int],
                   depths: Sequence[float], samples: int, seed: int = 0, **task_kwargs
                   ) -> dict[tuple[int, float], float]:
  """``{(length, depth): accuracy}`` of greedy answers (``task``: see ``tasks.TASKS``;
  ``task_kwargs`` such as ``num_keys`` go to the task's prompt builder)."""
  examples = tasks.eval_examples(task, lengths, depths, samples, tokenizer, seed=seed,
                                 **task_kwargs)
  out = {}
  for start in range(0, len(examples), samples):
    cell = examples[start:start + samples]
    max_new = max(e.answer_ids.size for e in cell) + 1
    generated = engine.generate([e.prompt_ids for e in cell], max_new)
    hits = [tasks.score(_answer(g, tokenizer), e.answer) for g, e in zip(generated, cell)]
    out[(cell[0].length, cell[0].depth)] = float(np.mean(hits))
  return out


def perplexity_by_position(model: Decoder, params: Any, batches, num_buckets: int = 8
                           ) -> list[dict[str, float]]:
  """Per position bucket ``[start, end)``: perplexity of the counted tokens.

  ``batches``: ``lcjax.data.packing.Batch`` rows of one length (windows of a
  held-out split). A token's position is its index in its document (rows cut
  across documents restart at 0), so a bucket holds tokens with that much context.
  """
  @jax.jit
  def token_nll(params, tokens, positions, segment_ids, targets):
    logits = model.apply({"params": params}, tokens, positions, segment_ids)
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, targets[..., None], -1)[..., 0]

  T = batches[0].tokens.shape[1]
  sums, counts = np.zeros(T), np.zeros(T)
  for batch in batches:
    nll = np.asarray(token_nll(params, batch.tokens, batch.positions, batch.segment_ids,
                               batch.targets), np.float64)
    mask = np.asarray(batch.loss_mask) > 0
    pos = np.clip(np.asarray(batch.positions), 0, T - 1)
    sums += np.bincount(pos[mask], weights=nll[mask], minlength=T)
    counts += np.bincount(pos[mask], minlength=T)
  edges = np.linspace(0, T, num_buckets + 1).astype(int)
  return [{"start": int(a), "end": int(b), "tokens": int(counts[a:b].sum()),
           "ppl": float(np.exp(sums[a:b].sum() / max(counts[a:b].sum(), 1.0)))}
          for a, b in zip(edges[:-1], edges[1:])]
