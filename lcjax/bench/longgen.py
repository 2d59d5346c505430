"""LongGen benchmark: full attention vs the hybrid, same model size, same process.

    python -m lcjax.bench.longgen                    # GPU: ~1B model, 32K/64K/128K
    python -m lcjax.bench.longgen --quick            # tiny CPU smoke run
    python -m lcjax.bench.longgen --render runs/longgen_bench.json --markdown docs/longgen.md

For a ~1B-parameter Llama-style model (16 layers, d=2048, 16 heads of 128, 4
kv heads, SwiGLU 8192, vocab 32K, bf16 compute, full remat) with full attention
in every layer ("full") and with LongGen's schedule (the middle third full, the
others attention sink 64 + window 1984, i.e. 1/64 of 128K tokens; "hybrid"):

* training step time (forward, backward, AdamW; batch 1) at each length, with
  the model FLOP/s that ``lcjax.train.flops`` counts (sparse layers count less);
* prefill time of one prompt of the longest length (the engine's one-shot
  prefill: attention kernels with static offsets), and, if time is left,
  chunked prefill in chunks of ``--prefill-chunk``;
* decode tokens/s after that prompt (greedy, one compiled loop of
  ``--decode-steps`` steps) at each batch size of ``--decode-batch`` (the
  prompt's caches repeated per row); ``--profile`` prints the device time of
  each kernel of a decode step;
* KV cache bytes of the engine's caches at the longest length.

Each measurement is warmed up (compilation excluded) and the median of
``--repeats`` runs is reported. A deadline (``--budget-s``) skips what is left
so the whole run stays within the device budget; skipped or failed items are
listed. Results go to JSON and to the benchmark section of ``docs/longgen.md``
(between the ``longgen-bench`` markers); a short table is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import AttentionConfig, MeshConfig, ModelConfig, TrainConfig
from lcjax.model import Decoder, param_count, schedule

MARK_START = "<!-- longgen-bench:start -->"
MARK_END = "<!-- longgen-bench:end -->"


def model_config(quick: bool, sparse: str, variant: str) -> ModelConfig:
  """The benchmark model; ``variant`` "full" or "hybrid" (middle third full)."""
  if quick:
    att = AttentionConfig(sink=8, window=56, block_size=16, stride=4)
    base = ModelConfig(vocab_size=256, embed_dim=64, num_layers=6, num_heads=4,
                       num_kv_heads=2, head_dim=16, mlp_dim=128, attention=att)
  else:
    att = AttentionConfig(sink=64, window=1984, block_size=128, stride=16)
    base = ModelConfig(vocab_size=32000, embed_dim=2048, num_layers=16, num_heads=16,
                       num_kv_heads=4, head_dim=128, mlp_dim=8192, dtype="bfloat16",
                       remat="full", attention=att)
  kinds = ("full",) * base.num_layers if variant == "full" else schedule.middle_full(
      base.num_layers, sparse)
  return schedule.with_layer_kinds(base, kinds)


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


class Deadline:
  def __init__(self, seconds: float):
    self.end = time.time() + seconds

  def left(self) -> float:
    return self.end - time.time()


def bench_train(cfg: ModelConfig, seq_len: int, repeats: int) -> dict[str, Any]:
  """Median step time of the trainer's own jitted step (batch 1, ``seq_len``)."""
  from lcjax.sharding import make_mesh
  from lcjax.train import step as step_lib
  from lcjax.train.flops import flops_per_token
  from lcjax.train.optimizer import make_optimizer
  from lcjax.train.state import init_state, state_shardings

  mesh = make_mesh(MeshConfig(data=1))
  model = Decoder(cfg)
  tx = make_optimizer(TrainConfig(steps=1000, warmup_steps=10))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, size=(1, 1, seq_len + 1), dtype=np.int32)
  batch = {"tokens": tokens[..., :-1], "targets": tokens[..., 1:],
           "segment_ids": np.ones((1, 1, seq_len), np.int32),
           "positions": np.arange(seq_len, dtype=np.int32)[None, None],
           "loss_mask": np.ones((1, 1, seq_len), np.float32)}
  with jax.set_mesh(mesh):
    # Parameter shapes do not depend on the length: initialise with 128 tokens
    # rather than compiling and running a forward pass at ``seq_len``.
    shardings = state_shardings(model, tx, mesh, 128)
    state = init_state(model, tx, 0, shardings, 128)
    step = step_lib.jit_train_step(model, tx, mesh, shardings, (1, 1, seq_len))
    batch = jax.device_put(batch, step_lib.batch_shardings(mesh, (1, 1, seq_len)))
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t
    box = {"state": state}

    def one():
      box["state"], m = step(box["state"], batch)
      return m

    seconds = _median_time(one, repeats)
    box.clear()
    del state
  flops = flops_per_token(cfg, seq_len) * seq_len
  return {"step_s": seconds, "first_step_s": first, "model_tflops": flops / seconds / 1e12}


