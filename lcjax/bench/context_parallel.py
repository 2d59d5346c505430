"""Context-parallel attention benchmark: scaling over GPUs, and the 1-GPU overhead.

    python -m lcjax.bench.context_parallel                    # all local GPUs
    python -m lcjax.bench.context_parallel --mode overhead    # one GPU: < 5%?
    python -m lcjax.bench.context_parallel --mode check       # all GPUs: errors
                                                              # vs one GPU
    python -m lcjax.bench.context_parallel --quick            # CPU smoke run
                                                              # (4 CPU devices)

``--mode scaling`` times one attention layer, forward + backward, for each
strategy (ring, allgather, ulysses, hybrid), load balancing and pattern on
meshes whose ``sequence`` axis has 1, 2, 4, ... devices:

* weak scaling: ``--tokens_per_device`` tokens per GPU (sequence grows with P);
* strong scaling: ``--seq_len`` tokens in total.

Every run is jitted, warmed up, then timed ``--repeats`` times; the median is
reported with the effective TFLOP/s per GPU (visible pairs only: forward
``4 * visible * head_dim``, backward 2.5x that) and the efficiency against the
same pattern on one GPU through plain ``attend`` (weak: per-GPU TF/s ratio;
strong: ``t1 / (P * tP)``). The one-GPU baselines ``attend`` and cuDNN
(``jax.nn.dot_product_attention``, where it runs the pattern) are timed in the
same process.

``--mode overhead`` (one GPU): plain ``attend`` against ``context_attention``
on a mesh whose ``sequence`` axis has size 1 (the model's path: a direct call,
must stay within 5%) and against the ring machinery forced onto that single
device (``shard_map`` + ``custom_vjp`` + merge), for information.
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lcjax.attention import attend, block_mask, cudnn
from lcjax.attention import patterns as P
from lcjax.bench.timing import median_ms
from lcjax.config import ContextParallelConfig, MeshConfig
from lcjax.parallel import context, local
from lcjax.parallel.layout import SequenceLayout, shard_view
from lcjax.parallel.plan import build_plan
from lcjax.parallel.ring import ring_attention
from lcjax.sharding import make_mesh

STRATEGIES = {  # name -> config (hybrid's Ulysses degree is set per P)
    "ring/zigzag": ContextParallelConfig("ring", "zigzag"),
    "ring/striped": ContextParallelConfig("ring", "striped"),
    "ring/none": ContextParallelConfig("ring", "none"),
    "allgather/zigzag": ContextParallelConfig("allgather", "zigzag"),
    "ulysses/zigzag": ContextParallelConfig("ulysses", "zigzag"),
    "hybrid/zigzag": ContextParallelConfig("hybrid", "zigzag", ulysses_degree=2),
}


def patterns(quick: bool) -> dict[str, P.Pattern]:
  if quick:
    return {"causal": P.Causal(), "sink_window": P.SinkWindow(4, 31)}
  return {"causal": P.Causal(), "sink64_window4096": P.SinkWindow(64, 4095)}


def visible(pattern: P.Pattern, length: int, heads: int) -> int:
  if isinstance(pattern, P.Causal):
    return heads * length * (length + 1) // 2
  return block_mask.visible_count(pattern, length, length, heads,
                                  block=max(64, length // 256))


def _fwd_bwd(attention: Callable):
  """Jitted ``(q, k, v, ct) -> (dq, dk, dv)`` of ``<attention(q, k, v), ct>``;
  ``ct`` is an argument, not a constant baked into the program."""
  def loss(q, k, v, ct):
    return jnp.vdot(attention(q, k, v).astype(jnp.float32), ct.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _inputs(rng, batch, length, heads, kv_heads, head_dim, dtype, sharding=None):
  shapes = [(batch, length, heads, head_dim), (batch, length, kv_heads, head_dim),
            (batch, length, kv_heads, head_dim), (batch, length, heads, head_dim)]
  arrays = [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]
  return [jax.device_put(a, sharding) for a in arrays] if sharding else arrays


def _single_gpu(args, pattern, length, rng, dtype) -> dict[str, float]:
  """Milliseconds of fwd+bwd for the one-GPU baselines."""
  q, k, v, ct = _inputs(rng, args.batch, length, args.heads, args.kv_heads,
                        args.head_dim, dtype)
  out = {"attend": median_ms(_fwd_bwd(lambda q, k, v: attend(q, k, v, pattern)),
                             (q, k, v, ct), args.repeats)}
  if not cudnn.supports(q.shape, k.shape, q.dtype, pattern, False, None):
    out["cudnn"] = median_ms(_fwd_bwd(lambda q, k, v: cudnn.cudnn_attention(
        q, k, v, pattern)), (q, k, v, ct), args.repeats)
  return out


def _context_time(args, cp, pattern, length, devices, rng, dtype) -> float:
  mesh = make_mesh(MeshConfig(data=1, sequence=len(devices)), devices)
  with jax.set_mesh(mesh):
    sharding = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    q, k, v, ct = _inputs(rng, args.batch, length, args.heads, args.kv_heads,
                          args.head_dim, dtype, sharding)
    fn = _fwd_bwd(lambda q, k, v: context.context_attention(
        q, k, v, pattern, config=cp))
    return median_ms(fn, (q, k, v, ct), args.repeats)


def scaling(args, emit: Callable[[dict], None]) -> None:
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(args.seed)
  devices = jax.devices()
  counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= len(devices)]
  for name, pattern in patterns(args.quick).items():
    if args.patterns and name not in args.patterns:
      continue
    for regime in args.regimes:
      base_len = args.tokens_per_device if regime == "weak" else args.seq_len
      one = _single_gpu(args, pattern, base_len, rng, dtype)
      flops1 = 3.5 * 4.0 * visible(pattern, base_len, args.heads) * args.head_dim * (
          args.batch)
      for impl, ms in one.items():
        emit(dict(pattern=name, regime=regime, devices=1, strategy=impl,
                  seq_len=base_len, ms=ms, tflops_per_device=flops1 / ms / 1e9))
      for n in counts[1:]:
        length = base_len * n if regime == "weak" else base_len
        flops = 3.5 * 4.0 * visible(pattern, length, args.heads) * args.head_dim * (
            args.batch)
        for strategy, cp in STRATEGIES.items():
          if args.strategies and strategy not in args.strategies:
            continue
          rec = dict(pattern=name, regime=regime, devices=n, strategy=strategy,
                     seq_len=length)
          if cp.strategy == "hybrid" and n < 4:
            rec["skipped"] = "hybrid needs >= 4 devices (Ulysses degree 2)"
          else:
            try:
              ms = _context_time(args, cp, pattern, length, devices[:n], rng, dtype)
              per_device = flops / ms / 1e9 / n
              base = one["attend"]
              efficiency = (per_device / (flops1 / base / 1e9) if regime == "weak"
                            else base / (n * ms))
              rec.update(ms=ms, tflops_per_device=per_device, efficiency=efficiency)
            except Exception as e:  # pylint: disable=broad-except
              rec["error"] = (str(e).splitlines() or [type(e).__name__])[0][:200]
          emit(rec)


def overhead(args, emit: Callable[[dict], None]) -> None:
  """One device: plain attend vs the model's CP entry and the forced ring."""
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(args.seed)
  length = args.seq_len
  device = jax.devices()[:1]
  mesh = make_mesh(MeshConfig(data=1, sequence=1), device)
  for name, pattern in patterns(args.quick).items():
    q, k, v, ct = _inputs(rng, args.batch, length, args.heads, args.kv_heads,
                          args.head_dim, dtype)
    layout = SequenceLayout("none", 1, length)
    view = shard_view(layout)
    plan = build_plan(pattern, view, args.heads)
    ring_args = local.AttendArgs(pattern, None, None, "auto")

    def forced_ring(q, k, v):
      return jax.shard_map(
          lambda q, k, v: ring_attention(q, k, v, None, plan=plan, args=ring_args),
          in_specs=(PartitionSpec(None, "sequence"),) * 3,
          out_specs=PartitionSpec(None, "sequence"), axis_names={"sequence"},
          check_vma=False)(q, k, v)

    impls = {
        "attend": lambda q, k, v: attend(q, k, v, pattern),
        "context_attention (sequence=1)": lambda q, k, v: context.context_attention(
            q, k, v, pattern, config=ContextParallelConfig("ring")),
        "ring machinery forced (sequence=1)": forced_ring,
    }
    with jax.set_mesh(mesh):
      base = {}
      for mode in ("fwd", "fwd_bwd"):
        for impl, fn in impls.items():
          jit = jax.jit if mode == "fwd" else _fwd_bwd
          operands = (q, k, v) if mode == "fwd" else (q, k, v, ct)
          jitted = jit(fn)
          ms = median_ms(jitted, operands, args.repeats)
          base.setdefault(mode, ms)
          rec = dict(pattern=name, mode=mode, impl=impl, seq_len=length, ms=ms,
                     overhead=ms / base[mode] - 1.0)
          if impl.startswith("context_attention"):
            rec["within_5_percent"] = rec["overhead"] < 0.05
            rec["same_program_as_attend"] = _program(jitted, *operands) == _program(
                jit(impls["attend"]), *operands)
          emit(rec)


