"""``attend_backward``: the FlashAttention backward from the rows' final out/lse.

With a call's own out/lse it equals autodiff of the dense reference; with the
merged out/lse of rows whose keys are split in parts (ring attention), the
parts' gradients sum to the gradient over all keys. The portable kernel
(interpret mode) matches the reference. Fresh seeds (in every failure message),
GQA, odd lengths, segments, soft-cap, rows that see no key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import attend, attend_backward
from lcjax.attention import patterns as P
from lcjax.attention import reference
from lcjax.parallel.local import merge

PATTERNS = {
    "causal": P.Causal(),
    "sink_window": P.SinkWindow(sink=3, window=7),
    "strided_heads": P.StridedBlockSparse(block_size=4, stride=3, local_blocks=1),
    "anchor": P.Causal() | P.DocumentAnchor(),
}


def _inputs(seed, B=2, T=37, S=37, N=4, K=2, H=16, segments=False):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  seg_q = seg_k = None
  if segments:
    seg_q = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), 1), jnp.int32)
    seg_k = seg_q if S == T else jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), 1),
                                             jnp.int32)
  return f(B, T, N, H), f(B, S, K, H), f(B, S, K, H), f(B, T, N, H), seg_q, seg_k


def _seed():
  return int(np.random.SeedSequence().entropy % 2**32)


def _assert_close(got, want, seed, tol=2e-5):
  for name, a, b in zip(("dq", "dk", "dv"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(b).max() > 1e-3, f"{name}: trivial reference (seed {seed})"
    assert not np.isnan(a).any(), f"{name} has NaN (seed {seed})"
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=tol,
                               err_msg=f"{name} (seed {seed})")


@pytest.mark.parametrize("name", list(PATTERNS) + ["softcap", "offsets"])
def test_reference_backward_is_autodiff(name):
  """Own out/lse: equals jax.grad of dense attention (GQA, odd lengths)."""
  seed = _seed()
  pattern = PATTERNS.get(name, P.Causal())
  q, k, v, ct, seg_q, seg_k = _inputs(seed, segments=name == "anchor")
  kw = dict(q_segment_ids=seg_q, kv_segment_ids=seg_k,
            softcap=3.0 if name == "softcap" else None,
            # queries before every key: their rows see nothing (lse = -inf)
            q_offset=0 if name != "offsets" else 5, kv_offset=0 if name != "offsets" else 9)
  out, lse = attend(q, k, v, pattern, return_lse=True, implementation="reference", **kw)
  grads = jax.grad(lambda q, k, v: jnp.vdot(attend(
      q, k, v, pattern, implementation="reference", **kw), ct), argnums=(0, 1, 2))(q, k, v)
  got = attend_backward(q, k, v, pattern, out, lse, ct, implementation="reference", **kw)
  _assert_close(got, grads, seed)


def _split_keys_grads(pattern, impl, seed, segments=False, cut=16):
  """Keys split at ``cut``: per-part backward with the merged out/lse, summed."""
  q, k, v, ct, seg_q, seg_k = _inputs(seed, segments=segments)
  parts = [(0, cut), (cut, k.shape[1])]
  acc = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:1] + (q.shape[2], q.shape[1]),
                                                  -jnp.inf, jnp.float32))
  for a, b in parts:
    part = attend(q, k[:, a:b], v[:, a:b], pattern, return_lse=True, kv_offset=a,
                  q_segment_ids=seg_q, kv_segment_ids=None if seg_k is None else seg_k[:, a:b],
                  implementation="reference")
    acc = merge(acc, part)
  out, lse = acc
  dq = 0.0
  dk, dv = [], []
  for a, b in parts:
    g = attend_backward(q, k[:, a:b], v[:, a:b], pattern, out, lse, ct, kv_offset=a,
                        q_segment_ids=seg_q,
                        kv_segment_ids=None if seg_k is None else seg_k[:, a:b],
                        implementation=impl)
    dq = dq + g[0].astype(jnp.float32)
    dk.append(g[1])
    dv.append(g[2])
  want = jax.grad(lambda q, k, v: jnp.vdot(attend(
      q, k, v, pattern, q_segment_ids=seg_q, kv_segment_ids=seg_k,
      implementation="reference"), ct), argnums=(0, 1, 2))(q, k, v)
  return (dq, jnp.concatenate(dk, 1), jnp.concatenate(dv, 1)), want


@pytest.mark.parametrize("name", list(PATTERNS))
def test_reference_backward_with_merged_statistics(name):
  """Keys in two parts: the parts' gradients from the merged out/lse sum to the
  gradient over all keys (what ring attention relies on)."""
  seed = _seed()
  got, want = _split_keys_grads(PATTERNS[name], "reference", seed,
                                segments=name == "anchor")
  _assert_close(got, want, seed)


@pytest.mark.parametrize("name", ["causal", "strided_heads", "anchor"])
def test_pallas_backward_with_merged_statistics(name):
  """The portable kernels' backward entry (interpret mode), same check."""
  seed = _seed()
  got, want = _split_keys_grads(PATTERNS[name], "pallas", seed,
                                segments=name == "anchor")
  _assert_close(got, want, seed, tol=1e-4)


def test_errors():
  q, k, v, ct, _, _ = _inputs(0)
  out, lse = attend(q, k, v, P.Causal(), return_lse=True)
  with pytest.raises(ValueError, match="'cudnn'.*choose one of"):
    attend_backward(q, k, v, P.Causal(), out, lse, ct, implementation="cudnn")
  with pytest.raises(ValueError, match=r"lse\(2, 37, 4\) must be"):
    attend_backward(q, k, v, P.Causal(), out, lse.transpose(0, 2, 1), ct)
  with pytest.raises(ValueError, match="must have q's shape"):
    attend_backward(q, k, v, P.Causal(), out[:, :5], lse, ct)
