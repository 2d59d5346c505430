"""Per-shard pieces shared by the context-parallel strategies.

* :func:`pair_attention`: ``attend`` on one run of queries against one run of
  keys, chosen per device at run time (SKIP / PARTIAL / FULL) with
  ``lax.switch`` when the kind differs between devices.
* :func:`merge`: combines partial results by log-sum-exp in float32.
* :func:`pair_grads`: the exact gradient of one pair's contribution to the
  *merged* output, given the final output and log-sum-exp (the FlashAttention
  backward with global statistics: ``attend_backward``, no forward pass; or
  ``jax.vjp`` of ``attend`` for implementations without a backward entry).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import attend, attend_backward, choose_implementation
from lcjax.attention import patterns as P
from lcjax.parallel.plan import FULL, PARTIAL, SKIP


@dataclasses.dataclass(frozen=True)
class AttendArgs:
  """What every local ``attend`` call shares."""
  pattern: P.Pattern
  scale: float | None
  softcap: float | None
  implementation: str

  @property
  def full_pattern(self) -> P.Pattern:
    """The mask-free pattern for FULL pairs (the pattern itself if it has
    segment exemptions, which ``Full`` would drop)."""
    return self.pattern if self.pattern.has_segment_exemptions else P.Full()

  def call(self, kind: int, q, k, v, q_seg, kv_seg, q_offset, kv_offset):
    pattern = self.full_pattern if kind == FULL else self.pattern
    return attend(q, k, v, pattern, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                  q_offset=q_offset, kv_offset=kv_offset, scale=self.scale,
                  softcap=self.softcap, return_lse=True,
                  implementation=self.implementation)

  def backward(self, kind: int, q, k, v, q_seg, kv_seg, q_offset, kv_offset,
               out, lse, d_out):
    """``attend_backward`` with the rows' final ``out``/``lse``, or None if the
    forward's implementation has no backward entry (chunked, cuDNN)."""
    pattern = self.full_pattern if kind == FULL else self.pattern
    impl = self.implementation
    if impl == "auto":
      impl = choose_implementation(q, k, v, pattern, q_segment_ids=q_seg,
                                   kv_segment_ids=kv_seg, q_offset=q_offset,
                                   kv_offset=kv_offset, softcap=self.softcap,
                                   return_lse=True)
    if impl not in ("reference", "pallas"):
      return None
    return attend_backward(q, k, v, pattern, out, lse, d_out, q_segment_ids=q_seg,
                           kv_segment_ids=kv_seg, q_offset=q_offset,
                           kv_offset=kv_offset, scale=self.scale,
                           softcap=self.softcap, implementation=impl)


def _switch(kinds: np.ndarray, index, branches: dict[int, Any], *operands):
  """Runs ``branches[kinds[index]]`` (``index``: traced indices into the static
  table ``kinds``); a static call when the whole table agrees."""
  present = sorted(set(int(x) for x in np.unique(kinds)))
  if len(present) == 1:
    return branches[present[0]](*operands)
  lookup = np.full(3, 0, np.int32)
  for i, kind in enumerate(present):
    lookup[kind] = i
  which = jnp.asarray(lookup[np.asarray(kinds)], jnp.int32)[index]
  return jax.lax.switch(which, [branches[k] for k in present], *operands)


def pair_attention(args: AttendArgs, kinds: np.ndarray, index, q, k, v, q_seg,
                   kv_seg, q_offset, kv_offset):
  """``(out, lse)`` of one pair; ``kinds[index]`` is this device's kind."""
  B, T, N, _ = q.shape

  def skip(*_):
    return jnp.zeros_like(q), jnp.full((B, N, T), -jnp.inf, jnp.float32)

  def run(kind):
    return lambda q, k, v, qs, ks, qo, ko: args.call(kind, q, k, v, qs, ks, qo, ko)

  branches = {SKIP: skip, PARTIAL: run(PARTIAL), FULL: run(FULL)}
  return _switch(kinds, index, branches, q, k, v, q_seg, kv_seg, q_offset,
                 kv_offset)


def _weights(lse_part_BxNxT, lse_BxNxT):
  safe = jnp.where(jnp.isfinite(lse_BxNxT), lse_BxNxT, 0.0)
  return jnp.where(jnp.isfinite(lse_part_BxNxT), jnp.exp(lse_part_BxNxT - safe), 0.0)


def merge(acc, part):
  """``(out f32, lse)`` accumulators merged with a partial ``(out, lse)``."""
  o_acc, lse_acc = acc
  o, lse = part
  lse_new = jnp.logaddexp(lse_acc, lse)
  w_acc = _weights(lse_acc, lse_new).transpose(0, 2, 1)[..., None]
  w = _weights(lse, lse_new).transpose(0, 2, 1)[..., None]
  return o_acc * w_acc + o.astype(jnp.float32) * w, lse_new


def empty_acc(q):
  B, T, N, H = q.shape
  return (jnp.zeros((B, T, N, H), jnp.float32),
          jnp.full((B, N, T), -jnp.inf, jnp.float32))


def pair_grads(args: AttendArgs, kinds: np.ndarray, index, q, k, v, q_seg,
               kv_seg, q_offset, kv_offset, out, do_f32, lse_BxNxT, delta_BxNxT):
  """``(dq, dk, dv)`` in float32 of one pair's share of the merged output.

  The FlashAttention backward with the merged ``out``/``lse`` of the query rows
  is exactly this share (``attend_backward``; no forward pass). Without a
  backward entry it is derived from the pair's own forward: with ``(o_p,
  lse_p)`` and weight ``w = exp(lse_p - lse)`` the merged output is ``sum_p
  w_p o_p``, so the pair receives ``d o_p = w d o`` and ``d lse_p = w (<d o,
  o_p> - <d o, o>)`` through ``jax.vjp`` of ``attend``.
  """
  def skip(q, k, v, *_):
    return (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
            jnp.zeros(v.shape, jnp.float32))

  def run(kind):
    def grads(q, k, v, qs, ks, qo, ko):
      direct = args.backward(kind, q, k, v, qs, ks, qo, ko, out,
                             lse_BxNxT, do_f32)
      if direct is not None:
        return tuple(g.astype(jnp.float32) for g in direct)
      (o_p, lse_p), vjp = jax.vjp(
          lambda q, k, v: args.call(kind, q, k, v, qs, ks, qo, ko), q, k, v)
      w = _weights(lse_p, lse_BxNxT)
      do_p = (do_f32 * w.transpose(0, 2, 1)[..., None]).astype(o_p.dtype)
      dot = jnp.sum(do_f32 * o_p.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
      dlse_p = w * (dot - delta_BxNxT)
      dq, dk, dv = vjp((do_p, dlse_p))
      return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)
    return grads

  branches = {SKIP: skip, PARTIAL: run(PARTIAL), FULL: run(FULL)}
  return _switch(kinds, index, branches, q, k, v, q_seg, kv_seg, q_offset,
                 kv_offset)


def split_runs(x, num_runs: int, axis: int = 1) -> list:
  if x is None:
    return [None] * num_runs
  if num_runs == 1:
    return [x]
  n = x.shape[axis] // num_runs
  return [jax.lax.slice_in_dim(x, a * n, (a + 1) * n, axis=axis)
          for a in range(num_runs)]


def concat_runs(xs: list, axis: int = 1):
  return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=axis)
