"""Inference engine: chunked prefill and jit-compiled decoding over per-kind KV caches.

The engine runs the model's own modules: ``Decoder.embed``, then every
``DecoderLayer`` one by one with its slice of the stacked parameters and its
own cache (the ``"cache"`` collection that ``SelfAttention`` reads and writes,
see :mod:`lcjax.inference.kv_cache`), then the final norm and ``Decoder.logits``.
Layers are unrolled rather than scanned so that each cache is its own buffer,
updated in place (the caches are donated to every step).

* Prefill runs the prompt in chunks of ``prefill_chunk`` tokens: activation
  memory is bounded by the chunk, and each chunk attends to the caches
  filled by the chunks before it. Prompts of different lengths are right-padded;
  padding is never written to a cache.
* Decoding is one compiled ``lax.scan`` over steps with static shapes; each
  row continues at its own position.
* Caches per layer kind: full layers keep every token, sink + window layers a
  ring of ``sink + window`` slots, strided layers the blocks later queries can
  reach (:func:`kv_report` says how many bytes each kind takes).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import Causal
from lcjax.config import ModelConfig
from lcjax.inference import kv_cache
from lcjax.inference.sampling import Sampling, sample
from lcjax.model import Decoder, schedule
from lcjax.model.dtypes import dtype_of
from lcjax.model.transformer import DecoderLayer


@flax.struct.dataclass
class DecodeState:
  """Per-layer caches and, per row, how many tokens have been consumed."""
  caches: list[Any]
  lengths: jax.Array  # [B] int32: the next position of each row


def _final(module: Decoder, h_BxTxD):
  return module.logits(module.final_norm(h_BxTxD))


class Engine:
  """Serves one model: ``prefill`` prompts, then ``step`` / ``decode`` / ``generate``."""

  def __init__(self, cfg: ModelConfig, params: Any, *, max_len: int,
               prefill_chunk: int = 512, cache_dtype: str | None = None,
               slot_multiple: int = 64, vocab_limit: int | None = None):
    if cfg.rope.dca_chunk_size:
      raise NotImplementedError("KV-cache decoding with Dual Chunk Attention "
                                f"(rope.dca_chunk_size={cfg.rope.dca_chunk_size}) is not "
                                "implemented; set rope.dca_chunk_size=0")
    if max_len < 1 or prefill_chunk < 1:
      raise ValueError(f"max_len={max_len} and prefill_chunk={prefill_chunk} must be >= 1")
    self.cfg = cfg
    self.max_len = int(max_len)
    self.prefill_chunk = int(prefill_chunk)
    self.slot_multiple = int(slot_multiple)
    self.cache_dtype = dtype_of(cache_dtype or cfg.dtype)
    # Sampling never picks ids >= vocab_limit (the tokenizer's vocabulary when
    # the embedding table is padded beyond it).
    self.vocab_limit = vocab_limit
    self.model = Decoder(cfg)
    self.kinds = schedule.layer_kinds(cfg)
    patterns = {k: schedule.pattern_for(k, cfg.attention) for k in set(self.kinds)}
    for pattern in patterns.values():
      kv_cache.check_causal(pattern)
    self.modules = {k: DecoderLayer(cfg, p) for k, p in patterns.items()}
    self.layouts = {k: kv_cache.plan_layout(p, cfg, self.max_len, slot_multiple)
                    for k, p in patterns.items()}
    params = nn.unbox(params)
    self.top_params = {k: v for k, v in params.items() if not k.startswith("group_")}
    self.layer_params = schedule.unstack_layers(params)
    if len(self.layer_params) != cfg.num_layers:
      raise ValueError(f"params have {len(self.layer_params)} layers but the config has "
                       f"num_layers={cfg.num_layers}")
    self._prefill_first_fn = jax.jit(functools.partial(self._prefill_chunk, offset=0),
                                     donate_argnums=(2,))
    self._prefill_chunk_fn = jax.jit(self._prefill_chunk, donate_argnums=(2,))
    self._step_fn = jax.jit(self._step, donate_argnums=(2,))
    self._decode_fn = jax.jit(self._decode, donate_argnums=(2,),
                              static_argnames=("num_steps", "sampling"))
    self._logits_fn = jax.jit(self._logits)

  # ------------------------------------------------------------------ caches

  def init_caches(self, batch: int) -> list[Any]:
    return [{"attn": kv_cache.init_cache(self.layouts[k], self.cfg, batch, self.cache_dtype)}
            for k in self.kinds]

  def kv_report(self, batch: int = 1) -> dict[str, Any]:
    """Bytes of KV cache per layer kind for ``batch`` rows of ``max_len`` tokens,
    against the cache of the same model with full attention in every layer."""
    per_token = 2 * self.cfg.num_kv_heads * self.cfg.head_dim * self.cache_dtype.itemsize
    full_slots = kv_cache.plan_layout(Causal(), self.cfg, self.max_len,
                                      self.slot_multiple).num_slots
    full_per_layer = batch * full_slots * per_token
    kinds = {}
    for kind in dict.fromkeys(self.kinds):
      layout = self.layouts[kind]
      n = self.kinds.count(kind)
      kv = batch * layout.num_slots * per_token
      index = batch * layout.num_slots * 4 * (self.cfg.num_kv_heads if layout.per_kv_head else 1)
      kinds[kind] = {"layers": n, "layout": layout.name, "slots": layout.num_slots,
                     "kv_bytes_per_layer": kv, "kv_bytes": n * kv, "index_bytes": n * index}
    total = sum(v["kv_bytes"] for v in kinds.values())
    full = self.cfg.num_layers * full_per_layer
    return {"max_len": self.max_len, "batch": batch, "kinds": kinds, "kv_bytes": total,
            "full_attention_kv_bytes": full, "reduction": 1.0 - total / full}

  # ------------------------------------------------------------- forward

  def _layers(self, layer_params, caches, x_BxTxD, positions_BxT, segment_ids_BxT):
    new_caches = []
    for kind, params, cache in zip(self.kinds, layer_params, caches):
      (x_BxTxD, _), updated = self.modules[kind].apply(
          {"params": params, "cache": cache}, x_BxTxD, positions_BxT, segment_ids_BxT,
          mutable=["cache"])
      new_caches.append(updated["cache"])
    return x_BxTxD, new_caches

  def _embed(self, top, tokens_BxT):
    return self.model.apply({"params": top}, tokens_BxT, method=Decoder.embed)

  def _logits(self, top, h_BxTxD):
    logits = self.model.apply({"params": top}, h_BxTxD, method=_final)
    if self.vocab_limit is not None:
      ids = jnp.arange(logits.shape[-1])
      logits = jnp.where(ids < self.vocab_limit, logits, -jnp.inf)
    return logits

  def _prefill_chunk(self, top, layer_params, caches, tokens_BxC, lengths_B, last_h_BxD,
                     offset):
    B, C = tokens_BxC.shape
    if isinstance(offset, int):  # the first chunk: static positions, so attention
      with jax.ensure_compile_time_eval():  # sees offset 0 (empty cache, fast path)
        positions = jnp.broadcast_to(offset + jnp.arange(C, dtype=jnp.int32), (B, C))
    else:
      positions = jnp.broadcast_to(offset + jnp.arange(C, dtype=jnp.int32), (B, C))
    valid = positions < lengths_B[:, None]
    x = self._embed(top, tokens_BxC)
    x, caches = self._layers(layer_params, caches, x, positions, valid.astype(jnp.int32))
    last = lengths_B - 1 - offset  # the row's last prompt token, if in this chunk
    picked = jnp.take_along_axis(x, jnp.clip(last, 0, C - 1)[:, None, None], axis=1)[:, 0]
    in_chunk = (last >= 0) & (last < C)
    return caches, jnp.where(in_chunk[:, None], picked, last_h_BxD)

  def _step(self, top, layer_params, caches, tokens_B, positions_B):
    x = self._embed(top, tokens_B[:, None])
    x, caches = self._layers(layer_params, caches, x, positions_B[:, None], None)
    return caches, self._logits(top, x)[:, 0]

  def _decode(self, top, layer_params, caches, tokens_B, positions_B, key, *,
              num_steps: int, sampling: Sampling):
    def one(carry, step_key):
      caches, tokens, positions = carry
      caches, logits = self._step(top, layer_params, caches, tokens, positions)
      nxt = sample(logits, step_key, sampling)
      return (caches, nxt, positions + 1), nxt

    (caches, _, positions), out = jax.lax.scan(
        one, (caches, tokens_B, positions_B), jax.random.split(key, num_steps))
    return caches, positions, out.T

  # ------------------------------------------------------------------ API

  def prefill(self, prompts: Sequence[np.ndarray], chunk: int | None = None
              ) -> tuple[DecodeState, jax.Array]:
    """Runs the prompts (1-D int arrays, any lengths >= 1); returns the state and
    the logits ``[B, vocab]`` after each prompt's last token."""
    chunk = int(chunk or self.prefill_chunk)
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
      raise ValueError("prefill needs at least one prompt, each of length >= 1")
    if lengths.max() > self.max_len:
      raise ValueError(f"a prompt has {lengths.max()} tokens but max_len={self.max_len}")
    B = len(prompts)
    # A prompt shorter than a chunk is padded to a multiple of 128, not to the chunk.
    chunk = min(chunk, -(-int(lengths.max()) // 128) * 128)
    padded = -(-int(lengths.max()) // chunk) * chunk
    tokens = np.zeros((B, padded), np.int32)
    for b, p in enumerate(prompts):
      tokens[b, :len(p)] = np.asarray(p, np.int32)
    caches = self.init_caches(B)
    last_h = jnp.zeros((B, self.cfg.embed_dim), dtype_of(self.cfg.dtype))
    lengths_j = jnp.asarray(lengths)
    for start in range(0, padded, chunk):
      args = (self.top_params, self.layer_params, caches,
              jnp.asarray(tokens[:, start:start + chunk]), lengths_j, last_h)
      if start == 0:
        caches, last_h = self._prefill_first_fn(*args)
      else:
        caches, last_h = self._prefill_chunk_fn(*args, jnp.int32(start))
    logits = self._logits_fn(self.top_params, last_h[:, None])[:, 0]
    return DecodeState(caches, lengths_j), logits

  def step(self, state: DecodeState, tokens_B) -> tuple[DecodeState, jax.Array]:
    """Feeds one token per row (at the row's next position); returns its logits."""
    self._check_room(state, 1)
    caches, logits = self._step_fn(self.top_params, self.layer_params, state.caches,
                                   jnp.asarray(tokens_B, jnp.int32), state.lengths)
    return DecodeState(caches, state.lengths + 1), logits

  def decode(self, state: DecodeState, first_tokens_B, num_steps: int,
             sampling: Sampling = Sampling(), seed: int = 0
             ) -> tuple[DecodeState, jax.Array]:
    """Feeds ``first_tokens`` and samples ``num_steps`` tokens after it (one
    compiled loop); returns ``[B, num_steps]``."""
    self._check_room(state, num_steps)
    caches, lengths, tokens = self._decode_fn(
        self.top_params, self.layer_params, state.caches,
        jnp.asarray(first_tokens_B, jnp.int32), state.lengths, jax.random.key(seed),
        num_steps=num_steps, sampling=sampling)
    return DecodeState(caches, lengths), tokens

  def generate(self, prompts: Sequence[np.ndarray], max_new: int,
               sampling: Sampling = Sampling(), seed: int = 0) -> np.ndarray:
    """``[B, max_new]`` continuations of prompts of any lengths."""
    if max_new < 1:
      raise ValueError(f"max_new={max_new} must be >= 1")
    state, logits = self.prefill(prompts)
    first = sample(logits, jax.random.key(seed + 1), sampling)
    if max_new == 1:
      return np.asarray(first)[:, None]
    _, rest = self.decode(state, first, max_new - 1, sampling, seed)
    return np.concatenate([np.asarray(first)[:, None], np.asarray(rest)], axis=1)

  def _check_room(self, state: DecodeState, steps: int) -> None:
    longest = int(jnp.max(state.lengths)) + steps
    if longest > self.max_len:
      raise ValueError(f"decoding {steps} more token(s) reaches position {longest} but the "
                       f"engine was built with max_len={self.max_len}")