def check(args, emit: Callable[[dict], None]) -> None:
  """All devices: context-parallel fwd+bwd against one-device ``attend``, both
  measured by their relative error to the float32 dense reference."""
  dtype = jnp.dtype(args.dtype)
  n = len(jax.devices())
  length = args.check_tokens_per_device * n
  rng = np.random.default_rng(args.seed)
  q, k, v, ct = _inputs(rng, args.batch, length, args.heads, args.kv_heads,
                        args.head_dim, dtype)
  f32 = lambda x: x.astype(jnp.float32)

  def outputs_and_grads(attention, q, k, v, ct):
    def loss(q, k, v):
      out = attention(q, k, v)
      return jnp.vdot(f32(out), f32(ct)), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        q, k, v)
    return [f32(x) for x in (out, *grads)]

  mesh = make_mesh(MeshConfig(data=1, sequence=n))
  for name, pattern in patterns(args.quick).items():
    if args.patterns and name not in args.patterns:
      continue
    truth = jax.jit(lambda q, k, v, ct: outputs_and_grads(
        lambda q, k, v: attend(q, k, v, pattern, implementation="reference"),
        q, k, v, ct))(f32(q), f32(k), f32(v), ct)
    single = jax.jit(lambda q, k, v, ct: outputs_and_grads(
        lambda q, k, v: attend(q, k, v, pattern), q, k, v, ct))(q, k, v, ct)
    for strategy, cp in STRATEGIES.items():
      if (args.strategies and strategy not in args.strategies) or (
          cp.strategy == "hybrid" and n < 4):
        continue
      with jax.set_mesh(mesh):
        layout = context.active_layout(cp, length)
        sharding = NamedSharding(mesh, PartitionSpec(None, "sequence"))
        put = lambda x: jax.device_put(layout.permute(np.asarray(x), axis=1),
                                       sharding)
        ours = jax.jit(lambda q, k, v, ct: outputs_and_grads(
            lambda q, k, v: context.context_attention(q, k, v, pattern, config=cp),
            q, k, v, ct))(put(q), put(k), put(v), put(ct))
        ours = [layout.unpermute(np.asarray(x), axis=1) for x in ours]
      rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b))
                               / np.linalg.norm(np.asarray(b)))
      rec = dict(pattern=name, strategy=strategy, devices=n, seq_len=length)
      for key, a, one, want in zip(("out", "dq", "dk", "dv"), ours, single, truth):
        rec[f"{key}_rel_err"], rec[f"{key}_rel_err_one_device"] = rel(a, want), rel(
            one, want)
      emit(rec)