def _inference_params(cfg: ModelConfig):
  """Random bf16 (compute dtype) parameters, made on the device."""
  model = Decoder(cfg)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
  import flax.linen as nn
  params = nn.unbox(init(jax.random.key(0)))
  return params, param_count(params)


def bench_inference(cfg: ModelConfig, prompt_len: int, decode_steps: int,
                    decode_batches: tuple[int, ...], prefill_chunk: int, repeats: int,
                    deadline: Deadline, log, profile: bool = False) -> dict[str, Any]:
  """One-shot prefill of one prompt, decode tokens/s after it at each batch size
  (the prompt's caches repeated per row), KV bytes; chunked prefill if time is left."""
  from lcjax.inference import Engine

  cfg = dataclasses.replace(cfg, param_dtype=cfg.dtype, remat="none")
  params, n_params = _inference_params(cfg)
  # Room for the warm-up, the timed and the profiled decode loops.
  max_len = prompt_len + (repeats + 2) * decode_steps + 8
  out: dict[str, Any] = {"params": n_params, "prompt_len": prompt_len,
                         "decode_batches": list(decode_batches)}
  prompts = [np.random.default_rng(1).integers(0, cfg.vocab_size, size=prompt_len,
                                               dtype=np.int32)]
  engine = Engine(cfg, params, max_len=max_len, prefill_chunk=max_len)
  out["kv_cache"] = engine.kv_report(batch=1)
  t = time.perf_counter()
  state, logits = engine.prefill(prompts)
  jax.block_until_ready(logits)
  out["prefill_first_s"] = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    del state
    t = time.perf_counter()
    state, logits = engine.prefill(prompts)
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - t)
  out["prefill_s"] = statistics.median(times)
  first = jnp.argmax(logits, -1).astype(jnp.int32)
  # Decode with the Pallas kernel (GPU only) and with XLA's fused jnp, from
  # copies of the prefilled caches (decoding donates them), at each batch size.
  impls = ["pallas", "xla"] if jax.default_backend() == "gpu" else ["xla"]
  out["decode"] = {}
  for batch in decode_batches:
    rows = out["decode"][str(batch)] = {}
    for impl in impls:
      if deadline.left() < 45:
        rows[impl] = {"error": "skipped: time budget"}
        continue
      st = jax.tree.map(lambda x: jnp.repeat(x, batch, axis=0), state)
      try:
        rows[impl] = _time_decode(cfg, params, max_len, st, jnp.repeat(first, batch),
                                  decode_steps, batch, impl, repeats,
                                  profile and impl == impls[0])
      except Exception as e:  # a kernel that does not lower, OOM: keep the other numbers
        rows[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      del st
      d = rows[impl]
      log(f"    decode batch {batch} {impl}: " + (
          f"{d['ms_per_step']:.2f} ms/step, {d['tokens_per_s']:.0f} tok/s"
          if "ms_per_step" in d else d["error"]))
    timed = {i: d for i, d in rows.items() if "tokens_per_s" in d}
    if timed:
      rows["best"] = max(timed, key=lambda i: timed[i]["tokens_per_s"])
  log(f"    prefill {out['prefill_s']:.3f}s")
  if prefill_chunk and prefill_chunk < prompt_len and deadline.left() > 60:
    del state
    chunked = Engine(cfg, params, max_len=max_len, prefill_chunk=prefill_chunk)
    state, logits = chunked.prefill(prompts)  # compile + warm-up
    jax.block_until_ready(logits)
    del state
    t = time.perf_counter()
    state, logits = chunked.prefill(prompts)
    jax.block_until_ready(logits)
    out["chunked_prefill_s"] = time.perf_counter() - t
    out["prefill_chunk"] = prefill_chunk
  return out


def _time_decode(cfg, params, max_len, state, first, steps, batch, impl, repeats,
                 profile: bool = False) -> dict[str, Any]:
  """Tokens/s of ``steps`` greedy steps in one compiled loop: the median of
  ``repeats`` loops after a warm-up loop (the first loop after the warm-up also
  compiles the small eager ops around it and was up to 2x slow); ``profile``:
  also print the device time of each kernel of one more loop."""
  from lcjax.inference import Engine
  cfg = dataclasses.replace(cfg, attention=dataclasses.replace(
      cfg.attention, decode_implementation=impl))
  engine = Engine(cfg, params, max_len=max_len, prefill_chunk=max_len)
  box = {"state": state, "tokens": first[:, None]}
  del state

  def loop():
    box["state"], box["tokens"] = engine.decode(box["state"], box["tokens"][:, -1], steps)
    return box["tokens"]

  t = time.perf_counter()
  jax.block_until_ready(loop())  # compile + warm-up
  first_s = time.perf_counter() - t
  seconds = [_median_time(loop, 1) for _ in range(repeats)]
  if profile:
    from lcjax.bench.profile import format_kernel_times, kernel_times
    per_step = {k: v / steps for k, v in kernel_times(loop, repeats=1).items()}
    print(format_kernel_times(per_step, title=f"decode step, batch {batch}, {impl}:"),
          flush=True)
  box.clear()
  median = statistics.median(seconds)
  return {"impl": impl, "first_s": first_s, "ms_per_step": 1e3 * median / steps,
          "loops_ms_per_step": [1e3 * s / steps for s in seconds],
          "tokens_per_s": batch * steps / median}


def check_on_device() -> dict[str, float]:
  """Max errors on this device: the decode kernel against its float32 reference
  (float32 inputs; on GPU the compiled Triton kernel), and a tiny hybrid model's
  cached decoding against its own forward pass."""
  import flax.linen as nn

  from lcjax.attention.patterns import Causal, SinkWindow, StridedBlockSparse
  from lcjax.inference import Engine
  from pallas_kernels.decode_attention import decode_attention, decode_attention_reference

  out = {}
  rng = np.random.default_rng(int(time.time()))
  B, N, K, H, S = 2, 8, 2, 64, 512
  for name, pattern, P in (("causal", Causal(), 1), ("sink_window", SinkWindow(16, 100), 1),
                           ("strided", StridedBlockSparse(32, 4, 1), K)):
    for T in (1, 24):
      q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
      k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
      v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
      k_pos = jnp.asarray(np.stack([np.stack([rng.permutation(S) for _ in range(P)])
                                    for _ in range(B)]), jnp.int32)
      q_pos = jnp.asarray(rng.integers(S // 2, S, size=(B, T)), jnp.int32)
      bound = jnp.asarray([S, S - 100], jnp.int32)
      args = (q, q_pos, k, v, k_pos, bound, pattern)
      got, _ = decode_attention(*args, interpret=jax.default_backend() == "cpu")
      want, _ = decode_attention_reference(*args)
      out[f"kernel_{name}_T{T}_max_abs_err"] = float(jnp.max(jnp.abs(got - want)))
  cfg = ModelConfig(vocab_size=97, embed_dim=64, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=128, attention=AttentionConfig(
                        layer_kinds=("sink_window", "full", "strided"), sink=4, window=24,
                        block_size=16, stride=3))
  model = Decoder(cfg)
  tokens = jnp.asarray(rng.integers(0, 97, size=(2, 160)), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :8]))["params"]
  want = jax.jit(model.apply)({"params": params}, tokens)
  engine = Engine(cfg, params, max_len=160, prefill_chunk=64)
  state, logits = engine.prefill(list(np.asarray(tokens[:, :100])))
  errs = [float(jnp.max(jnp.abs(logits - want[:, 99])))]
  for t in range(100, 159):
    state, logits = engine.step(state, tokens[:, t])
    errs.append(float(jnp.max(jnp.abs(logits - want[:, t]))))
  out["engine_cached_vs_forward_max_abs_err"] = max(errs)
  return out


def run(args, log=print) -> dict[str, Any]:
  deadline = Deadline(args.budget_s)
  variants = ("full", "hybrid")
  cfgs = {v: model_config(args.quick, args.sparse, v) for v in variants}
  record: dict[str, Any] = {
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
      "quick": args.quick, "sparse": args.sparse, "repeats": args.repeats,
      "model": {k: v for k, v in dataclasses.asdict(cfgs["full"]).items()
                if k not in ("attention", "rope", "lora")},
      "attention": {k: getattr(cfgs["hybrid"].attention, k)
                    for k in ("sink", "window", "block_size", "stride", "local_blocks")},
      "kinds": {v: list(schedule.layer_kinds(c)) for v, c in cfgs.items()},
      "train": {v: {} for v in variants}, "inference": {}, "skipped": [], "errors": [],
  }
  lengths = sorted(args.lengths, reverse=True)  # the headline (longest) first
  plan: list[tuple[str, Callable[[], None]]] = []

  def add_train(variant, length):
    def job():
      record["train"][variant][str(length)] = bench_train(cfgs[variant], length, args.repeats)
    plan.append((f"train {variant} {length}", job))

  def add_inference(variant):
    def job():
      record["inference"][variant] = bench_inference(
          cfgs[variant], args.prompt_len or max(lengths), args.decode_steps,
          tuple(args.decode_batch), args.prefill_chunk, args.repeats, deadline, log,
          args.profile)
    plan.append((f"inference {variant}", job))

  def check():
    record["checks"] = check_on_device()
    log("    " + ", ".join(f"{k} {v:.1e}" for k, v in record["checks"].items()))
  if not args.skip_checks:
    plan.append(("correctness checks", check))
  train, infer = "train" in args.parts, "inference" in args.parts
  for variant in variants if train else ():
    add_train(variant, lengths[0])
  for variant in variants if infer else ():
    add_inference(variant)
  for length in lengths[1:] if train else ():
    for variant in variants:
      add_train(variant, length)

  for name, job in plan:
    if deadline.left() < args.min_left_s:
      record["skipped"].append(f"{name}: time budget ({args.budget_s:.0f}s) used up")
      continue
    log(f"  {name} ({deadline.left():.0f}s left)")
    try:
      job()
    except Exception as e:  # OOM or a kernel that does not lower: record and go on
      message = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      record["errors"].append(f"{name}: {message}")
      log(f"    failed: {message}")
      if args.verbose:
        traceback.print_exc()
    jax.clear_caches()
  return record


# ------------------------------------------------------------------ reports


def _len(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _bytes(n) -> str:
  if n is None:
    return "—"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _speedup(slow, fast) -> str:
  """``slow / fast`` as "1.80x faster" (or "1.25x slower" below 1)."""
  if not slow or not fast:
    return "—"
  r = slow / fast
  return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def summary_rows(record: dict[str, Any]) -> list[tuple[str, str, str, str]]:
  """``(metric, full, hybrid, hybrid vs full)`` rows."""
  rows = []
  tr = record["train"]
  for length in sorted({int(k) for v in tr.values() for k in v}):
    f, h = tr["full"].get(str(length)), tr["hybrid"].get(str(length))
    rows.append((f"train step {_len(length)} (s)",
                 f"{f['step_s']:.3f}" if f else "—", f"{h['step_s']:.3f}" if h else "—",
                 _speedup(f and f["step_s"], h and h["step_s"])))
  inf = record["inference"]
  f, h = inf.get("full"), inf.get("hybrid")
  if f or h:
    n = (f or h)["prompt_len"]
    get = lambda r, k: r.get(k) if r else None
    fmt = lambda x, spec: format(x, spec) if x is not None else "—"
    rows.append((f"prefill {_len(n)} (s)", fmt(get(f, "prefill_s"), ".3f"),
                 fmt(get(h, "prefill_s"), ".3f"),
                 _speedup(get(f, "prefill_s"), get(h, "prefill_s"))))
    if get(f, "chunked_prefill_s") or get(h, "chunked_prefill_s"):
      c = (f or h).get("prefill_chunk")
      rows.append((f"chunked prefill {_len(n)}, chunks {c} (s)",
                   fmt(get(f, "chunked_prefill_s"), ".3f"),
                   fmt(get(h, "chunked_prefill_s"), ".3f"),
                   _speedup(get(f, "chunked_prefill_s"), get(h, "chunked_prefill_s"))))
    for batch in (f or h).get("decode", {}):
      best = lambda r: (r["decode"][batch].get(r["decode"][batch].get("best"))
                        if r and batch in r.get("decode", {}) else None)
      tok = lambda r: best(r)["tokens_per_s"] if best(r) else None
      tag = lambda r: f" [{best(r)['impl']}]" if best(r) else ""
      rows.append((f"decode after {_len(n)}, batch {batch} (tok/s)",
                   fmt(tok(f), ".1f") + tag(f), fmt(tok(h), ".1f") + tag(h),
                   _speedup(tok(h), tok(f))))
    kv_f = f and f["kv_cache"]["kv_bytes"]
    kv_h = h and h["kv_cache"]["kv_bytes"]
    rows.append((f"KV cache at {_len(n)}", _bytes(kv_f), _bytes(kv_h),
                 f"{1 - kv_h / kv_f:.0%} smaller" if kv_f and kv_h else "—"))
  return rows


def markdown(record: dict[str, Any]) -> str:
  m, a = record["model"], record["attention"]
  n_full = record["kinds"]["hybrid"].count("full")
  lines = [
      f"Device: {record['device']}; jax {record['jax']}; {record['date']}; median of "
      f"{record['repeats']} after warm-up (compilation excluded).",
      "",
      f"Model: {m['num_layers']} layers, d={m['embed_dim']}, {m['num_heads']} heads x "
      f"{m['head_dim']}, {m['num_kv_heads']} kv heads, MLP {m['mlp_dim']}, vocab "
      f"{m['vocab_size']}, {m['dtype']}, remat {m['remat']} (training). Hybrid: layers "
      f"{[i for i, k in enumerate(record['kinds']['hybrid']) if k == 'full']} full "
      f"({n_full}/{m['num_layers']}), the others {record['sparse']} (sink {a['sink']}, "
      f"window {a['window']}" + (f", blocks {a['block_size']}, stride {a['stride']}"
                                  if record['sparse'] == "strided" else "") + ").",
      "",
      "| metric | full | hybrid | hybrid vs full |",
      "|---|---|---|---|",
  ]
  lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(record)]
  tr = record["train"]
  details = [f"train {v} {k}: {r['step_s']:.3f}s/step, {r['model_tflops']:.3g} model TFLOP/s"
             for v in tr for k, r in tr[v].items()]
  if details:
    lines += ["", "Model FLOP/s (matmul FLOPs of visible pairs, `lcjax.train.flops`): " +
              "; ".join(details) + "."]
  if record.get("checks"):
    lines += ["", "Correctness on this device (max abs error): " + ", ".join(
        f"{k.replace('_max_abs_err', '')} {v:.1e}" for k, v in record["checks"].items())
        + "."]
  dec = []
  for v, r in record["inference"].items():
    for batch, per_impl in r.get("decode", {}).items():
      for impl, d in per_impl.items():
        if impl != "best":
          dec.append(f"{v} batch {batch} {impl}: " + (
              f"{d['ms_per_step']:.2f} ms/step" if "ms_per_step" in d else d["error"]))
  if dec:
    lines += ["", "Decode per implementation of the cache attention: " + "; ".join(dec) + "."]
  for kind in ("skipped", "errors"):
    if record[kind]:
      lines += ["", f"{kind.capitalize()}:"] + [f"- {x}" for x in record[kind]]
  if record.get("notes"):  # e.g. where a record merged from several runs came from
    lines += ["", "Notes:"] + [f"- {x}" for x in record["notes"]]
  return "\n".join(lines)


def write_markdown(record: dict[str, Any], path: str) -> None:
  """Replaces the section between the markers in ``path`` (appends it if absent)."""
  section = f"{MARK_START}\n{markdown(record)}\n{MARK_END}"
  text = open(path).read() if os.path.exists(path) else ""
  if MARK_START in text and MARK_END in text:
    head, rest = text.split(MARK_START, 1)
    text = head + section + rest.split(MARK_END, 1)[1]
  else:
    text = text.rstrip() + ("\n\n" if text else "") + section + "\n"
  with open(path, "w") as f:
    f.write(text)


def print_table(record: dict[str, Any]) -> None:
  rows = [("metric", "full", "hybrid", "hybrid vs full")] + summary_rows(record)
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
  for kind in ("skipped", "errors"):
    for x in record[kind]:
      print(f"{kind}: {x}")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny model and lengths (CPU)")
  p.add_argument("--lengths", type=int, nargs="+", default=None,
                 help="training lengths (default 32768 65536 131072; quick: 256 512)")
  p.add_argument("--prompt-len", type=int, default=None,
                 help="prefill/decode prompt length (default: the longest length)")
  p.add_argument("--decode-steps", type=int, default=None)
  p.add_argument("--decode-batch", type=int, nargs="+", default=[1],
                 help="decode batch sizes (the prompt's caches repeated per row)")
  p.add_argument("--parts", nargs="+", choices=("train", "inference"),
                 default=["train", "inference"], help="what to measure")
  p.add_argument("--skip-checks", action="store_true",
                 help="skip the on-device correctness checks")
  p.add_argument("--profile", action="store_true",
                 help="print the device time per kernel of a decode step")
  p.add_argument("--prefill-chunk", type=int, default=None,
                 help="also time chunked prefill with this chunk (0: skip)")
  p.add_argument("--sparse", choices=schedule.SPARSE_KINDS, default="sink_window")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--budget-s", type=float, default=None,
                 help="stop starting new measurements after this many seconds")
  p.add_argument("--min-left-s", type=float, default=None,
                 help="start a measurement only with at least this much budget left")
  p.add_argument("--json", default="runs/longgen_bench.json")
  p.add_argument("--markdown", default=None, help="file whose bench section to rewrite "
                 "(default docs/longgen.md on GPU, none with --quick)")
  p.add_argument("--render", default=None, help="only render this JSON into --markdown")
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)
  q = args.quick
  args.lengths = args.lengths or ([128, 256] if q else [32768, 65536, 131072])
  args.decode_steps = args.decode_steps or (8 if q else 64)
  args.prefill_chunk = (args.prefill_chunk if args.prefill_chunk is not None
                        else (128 if q else 0))
  args.repeats = args.repeats or 2
  args.budget_s = args.budget_s or (600.0 if q else 390.0)
  args.min_left_s = args.min_left_s if args.min_left_s is not None else (0.0 if q else 60.0)
  if args.markdown is None and not q:
    args.markdown = "docs/longgen.md"
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.render:
    with open(args.render) as f:
      record = json.load(f)
  else:
    print(f"LongGen bench on {jax.devices()[0].device_kind} (jax {jax.__version__}), "
          f"budget {args.budget_s:.0f}s", flush=True)
    t = time.time()
    record = run(args, log=lambda s: print(s, flush=True))
    record["wall_s"] = time.time() - t
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)
    print(f"wrote {args.json} ({record['wall_s']:.0f}s)")
  if args.markdown:
    write_markdown(record, args.markdown)
    print(f"wrote the bench section of {args.markdown}")
  print_table(record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
