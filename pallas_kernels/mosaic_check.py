"""GPU check and benchmark of the Mosaic GPU attention kernels, one process.

  python -m pallas_kernels.mosaic_check --deadline-s 370   # the one-call run
  python -m pallas_kernels.mosaic_check --no-bench          # correctness only
  python -m pallas_kernels.mosaic_check --no-checks --lengths 32768 --only causal

Correctness: fresh random inputs against the float32 jnp reference (output,
lse and gradients, relative Frobenius error), including cases that force the
dK/dV work split. Benchmark: median of device-synchronised wall times after
warm-up; our kernel (default config, and ``v1`` = the first version's launch
order without split, as the baseline in the same process) beside cuDNN
(``jax.nn.dot_product_attention(implementation="cudnn")``) where cuDNN has the
pattern, in effective TFLOP/s: FLOPs of visible (query, key) pairs only,
forward ``4 * pairs * head_dim``, fwd+bwd 3.5x forward. ``--deadline-s`` skips
what would not finish in time and still prints the table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import block_mask
from lcjax.attention import patterns as P
from lcjax.attention.reference import dense_attention
from lcjax.bench.profile import format_kernel_times, kernel_times
from lcjax.bench.timing import back_to_back_ms, median_ms
from pallas_kernels import mosaic_attention as ma


# ----------------------------------------------------------------------------
# Correctness.
# ----------------------------------------------------------------------------


def _segments(rng, batch, length):
  """Random packed-document ids: up to four documents per row."""
  cuts = np.sort(rng.integers(1, length, size=(batch, 3)), axis=-1)
  pos = np.arange(length)[None, :, None]
  return jnp.asarray((pos >= cuts[:, None, :]).sum(-1), jnp.int32)


def compare_with_reference(pattern, *, batch=1, q_len=1024, kv_len=1024,
                           heads=4, kv_heads=2, head_dim=128,
                           dtype=jnp.bfloat16, segments=False, q_offset=0,
                           kv_offset=0, softcap=None, traced_offsets=False,
                           config=ma.DEFAULT_CONFIG, seed=None):
  """Relative errors {out, lse, dq, dk, dv} of the kernel vs the reference.

  The gradients are of a random linear function of ``out`` and of the finite
  ``lse`` entries, so the lse cotangent path is checked too. Raises if a
  result has NaN/inf or the -inf rows of lse differ. Returns (errors, seed).
  """
  seed = secrets.randbits(31) if seed is None else seed
  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
  w_out = jax.random.normal(keys[3], q.shape, jnp.float32)
  w_lse = jax.random.normal(keys[4], (batch, heads, q_len), jnp.float32)
  segs = ((_segments(rng, batch, q_len), _segments(rng, batch, kv_len))
          if segments else (None, None))

  def mosaic(q, k, v, q_off, kv_off):
    return ma.mosaic_attention(
        q, k, v, pattern, q_segment_ids=segs[0], kv_segment_ids=segs[1],
        q_offset=q_off, kv_offset=kv_off, softcap=softcap, return_lse=True,
        config=config)

  def reference(q, k, v, q_off, kv_off):
    return dense_attention(
        q, k, v, pattern, q_segment_ids_BxT=segs[0], kv_segment_ids_BxS=segs[1],
        q_offset=q_off, kv_offset=kv_off, softcap=softcap)

  def loss(attn, q, k, v, q_off, kv_off):
    out, lse = attn(q, k, v, q_off, kv_off)
    lin = jnp.sum(out.astype(jnp.float32) * w_out)
    lin += jnp.sum(jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0))
    return lin, (out, lse)

  vg = lambda attn: jax.value_and_grad(
      lambda *a: loss(attn, *a), argnums=(0, 1, 2), has_aux=True)
  if traced_offsets:  # offsets as traced scalars: device-side block lists
    (_, (out, lse)), grads = jax.jit(vg(mosaic))(
        q, k, v, jnp.int32(q_offset), jnp.int32(kv_offset))
  else:
    (_, (out, lse)), grads = jax.jit(
        lambda *a: vg(mosaic)(*a, q_offset, kv_offset))(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  (_, (out_r, lse_r)), grads_r = jax.jit(
      lambda *a: vg(reference)(*a, q_offset, kv_offset))(f32(q), f32(k), f32(v))

  if out.shape != q.shape or out.dtype != q.dtype:
    raise AssertionError(f"out {out.shape} {out.dtype} vs q {q.shape} {q.dtype}")
  finite_r = np.isfinite(np.asarray(lse_r))
  if not np.array_equal(np.isfinite(np.asarray(lse)), finite_r):
    raise AssertionError(f"seed={seed}: rows with lse=-inf differ")
  errors = {}
  for name, x, ref in (
      ("out", out, out_r),
      ("lse", jnp.where(finite_r, lse, 0.0), jnp.where(finite_r, lse_r, 0.0)),
      ("dq", grads[0], grads_r[0]), ("dk", grads[1], grads_r[1]),
      ("dv", grads[2], grads_r[2])):
    x, ref = np.asarray(f32(x)), np.asarray(f32(ref))
    if not np.isfinite(x).all():
      raise AssertionError(f"seed={seed}: {name} has NaN/inf")
    errors[name] = float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref),
                                                       1e-6))
  return errors, seed


_SPLIT2 = dataclasses.replace(ma.DEFAULT_CONFIG, dkv_split=2)

# Cases shared with tests/attention/test_mosaic_attention.py, most telling
# first (a deadline cuts the list from the end).
CHECK_CASES = {
    "strided_split_per_head": dict(
        pattern=P.StridedBlockSparse(block_size=128, stride=4,
                                     local_blocks=2), config=_SPLIT2),
    "sinkwindow_gqa_split_padded": dict(pattern=P.SinkWindow(64, 300),
                                        q_len=1000, kv_len=1000, heads=8,
                                        kv_heads=2, config=_SPLIT2),
    "causal_mqa_auto_split": dict(pattern=P.Causal(), q_len=2048,
                                  kv_len=2048, heads=8, kv_heads=1),
    "causal_gqa": dict(pattern=P.Causal(), batch=2),
    "fully_masked_rows": dict(pattern=P.Causal(), q_len=512, kv_len=512,
                              kv_offset=300, config=_SPLIT2),
    "traced_offsets_window": dict(pattern=P.SlidingWindow(255), q_len=512,
                                  kv_len=640, q_offset=512, kv_offset=384,
                                  traced_offsets=True),
    "sinkwindow_mqa_padded": dict(pattern=P.SinkWindow(64, 300), q_len=1000,
                                  kv_len=1000, kv_heads=1),
    "strided_aligned_per_head": dict(
        pattern=P.StridedBlockSparse(block_size=128, stride=4,
                                     local_blocks=2)),
    "per_head_mix": dict(pattern=P.PerHead((P.Causal(), P.SlidingWindow(200),
                                            P.Full(),
                                            P.TriShape(32, 100, 700)))),
    "segments_anchor": dict(pattern=P.Causal() | P.DocumentAnchor(), batch=2,
                            q_len=768, kv_len=768, segments=True),
    "strided_unaligned": dict(
        pattern=P.StridedBlockSparse(block_size=64, stride=4, local_blocks=2,
                                     head_offsets=False)),
    "full_fp16_d64_rect": dict(pattern=P.Full(), q_len=256, kv_len=512,
                               heads=2, kv_heads=2, head_dim=64,
                               dtype=jnp.float16,
                               config=dataclasses.replace(ma.DEFAULT_CONFIG,
                                                          dkv_split=1)),
    "softcap_fp16": dict(pattern=P.Causal(), softcap=20.0, dtype=jnp.float16),
    "chunked_prefill_offsets": dict(pattern=P.Causal(), q_len=256,
                                    kv_len=1024, q_offset=768),
    # Persistent CTAs that walk many items each: rings and barrier phases
    # run on across items; double-buffered inputs (forward Q, dK/dV K/V;
    # dQ with 64-key tiles) and single ones (dQ, dK/dV with split parts).
    "persistent_3ctas_strided": dict(
        pattern=P.StridedBlockSparse(block_size=128, stride=4,
                                     local_blocks=2), heads=8,
        config=dataclasses.replace(ma.DEFAULT_CONFIG, num_sms=3)),
    "persistent_5ctas_split_gqa": dict(
        pattern=P.SinkWindow(64, 300), q_len=1000, kv_len=1000, heads=8,
        kv_heads=2, config=dataclasses.replace(_SPLIT2, num_sms=5,
                                               stages_dkv=3)),
    "persistent_3ctas_ascending_dkv": dict(
        pattern=P.StridedBlockSparse(block_size=128, stride=4,
                                     local_blocks=1), kv_heads=1,
        config=dataclasses.replace(ma.DEFAULT_CONFIG, num_sms=3,
                                   dkv_order="ascending")),
    "persistent_7ctas_segments_dq64": dict(
        pattern=P.Causal() | P.DocumentAnchor(), batch=2, q_len=768,
        kv_len=768, segments=True,
        config=dataclasses.replace(ma.DEFAULT_CONFIG, num_sms=7,
                                   block_kv_dq=64)),
    # dQ with 128-key tiles: single-buffered Q/dO, and each item's rows of
    # the output (for delta) in the first 64 rows of a K and a V ring slot.
    "persistent_3ctas_sinkwindow_dq128": dict(
        pattern=P.SinkWindow(64, 300), q_len=1000, kv_len=1000, kv_heads=1,
        config=dataclasses.replace(ma.DEFAULT_CONFIG, num_sms=3,
                                   block_kv_dq=128)),
}

# Relative Frobenius error allowed per dtype (operands rounded to 8 / 11 bits).
TOLERANCE = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 6e-3}


class Deadline:
  """Seconds left of a budget (None: unlimited), counted from construction."""

  def __init__(self, seconds: float | None):
    self.end = None if not seconds else time.perf_counter() + seconds

  def left(self) -> float:
    return math.inf if self.end is None else self.end - time.perf_counter()


def run_checks(names=None, deadline: Deadline | None = None,
               reserve_s: float = 0.0, overrides: dict | None = None) -> bool:
  """Runs CHECK_CASES (or ``names``), each case's config updated with the
  Config fields ``overrides``; stops starting new ones when fewer than
  ``reserve_s`` seconds are left."""
  ok = True
  deadline = deadline or Deadline(None)
  for name, case in CHECK_CASES.items():
    if names and name not in names:
      continue
    if deadline.left() < reserve_s:
      print(f"check {name:28s} SKIP  (deadline)", flush=True)
      continue
    tol = TOLERANCE[jnp.dtype(case.get("dtype", jnp.bfloat16))]
    if overrides:
      case = dict(case, config=dataclasses.replace(
          case.get("config", ma.DEFAULT_CONFIG), **overrides))
    t0 = time.perf_counter()
    try:
      errors, seed = compare_with_reference(**case)
      worst = max(errors.values())
      status = "ok" if worst <= tol else "FAIL"
      detail = " ".join(f"{k}={v:.1e}" for k, v in errors.items())
    except Exception as e:  # pylint: disable=broad-except
      status, seed, worst = "ERROR", -1, float("nan")
      detail = f"{type(e).__name__}: {str(e)[:400]}"
    ok &= status == "ok"
    print(f"check {name:28s} {status:5s} max_rel={worst:.2e} tol={tol:.0e} "
          f"seed={seed} {time.perf_counter() - t0:.0f}s {detail}", flush=True)
  return ok


# ----------------------------------------------------------------------------
# Benchmark.
# ----------------------------------------------------------------------------


def time_ms(fn, *args, warmup=2, reps=10) -> float:
  """Median wall time of ``fn(*args)`` with a device sync after each call."""
  return median_ms(fn, args, repeats=reps, warmup=warmup)


def _fwd_bwd(attn):
  def f(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)
  return jax.jit(f)


# Kernel variants: the default, and the first version's CTA order without the
# dK/dV split (the baseline of the load-balancing change).
VARIANTS = {
    "mosaic": ma.DEFAULT_CONFIG,
    "v1": dataclasses.replace(ma.DEFAULT_CONFIG, schedule="grid", dkv_split=0,
                              persistent=False, block_kv_dq=128),
    "split16": dataclasses.replace(ma.DEFAULT_CONFIG, dkv_split=16),
    # The launch before persistent CTAs: one CTA per work item, 128-key dQ.
    "one_cta_per_item": dataclasses.replace(ma.DEFAULT_CONFIG,
                                            persistent=False, block_kv_dq=128),
}


def bench_pattern(name, pattern, seq, *, cudnn_kwargs=None, heads=16,
                  kv_heads=16, head_dim=128, batch=1, impls=("mosaic",),
                  configs=None, reps=10, deadline: Deadline | None = None,
                  reserve_s: float = 0.0, profile: bool = False,
                  queued: bool = False):
  """Rows {pattern, seq, impl, mode, ms, tflops, density} for one case.

  ``impls``: names of VARIANTS and/or "cudnn" (needs ``cudnn_kwargs``), timed
  in this order; ``configs`` ({label: Config}) replaces the variants. An
  implementation is skipped when fewer than ``reserve_s`` seconds are left.
  ``profile``: print the device time per kernel of each timed call
  (``queued``: of calls queued back to back, see ``kernel_times``).
  """
  deadline = deadline or Deadline(None)
  keys = jax.random.split(jax.random.key(seq), 4)
  shape = (batch, seq, heads, head_dim)
  kv_shape = (batch, seq, kv_heads, head_dim)
  q, do = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys[::3])
  k, v = (jax.random.normal(kk, kv_shape, jnp.bfloat16) for kk in keys[1:3])
  pairs = block_mask.visible_count(pattern, seq, seq, heads, block=128)
  fwd_flops = 4.0 * pairs * head_dim * batch
  if configs is None:
    configs = {i: VARIANTS[i] for i in impls if i != "cudnn"}
    order = [i for i in impls if i in configs or cudnn_kwargs is not None]
  else:
    order = list(configs) + (["cudnn"] if "cudnn" in impls else [])
  fns = {label: (lambda q, k, v, c=c: ma.mosaic_attention(q, k, v, pattern,
                                                           config=c))
         for label, c in configs.items()}
  if cudnn_kwargs is not None:
    fns["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn", **cudnn_kwargs)
  rows = []
  for impl in order:
    attn = fns[impl]
    if deadline.left() < reserve_s:
      print(f"  {name} {seq} {impl}: skipped (deadline)", flush=True)
      continue
    for mode, fn, flops in (("fwd", jax.jit(attn), fwd_flops),
                            ("fwd+bwd", _fwd_bwd(attn), 3.5 * fwd_flops)):
      args = (q, k, v) if mode == "fwd" else (q, k, v, do)
      t0 = time.perf_counter()
      try:
        ms = time_ms(fn, *args, reps=reps)
        b2b = back_to_back_ms(fn, args, repeats=reps, warmup=0)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {name} {impl} {mode}: {type(e).__name__}: {str(e)[:300]}")
        ms = b2b = float("nan")
      tf = flops / ms / 1e9
      rows.append(dict(pattern=name, seq=seq, impl=impl, mode=mode, ms=ms,
                       tflops=tf, b2b_ms=b2b, b2b_tflops=flops / b2b / 1e9,
                       density=pairs / (heads * seq * seq)))
      print(f"  {name:18s} {seq:6d} {impl:8s} {mode:7s} {ms:9.3f} ms "
            f"{tf:6.1f} TF/s; back-to-back {b2b:9.3f} ms "
            f"{flops / b2b / 1e9:6.1f} TF/s ({time.perf_counter() - t0:.0f}s "
            "incl. compile)", flush=True)
      if profile and ms == ms:
        times = kernel_times(fn, *args, queued=queued)
        print(format_kernel_times(times, top=8,
                                  title=f"    {name} {seq} {impl} {mode}:"), flush=True)
  return rows


SINK_WINDOW = P.SinkWindow(64, 4095)
STRIDED = P.StridedBlockSparse(block_size=128, stride=16, local_blocks=1)


def block_diagonal(seq: int) -> P.BlockMask:
  """Each 128-token query block sees only its own key block (unmasked)."""
  n = -(-seq // 128)
  return P.BlockMask.from_array(np.eye(n, dtype=bool), 128, 128)


def bench_cases(lengths, long_lengths=()):
  """(name, pattern, seq, kv heads, cudnn kwargs or None, impls), most
  telling first (a deadline cuts from the end).

  The patterns of ``lcjax.bench.attention`` (sink 64 + window 4096; strided
  blocks of 128, stride 16, one local block, per-head offsets), so numbers
  compare with docs/performance.md; plus sink+window with 8 query heads per
  kv head, where the sink column of a GQA group needs the split.
  """
  causal = dict(is_causal=True)
  window = dict(is_causal=True, local_window_size=(4095, 0))
  cases = []
  for seq in lengths:
    cases += [
        ("strided_1/16", STRIDED, seq, 16, None, ("mosaic", "v1", "split16")),
        ("sink64+window4096", SINK_WINDOW, seq, 16, None, ("mosaic", "v1")),
        ("causal", P.Causal(), seq, 16, causal, ("mosaic", "cudnn", "v1")),
        ("window4096", P.SlidingWindow(4095), seq, 16, window,
         ("mosaic", "cudnn", "v1")),
        ("sink+window_gqa8", SINK_WINDOW, seq, 2, None, ("mosaic", "v1")),
        # Only the diagonal 128x128 blocks: one-entry work items whose own
        # loads and stores bound them (HBM roofline of the per-item cost).
        ("block_diagonal", block_diagonal(seq), seq, 16, None, ("mosaic",)),
    ]
  for seq in long_lengths:
    cases += [("sink64+window4096", SINK_WINDOW, seq, 16, None, ("mosaic",)),
              ("strided_1/16", STRIDED, seq, 16, None, ("mosaic",))]
  return cases


def print_table(rows):
  """Markdown table: each variant beside cuDNN and the v1 baseline."""
  by_key = {(r["pattern"], r["seq"], r["impl"], r["mode"]): r for r in rows}
  print("\n| pattern | seq | density | impl | mode | ms | TF/s | "
        "back-to-back ms | TF/s | v1 ms | speed vs v1 | cuDNN ms | "
        "speed vs cuDNN |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if r["impl"] == "cudnn":
      continue
    ref = {name: by_key.get((r["pattern"], r["seq"], name, r["mode"]))
           for name in ("v1", "cudnn")}
    cells = []
    for name in ("v1", "cudnn"):
      c = ref[name]
      if c is None or name == r["impl"]:
        cells += ["-", "-"]
      else:
        cells += [f"{c['ms']:.3f}", f"{c['ms'] / r['ms']:.2f}"]
    print(f"| {r['pattern']} | {r['seq']} | {r['density']:.3f} | {r['impl']} "
          f"| {r['mode']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
          f"{r['b2b_ms']:.3f} | {r['b2b_tflops']:.0f} | "
          + " | ".join(cells) + " |")
  for impl in ("mosaic", "v1"):
    for seq in sorted({r["seq"] for r in rows}):
      dense = by_key.get(("causal", seq, impl, "fwd+bwd"))
      sparse = by_key.get(("strided_1/16", seq, impl, "fwd+bwd"))
      if dense and sparse:
        print(f"{impl} {seq}: strided 1/16 (density {sparse['density']:.3f}) "
              f"fwd+bwd is {dense['ms'] / sparse['ms']:.1f}x faster than "
              f"causal ({dense['b2b_ms'] / sparse['b2b_ms']:.1f}x "
              "back-to-back; target >= 10x)")


def _parse_config(text: str) -> ma.Config:
  """'v1' / 'mosaic' / 'split16' or 'stages_dkv=3,dkv_split=8' -> Config
  (tuple fields: 'skip_empty_quarters=dq+dkv', or empty after '=')."""
  if text in VARIANTS:
    return VARIANTS[text]
  if text == "default":
    return ma.DEFAULT_CONFIG
  return dataclasses.replace(ma.DEFAULT_CONFIG, **_parse_fields(text))


def _parse_fields(text: str) -> dict:
  """'stages_dkv=3,persistent=0' -> {Config field: value}."""
  fields = {}
  allowed = [f.name for f in dataclasses.fields(ma.Config)]
  for item in text.split(","):
    key, _, value = item.partition("=")
    if key not in allowed:
      raise ValueError(f"unknown Config field {key!r} in {text!r}; allowed: "
                       f"{', '.join(allowed)}")
    kind = type(getattr(ma.DEFAULT_CONFIG, key))
    if kind is tuple:
      fields[key] = tuple(v for v in value.split("+") if v)
    else:
      fields[key] = value if kind is str else kind(int(value))
  return fields


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no-checks", action="store_true")
  parser.add_argument("--no-bench", action="store_true")
  parser.add_argument("--checks", nargs="*", default=None,
                      help="names of CHECK_CASES to run (default all)")
  parser.add_argument("--lengths", type=int, nargs="*", default=[32768])
  parser.add_argument("--long-lengths", type=int, nargs="*", default=[131072],
                      help="lengths for sink+window and strided only")
  parser.add_argument("--only", nargs="*", default=None,
                      help="benchmark only these pattern names")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--check-config", default="",
                      help="'key=value,...' Config fields applied to every "
                      "check case's own config")
  parser.add_argument("--configs", nargs="*", default=None,
                      help="kernel variants to time instead of each case's: "
                      "names of VARIANTS or 'key=value,...' Config fields")
  parser.add_argument("--deadline-s", type=float, default=0.0,
                      help="time budget of the whole run (0: none)")
  parser.add_argument("--json", default=None, help="write benchmark rows here")
  parser.add_argument("--profile", action="store_true",
                      help="print the device time per kernel of each timed call")
  parser.add_argument("--queued", action="store_true",
                      help="with --profile: profile calls queued back to back "
                      "(steadier between processes) instead of synced ones")
  args = parser.parse_args()
  if args.queued and not args.profile:
    parser.error("--queued changes how --profile measures; pass --profile too")
  deadline = Deadline(args.deadline_s)
  print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}",
        flush=True)
  ok = True
  if not args.no_checks:
    # Leave most of a budget to the benchmark.
    ok = run_checks(args.checks, deadline,
                    reserve_s=0.0 if args.no_bench else 0.55 * deadline.left(),
                    overrides=_parse_fields(args.check_config)
                    if args.check_config else None)
  rows = []
  if not args.no_bench:
    for name, pattern, seq, kv_heads, cudnn_kwargs, impls in bench_cases(
        args.lengths, args.long_lengths):
      if args.only and name not in args.only:
        continue
      configs = None
      if args.configs:
        configs = {c: _parse_config(c) for c in args.configs}
      rows += bench_pattern(name, pattern, seq, cudnn_kwargs=cudnn_kwargs,
                            kv_heads=kv_heads, impls=impls, configs=configs,
                            reps=args.reps, deadline=deadline,
                            reserve_s=60.0 if seq > 65536 else 25.0,
                            profile=args.profile, queued=args.queued)
    path = args.json or (os.path.join(os.environ["OUT"], "mosaic_bench.json")
                         if os.environ.get("OUT") else None)
    if path:
      with open(path, "w") as f:
        json.dump(rows, f, indent=1)
  print(f"checks: {'all ok' if ok else 'SOME FAILED (see above)'}")
  if rows:
    print_table(rows)
  if not ok:
    raise SystemExit("some checks failed")


if __name__ == "__main__":
  main()
