"""GPU check that every route of ``attend`` computes the reference function.

    python -m lcjax.bench.dispatch_check

For several patterns (incl. segments, GQA, odd lengths) it runs
``attend(implementation=...)`` for "auto", "pallas" and "cudnn" (where cuDNN
accepts the call) on fresh bf16 inputs and compares outputs and gradients with
the float32 dense reference. It prints which implementation "auto" chose, so
a wrong convention in a dispatched peer (e.g. cuDNN's window size) shows up as
an error here rather than as a silently different model.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import api, reference
from lcjax.attention import patterns as P


def _rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-12))


def check(rng, pattern, B, T, N, K, H, segments=False, tol=2e-2) -> bool:
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.bfloat16)
             for n in (N, K, K))
  ct = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  seg = (jnp.asarray(np.sort(rng.integers(1, 4, (B, T)), axis=1), jnp.int32)
         if segments else None)
  kw = dict(q_segment_ids=seg, kv_segment_ids=seg)

  def run(fn):
    loss = lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32), ct)
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))(
        q, k, v)

  f32 = lambda x: x.astype(jnp.float32)
  want = run(lambda q, k, v: reference.dense_attention(
      f32(q), f32(k), f32(v), pattern, q_segment_ids_BxT=seg,
      kv_segment_ids_BxS=seg)[0])
  ok = True
  chosen = api.choose_implementation(q, k, v, pattern, **kw)
  for impl in ("auto", "pallas", "cudnn"):
    try:
      got = run(lambda q, k, v, impl=impl: api.attend(q, k, v, pattern, **kw,
                                                      implementation=impl))
    except ValueError as e:  # a forced implementation that cannot run this
      print(f"  {impl:6} refused: {str(e).splitlines()[0][:110]}")
      continue
    errs = [_rel(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    passed = max(errs) < tol and all(np.isfinite(errs))
    ok &= passed
    print(f"  {impl:6} {'PASS' if passed else 'FAIL'} max rel err {max(errs):.1e}"
          + (f" (auto chose {chosen})" if impl == "auto" else ""), flush=True)
  return ok


def main() -> None:
  seed = time.time_ns() % 2**31
  rng = np.random.default_rng(seed)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, seed {seed}")
  cases = [
      ("causal GQA", P.Causal(), dict(B=2, T=1000, N=8, K=2, H=128)),
      ("window 255 MQA", P.SlidingWindow(255), dict(B=1, T=2048, N=4, K=1, H=128)),
      ("sink+window", P.SinkWindow(sink=64, window=300), dict(B=1, T=1500, N=4, K=2, H=64)),
      ("strided", P.StridedBlockSparse(block_size=128, stride=4), dict(B=1, T=2048, N=4, K=4, H=128)),
      ("packed causal", P.Causal(), dict(B=2, T=1024, N=4, K=2, H=64, segments=True)),
  ]
  ok = True
  for name, pattern, shape in cases:
    print(name)
    ok &= check(rng, pattern, **shape)
  print("dispatch check:", "ALL PASS" if ok else "SOME FAILED")


if __name__ == "__main__":
  main()
