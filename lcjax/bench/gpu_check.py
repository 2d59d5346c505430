"""GPU correctness check and block-size sweep of the portable attention kernels.

    python -m lcjax.bench.gpu_check [--sweep] [--seed N]

Correctness: fresh random inputs (seed from the clock unless given), outputs,
lse and gradients (dq, dk, dv, including an lse cotangent) of the
Triton-lowered kernels against the dense jnp reference computed in float32 on
the same inputs, for several patterns, GQA, head dims 64/128/256, lengths
that are not block multiples, segments, offsets (static and traced) and
softcap. Also checks cuDNN's window convention against ours.
Sweep (``--sweep``): times candidate BlockSizes on causal attention.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import cudnn, reference
from lcjax.attention import patterns as P
from pallas_kernels import flash_attention as fa


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  finite = np.isfinite(ref)
  if not np.array_equal(finite, np.isfinite(x)):
    return float("inf")
  scale = max(np.abs(ref[finite]).max(), 1e-6) if finite.any() else 1.0
  return float(np.abs(x[finite] - ref[finite]).max() / scale)


def _loss_fn(fn, ct, ct_lse):
  def loss(q, k, v):
    out, lse = fn(q, k, v)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return (jnp.vdot(out.astype(jnp.float32), ct) + jnp.vdot(lse, ct_lse))
  return loss


def check_case(rng, *, pattern, B, T, S, N, K, H, dtype, segments=False,
               q_offset=0, kv_offset=0, softcap=None, traced_offsets=False):
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  ct = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  ct_lse = jnp.asarray(rng.standard_normal((B, N, T)), jnp.float32)
  seg_q = seg_k = None
  if segments:
    seg_q = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), axis=1), jnp.int32)
    seg_k = jnp.asarray(np.sort(rng.integers(0, 4, (B, S)), axis=1), jnp.int32)

  def ours(q, k, v, qo, ko):
    return fa.flash_attention(q, k, v, pattern, q_segment_ids=seg_q,
                              kv_segment_ids=seg_k, q_offset=qo, kv_offset=ko,
                              softcap=softcap, return_lse=True)

  def ref(q, k, v):
    return reference.dense_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        pattern, q_segment_ids_BxT=seg_q, kv_segment_ids_BxS=seg_k,
        q_offset=q_offset, kv_offset=kv_offset, softcap=softcap)

  if traced_offsets:
    run = jax.jit(lambda q, k, v, qo, ko: (
        ours(q, k, v, qo, ko),
        jax.grad(_loss_fn(lambda a, b, c: ours(a, b, c, qo, ko), ct, ct_lse),
                 (0, 1, 2))(q, k, v)))
    (out, lse), grads = run(q, k, v, jnp.int32(q_offset), jnp.int32(kv_offset))
  else:
    f = lambda a, b, c: ours(a, b, c, q_offset, kv_offset)
    run = jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(
        _loss_fn(f, ct, ct_lse), (0, 1, 2))(q, k, v)))
    (out, lse), grads = run(q, k, v)
  (out_r, lse_r), grads_r = jax.jit(lambda q, k, v: (ref(q, k, v), jax.grad(
      _loss_fn(ref, ct, ct_lse), (0, 1, 2))(q, k, v)))(q, k, v)
  errs = dict(out=_rel_err(out, out_r), lse=_rel_err(lse, lse_r))
  for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_r):
    errs[name] = _rel_err(g, gr)
  errs["nan"] = bool(np.isnan(np.asarray(out, np.float32)).any()
                     or any(np.isnan(np.asarray(g, np.float32)).any() for g in grads))
  return errs


def correctness(seed: int) -> bool:
  rng = np.random.default_rng(seed)
  print(f"correctness, seed {seed}")
  cases = [
      dict(pattern=P.Causal(), B=1, T=1000, S=1000, N=4, K=4, H=128),
      dict(pattern=P.Causal(), B=2, T=777, S=777, N=8, K=2, H=64),
      dict(pattern=P.SlidingWindow(127), B=1, T=1200, S=1200, N=4, K=1, H=128),
      dict(pattern=P.SinkWindow(sink=16, window=200), B=1, T=1100, S=1100, N=4,
           K=2, H=256),
      dict(pattern=P.StridedBlockSparse(block_size=64, stride=4), B=1, T=1030,
           S=1030, N=8, K=2, H=128),
      dict(pattern=P.PerHead((P.Causal(), P.SinkWindow(8, 100), P.Full(),
                              P.SlidingWindow(50, 50))),
           B=1, T=600, S=700, N=4, K=2, H=64, q_offset=100),
      dict(pattern=P.Causal() | P.DocumentAnchor(), B=2, T=900, S=900, N=4, K=2,
           H=128, segments=True),
      dict(pattern=P.CausalShiftedGroups(256, 4), B=1, T=1024, S=1024, N=4, K=4,
           H=64, softcap=20.0),
      dict(pattern=P.TriShape(sink=4, window=128, dense_from=900), B=1, T=1000,
           S=1000, N=4, K=2, H=128),
      dict(pattern=P.Causal(), B=1, T=512, S=1536, N=4, K=2, H=128,
           q_offset=1024, traced_offsets=True),
  ]
  ok = True
  # bf16 first: on the H100 (jax 0.11.2) each float32 case took ~50 s, mostly
  # compiling (float32 dots run at HIGHEST precision), bf16 cases far less.
  runs = [(jnp.bfloat16, 3e-2, c) for c in cases]
  runs += [(jnp.float32, 2e-4, c) for c in cases[:5]]
  for dtype, tol, case in runs:
    t0 = time.perf_counter()
    errs = check_case(rng, dtype=dtype, **case)
    passed = (not errs.pop("nan")) and all(e <= tol for e in errs.values())
    ok &= passed
    desc = {k: v for k, v in case.items() if k != "pattern"}
    print(f"{'PASS' if passed else 'FAIL'} {jnp.dtype(dtype).name:8} "
          f"{type(case['pattern']).__name__:20} {desc} "
          + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
          + f" ({time.perf_counter() - t0:.1f}s)", flush=True)
  # cuDNN's local_window_size=(L, 0) against SlidingWindow(L).
  if jax.default_backend() == "gpu":
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2048, 4, 128)), jnp.bfloat16)
               for _ in range(3))
    pat = P.SlidingWindow(255)
    out = cudnn.cudnn_attention(q, k, v, pat)
    out_r, _ = reference.dense_attention(q, k, v, pat)
    err = _rel_err(out, out_r)
    print(f"{'PASS' if err < 3e-2 else 'FAIL'} cudnn window convention "
          f"err={err:.1e}")
    ok &= err < 3e-2
  return ok


def sweep(length: int = 16384, heads: int = 16, head_dim: int = 128):
  """Times BlockSizes candidates on causal bf16 attention (fwd, fwd+bwd)."""
  rng = np.random.default_rng(0)
  shape = (1, length, heads, head_dim)
  q, k, v, ct = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
                 for _ in range(4))
  flops = 4.0 * heads * length * (length + 1) / 2 * head_dim
  base = fa.BlockSizes.default(head_dim, "gpu")
  candidates = [
      base,
      dataclasses.replace(base, block_q=128, block_k=128, num_warps=8),
      dataclasses.replace(base, block_q=64, block_k=64, num_warps=4),
      dataclasses.replace(base, num_stages=2),
      dataclasses.replace(base, block_q_dq=128, block_k_dq=64, block_q_dkv=64,
                          block_k_dkv=128, num_warps_bwd=8),
      dataclasses.replace(base, block_q_dq=64, block_k_dq=32, block_q_dkv=32,
                          block_k_dkv=64, num_stages_bwd=3),
      dataclasses.replace(base, num_warps_bwd=8),
  ]
  print(f"sweep: causal {length} tokens, {heads} heads, d={head_dim}, bf16")
  for bs in candidates:
    f = jax.jit(lambda q, k, v, bs=bs: fa.flash_attention(
        q, k, v, P.Causal(), block_sizes=bs))
    g = jax.jit(jax.grad(lambda q, k, v, bs=bs: jnp.vdot(
        fa.flash_attention(q, k, v, P.Causal(), block_sizes=bs).astype(
            jnp.float32), ct.astype(jnp.float32)), (0, 1, 2)))
    row = []
    for fn, fl in ((f, flops), (g, 3.5 * flops)):
      try:
        jax.block_until_ready(fn(q, k, v))
        times = []
        for _ in range(5):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(q, k, v))
          times.append(time.perf_counter() - t0)
        ms = 1e3 * float(np.median(times))
        row.append(f"{ms:8.2f} ms {fl / ms / 1e9:6.1f} TF/s")
      except Exception as e:  # pylint: disable=broad-except
        row.append(f"failed {type(e).__name__}: {str(e)[:120]}")
    print(f"{bs}\n    fwd {row[0]} | fwd+bwd {row[1]}", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--no-check", action="store_true")
  args = p.parse_args()
  print(jax.devices(), jax.__version__)
  ok = True
  if not args.no_check:
    ok = correctness(args.seed if args.seed is not None else time.time_ns() % 2**31)
  if args.sweep:
    sweep()
  print("ALL PASS" if ok else "SOME FAILED")


if __name__ == "__main__":
  main()