# A Mosaic GPU kernel's serialized module and hash differ between two
# lowerings of the same call (jax 0.11.2), so they are masked; the kernel's
# operands, results and everything around it are still compared.
_MOSAIC_PAYLOAD = re.compile(r'(kernel_hash|module) = "[^"]*"')


def comparable_program(text: str) -> str:
  """Lowered program text without its module name line and Mosaic payloads."""
  return _MOSAIC_PAYLOAD.sub(r'\1 = "..."', "\n".join(text.splitlines()[1:]))


def _program(jitted, *args) -> str:
  return comparable_program(jitted.lower(*args).as_text())


def _print(rec: dict) -> None:
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in rec.items()}), flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("scaling", "overhead", "check"),
                      default="scaling")
  parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
  parser.add_argument("--tokens_per_device", type=int, default=8192)
  parser.add_argument("--seq_len", type=int, default=65536)
  parser.add_argument("--check_tokens_per_device", type=int, default=1024,
                      help="--mode check: tokens per device")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--strategies", nargs="*", default=None,
                      help=f"subset of {list(STRATEGIES)}")
  parser.add_argument("--patterns", nargs="*", default=None,
                      help="subset of the pattern names (default all)")
  parser.add_argument("--regimes", nargs="*", default=["weak", "strong"],
                      choices=["weak", "strong"])
  parser.add_argument("--out", default="", help="write the records as JSON here")
  args = parser.parse_args(argv)
  if args.quick:
    try:  # 4 CPU devices, unless the backends already started (e.g. under pytest)
      jax.config.update("jax_num_cpu_devices", 4)
    except RuntimeError:
      pass  # keep the devices there are
    args.tokens_per_device, args.seq_len, args.check_tokens_per_device = 64, 128, 32
    args.heads, args.kv_heads, args.head_dim = 4, 2, 16
    args.dtype, args.repeats = "float32", 1
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}",
        flush=True)
  records = []

  def emit(rec: dict) -> None:
    """Prints a record and rewrites ``--out`` with all so far, so that a run
    cut short (time limit, a compiler crash) keeps what it measured."""
    records.append(rec)
    _print(rec)
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"args": vars(args), "device": jax.devices()[0].device_kind,
                   "device_count": jax.device_count(), "records": records}, f,
                  indent=1)

  {"scaling": scaling, "overhead": overhead, "check": check}[args.mode](args, emit)


if __name__ == "__main__":
  main()
