"""Attention benchmark: our kernels beside cuDNN, XLA and tokamax, same process.

    python -m lcjax.bench.attention                 # GPU: 8K/32K/128K
    python -m lcjax.bench.attention --quick         # tiny CPU smoke run
    python -m lcjax.bench.attention --render runs/attention.json  # JSON -> docs

For each pattern x length x mode (``fwd``, ``fwd_bwd``) every implementation
that can run the case is jitted, warmed up, then timed ``--repeats`` times;
the median wall time is reported with the effective TFLOP/s, which counts only
visible (query, key) pairs: forward ``4 * visible * head_dim`` and backward
2.5x that (so fwd+bwd = 3.5x). Results go to JSON and to the attention section
of ``docs/performance.md`` (between the ``attention-bench`` markers).

Implementations: ``triton`` (our portable block-sparse kernel),
``mosaic`` (our Mosaic GPU kernel, if ``pallas_kernels.mosaic_attention``
imports and supports the case), ``cudnn`` (``jax.nn.dot_product_attention``),
``xla`` (the dense jnp reference under jit, where its logits fit in memory;
beyond that the chunked online-softmax reference under jit, up to 32K) and
``tokamax`` (``tokamax.dot_product_attention``, Mosaic GPU backend, where
importable; only for patterns it expresses without a dense mask).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import block_mask, cudnn, reference
from lcjax.attention import patterns as P
from lcjax.bench.profile import kernel_times
from lcjax.bench.timing import back_to_back_ms, median_ms

MARK_START = "<!-- attention-bench:start -->"
MARK_END = "<!-- attention-bench:end -->"


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  pattern: P.Pattern
  packed_doc_len: int = 0  # > 0: packed documents of about this many tokens


def cases(quick: bool) -> list[Case]:
  if quick:
    return [Case("causal", P.Causal()),
            Case("sink_window", P.SinkWindow(sink=8, window=31)),
            Case("strided", P.StridedBlockSparse(block_size=16, stride=4)),
            Case("packed_docs", P.Causal(), packed_doc_len=40)]
  return [
      Case("causal", P.Causal()),
      Case("window_4096", P.SlidingWindow(4095)),
      Case("sink64_window_4096", P.SinkWindow(sink=64, window=4095)),
      Case("strided_1/16", P.StridedBlockSparse(block_size=128, stride=16,
                                                local_blocks=1)),
      Case("packed_docs_4k", P.Causal(), packed_doc_len=4096),
  ]


def packed_segments(length: int, doc_len: int, seed: int = 0) -> np.ndarray:
  """Segment ids of documents with lengths uniform in [doc_len/2, 3*doc_len/2]."""
  rng = np.random.default_rng(seed)
  ids, doc = [], 0
  while len(ids) < length:
    ids.extend([doc] * int(rng.integers(doc_len // 2, 3 * doc_len // 2 + 1)))
    doc += 1
  return np.asarray(ids[:length], np.int32)


def visible_pairs(case: Case, length: int, num_heads: int) -> int:
  """Visible (head, query, key) triples for one batch row."""
  if case.packed_doc_len:
    assert isinstance(case.pattern, P.Causal)
    _, counts = np.unique(packed_segments(length, case.packed_doc_len),
                          return_counts=True)
    return int((counts * (counts + 1) // 2).sum()) * num_heads
  return block_mask.visible_count(case.pattern, length, length, num_heads)


def _implementations(case: Case, q, k, seg, quick: bool):
  """name -> (attention fn(q, k, v) -> out) or a string saying why not."""
  from pallas_kernels import flash_attention as fa
  from lcjax.attention import api
  pattern = case.pattern
  has_seg = seg is not None
  seg_kw = dict(q_segment_ids=seg, kv_segment_ids=seg) if has_seg else {}
  impls = {}

  impls["triton"] = lambda q, k, v: fa.flash_attention(q, k, v, pattern, **seg_kw)

  reason = api.mosaic_reason(q, k, pattern, has_seg, None)
  if reason is None:
    mosaic = api._mosaic_module()  # pylint: disable=protected-access
    impls["mosaic"] = lambda q, k, v: mosaic.mosaic_attention(
        q, k, v, pattern, **seg_kw)
  else:
    impls["mosaic"] = reason

  reason = cudnn.supports(q.shape, k.shape, q.dtype, pattern, has_seg, None)
  impls["cudnn"] = reason or (
      lambda q, k, v: cudnn.cudnn_attention(q, k, v, pattern))

  B, T, N, _ = q.shape
  logits_bytes = B * N * T * k.shape[1] * 4
  if logits_bytes > (2 << 30) and not quick:
    if T > 32768:
      impls["xla"] = (f"dense logits would take {logits_bytes / 2**30:.0f} GiB; "
                      "chunked XLA is timed up to 32K only")
    else:  # XLA without materialised logits: the chunked online softmax
      impls["xla"] = lambda q, k, v: reference.chunked_attention(
          q, k, v, pattern, q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg,
          q_chunk=1024, kv_chunk=1024)[0]
  else:
    impls["xla"] = lambda q, k, v: reference.dense_attention(
        q, k, v, pattern, q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg)[0]
  if quick:
    impls["chunked"] = lambda q, k, v: reference.chunked_attention(
        q, k, v, pattern, q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg,
        q_chunk=64, kv_chunk=64)[0]

  impls["tokamax"] = _tokamax_impl(case, quick)
  return impls


def _tokamax_impl(case: Case, quick: bool):
  if quick or jax.default_backend() != "gpu":
    return "tokamax runs on GPU only"
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return f"tokamax not importable ({e})"
  p = case.pattern
  if case.packed_doc_len:
    return "tokamax has no segment ids (dense mask only)"
  if isinstance(p, P.Causal):
    kw = dict(is_causal=True)
  elif isinstance(p, P.SlidingWindow) and p.right == 0 and p.left is not None:
    kw = dict(is_causal=True, local_window_size=(p.left, 0))
  else:
    return "tokamax has no such pattern (dense mask only)"
  return lambda q, k, v: tokamax.dot_product_attention(
      q, k, v, implementation="mosaic", **kw)


def run(args, on_record=lambda records: None) -> list[dict]:
  """All records; ``on_record(records)`` is called after each one (so a run cut
  short by a time limit still leaves its results)."""
  quick = args.quick
  dtype = jnp.dtype(args.dtype or ("float32" if quick else "bfloat16"))
  lengths = args.lengths or ([128] if quick else [8192, 32768, 131072])
  heads, head_dim = (2, 32) if quick else (args.heads, args.head_dim)
  repeats = 1 if quick else args.repeats
  warmup = 1
  modes = args.modes
  records = []
  rng = np.random.default_rng(args.seed)
  for length in lengths:
    shape = (1, length, heads, head_dim)
    q, k, v, ct = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
    for case in cases(quick):
      if args.patterns and case.name not in args.patterns:
        continue
      seg = (jnp.asarray(packed_segments(length, case.packed_doc_len))[None]
             if case.packed_doc_len else None)
      visible = visible_pairs(case, length, heads)
      fwd_flops = 4.0 * visible * head_dim
      impls = _implementations(case, q, k, seg, quick)
      for mode in modes:
        for name in args.impls:
          impl = impls.get(name, f"unknown implementation {name}")
          rec = dict(pattern=case.name, seq_len=length, mode=mode, impl=name,
                     density=visible / (heads * length * length))
          if isinstance(impl, str):
            rec["skipped"] = impl
            records.append(rec)
            _print_record(rec)
            continue
          if mode == "fwd":
            fn = jax.jit(impl)
            flops = fwd_flops
          else:
            def loss(q, k, v, impl=impl):
              return jnp.vdot(impl(q, k, v).astype(jnp.float32),
                              ct.astype(jnp.float32))
            fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            flops = 3.5 * fwd_flops
          try:
            ms = median_ms(fn, (q, k, v), repeats, warmup)
          except Exception as e:  # pylint: disable=broad-except
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            rec["skipped"] = f"failed: {type(e).__name__}: {msg}"
          else:
            rec.update(ms=ms, tflops=flops / ms / 1e9)
            if args.back_to_back:
              b2b_ms = back_to_back_ms(fn, (q, k, v), repeats, warmup=0)
              rec.update(b2b_ms=b2b_ms, b2b_tflops=flops / b2b_ms / 1e9)
            if args.device_time:
              device_ms = sum(kernel_times(fn, q, k, v).values()) / 1e3
              rec.update(device_ms=device_ms, device_tflops=flops / device_ms / 1e9)
          records.append(rec)
          _print_record(rec)
          on_record(records)
  return records


def _print_record(rec):
  if "ms" in rec:
    device = (f"  (device {rec['device_ms']:.3f} ms, {rec['device_tflops']:.1f} TF/s)"
              if "device_ms" in rec else "")
    if "b2b_ms" in rec:
      device += (f"  (back-to-back {rec['b2b_ms']:.3f} ms, "
                 f"{rec['b2b_tflops']:.1f} TF/s)")
    print(f"{rec['pattern']:>20} {rec['seq_len']:>7} {rec['mode']:>7} "
          f"{rec['impl']:>8} {rec['ms']:10.3f} ms {rec['tflops']:8.1f} TF/s{device}",
          flush=True)
  else:
    print(f"{rec['pattern']:>20} {rec['seq_len']:>7} {rec['mode']:>7} "
          f"{rec['impl']:>8} skipped: {rec['skipped']}", flush=True)


def markdown(records: list[dict], meta: dict) -> str:
  """One table row per (pattern, length, mode): ms (TF/s) per implementation;
  a second table of device (kernel) time when the run measured it."""
  lines = [f"Device: {meta.get('device', '?')}; jax {meta.get('jax', '?')}; "
           f"dtype {meta.get('dtype')}, batch 1, {meta.get('heads')} heads, "
           f"head_dim {meta.get('head_dim')}; median of {meta.get('repeats')} "
           "after warm-up. Cells: ms (effective TF/s; visible pairs only). "
           "Ratio columns: time of the peer / time of ours, where ours is the "
           "kernel `attend(..., implementation=\"pallas\")` runs (mosaic where "
           "it supports the case, else triton); >1 means ours is faster.", ""]
  lines += _table(records, "ms", "tflops")
  if any("b2b_ms" in r for r in records):
    lines += ["", "Back-to-back: wall time per call of 10 calls queued without a sync "
              "in between (`--back-to-back`; as inside a training step, where the "
              "host runs ahead of the GPU), median of the same number of repeats:", ""]
    lines += _table([r for r in records if "b2b_ms" in r or "ms" not in r],
                    "b2b_ms", "b2b_tflops")
  if any("device_ms" in r for r in records):
    lines += ["", "Device time of the same calls (sum of the kernels' times in JAX's "
              "profiler, `--device-time`; excludes launch and synchronisation gaps):", ""]
    lines += _table([r for r in records if "device_ms" in r or "ms" not in r],
                    "device_ms", "device_tflops")
  skipped = sorted({(r["impl"], r["skipped"]) for r in records if "skipped" in r})
  if skipped:
    lines += ["", "Not run:"]
    lines += [f"- {impl}: {why}" for impl, why in skipped]
  return "\n".join(lines) + "\n"


def _table(records: list[dict], ms_key: str, tf_key: str) -> list[str]:
  impls = []
  for r in records:
    if r["impl"] not in impls and any(ms_key in s and s["impl"] == r["impl"]
                                      for s in records):
      impls.append(r["impl"])
  lines = []
  peers = [i for i in ("cudnn", "tokamax", "xla") if i in impls]
  header = ["pattern", "len", "mode", "density"] + impls + [
      f"{p}/ours" for p in peers]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  keys = []
  for r in records:
    key = (r["pattern"], r["seq_len"], r["mode"])
    if key not in keys:
      keys.append(key)
  for key in keys:
    rows = {r["impl"]: r for r in records
            if (r["pattern"], r["seq_len"], r["mode"]) == key}
    density = next(iter(rows.values()))["density"]
    cells = [key[0], f"{key[1] // 1024}K" if key[1] >= 1024 else str(key[1]),
             key[2], f"{density:.3f}"]
    for i in impls:
      r = rows.get(i)
      cells.append(f"{r[ms_key]:.2f} ({r[tf_key]:.0f})" if r and ms_key in r
                   else "—")
    ours = next((rows[i] for i in ("mosaic", "triton")
                 if i in rows and ms_key in rows[i]), None)
    for p in peers:
      r = rows.get(p)
      if r and ms_key in r and ours:
        cells.append(f"{r[ms_key] / ours[ms_key]:.2f}")
      else:
        cells.append("—")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def write_docs(md: str, path: str):
  """Replaces the text between the attention-bench markers (or appends it)."""
  text = open(path).read() if os.path.exists(path) else "# Performance\n"
  block = f"{MARK_START}\n{md}{MARK_END}"
  if MARK_START in text and MARK_END in text:
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    text = head + block + tail
  else:
    text = text.rstrip("\n") + "\n\n## Attention kernels\n\n" + block + "\n"
  with open(path, "w") as f:
    f.write(text)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes, float32, one repeat (CPU smoke run)")
  p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")])
  p.add_argument("--patterns", type=lambda s: s.split(","))
  p.add_argument("--impls", type=lambda s: s.split(","),
                 default=["triton", "mosaic", "cudnn", "tokamax", "xla"])
  p.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd_bwd"])
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="write records here (rewritten after each record)")
  p.add_argument("--device-time", action="store_true",
                 help="also measure each call's kernel time with JAX's profiler")
  p.add_argument("--back-to-back", action="store_true",
                 help="also time 10 calls queued without a sync in between")
  p.add_argument("--markdown", help="update this docs file's attention section")
  p.add_argument("--render", help="only render an earlier JSON to --markdown")
  args = p.parse_args(argv)
  if args.quick and "chunked" not in args.impls:
    args.impls = args.impls + ["chunked"]
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if args.render:
    data = json.load(open(args.render))
    md = markdown(data["records"], data["meta"])
    if args.markdown:
      write_docs(md, args.markdown)
    print(md)
    return data["records"]
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
              python=platform.python_version(),
              dtype=args.dtype or ("float32" if args.quick else "bfloat16"),
              heads=2 if args.quick else args.heads,
              head_dim=32 if args.quick else args.head_dim,
              repeats=1 if args.quick else args.repeats, quick=args.quick)
  def save(records):
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(meta=meta, records=records), f, indent=1)

  records = run(args, on_record=save)
  md = markdown(records, meta)
  print(md)
  if args.markdown:
    write_docs(md, args.markdown)
  return records


if __name__ == "__main__":
  main(sys.argv[1:])
