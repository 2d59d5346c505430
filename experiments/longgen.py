"""LongGen length extension (Ge et al., 2024, "A Little Goes a Long Way").

Pretrain a small model with full attention at a short length, then extend it to
a longer context three ways -- (a) full attention everywhere, (b) the LongGen
hybrid (the middle third of the layers full, the others attention sink +
sliding window), (c) all layers sparse, plus a placement ablation (the bottom
third full) -- and compare passkey / multi-key NIAH accuracy over lengths x
depths and perplexity by position. The paper's claim is hybrid ~ full >>
all-sparse at a fraction of the KV cache. Results: ``docs/longgen.md``.

Each stage is an experiment of its own (``python -m lcjax.launch
longgen_cpu_extend_hybrid --set checkpoint.init_params_from=runs/...``); the
whole pipeline with the evaluation, a table and heatmaps is::

  python -m experiments.longgen --scale cpu --workdir runs/longgen_cpu
  python -m experiments.longgen --scale gpu --workdir runs/longgen_gpu
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from experiments.base import base
from lcjax.config import Config, override
from lcjax.registry import register as _register

# Run as a script, this file is ``__main__``; the registry imports it again as
# ``experiments.longgen``, which is where the experiments are registered.
register = _register if __name__ != "__main__" else (lambda fn: fn)

VARIANTS = {  # extension variant -> attention.schedule
    "full": "none:sink_window",
    "hybrid": "middle_third:sink_window",  # LongGen's placement
    "hybrid_bottom": "bottom_third:sink_window",  # placement ablation
    "sparse": "all:sink_window",
}

# ---------------------------------------------------------------- CPU scale
# A 3-layer byte-level model pretrained at 128 tokens and extended 4x to 512;
# the hybrid keeps the middle layer full; sparse layers keep 4 sink + 32 window
# tokens (7% of 512). Retrieval answers are one digit: within a CPU budget of
# minutes such a model learns one-hop retrieval, not the induction copying that
# 5-digit keys need.

_CPU_MODEL = [
    "model.embed_dim=64", "model.num_layers=3", "model.num_heads=4",
    "model.num_kv_heads=2", "model.head_dim=16", "model.mlp_dim=192",
    "model.attention.sink=4", "model.attention.window=32", "mesh.data=1",
    # Retrieval rows (lcjax.data.tasks): 1-digit answers, 2-key NIAH, answer
    # tokens weighted 64x so the text rows do not drown them.
    "data.answer_digits=1", "data.niah_keys=2", "data.answer_weight=64",
]
_CPU_SPEC = dict(
    lengths=(128, 256, 512), depths=(0.0, 0.25, 0.5, 0.75, 1.0), samples=8,
    multikey_lengths=(256, 384, 512))


@register
def longgen_cpu_pretrain() -> Config:
  return override(base(), _CPU_MODEL + [
      "name=longgen_cpu_pretrain", "data.seq_len=128", "data.batch_size=32",
      "data.passkey_fraction=1.0",
      "train.steps=500", "train.learning_rate=3e-3", "train.warmup_steps=30",
      "train.log_every=50", "checkpoint.every=250", "eval.passkey_samples=0",
  ])


def _cpu_extend(variant: str) -> Config:
  return override(base(), _CPU_MODEL + [
      f"name=longgen_cpu_extend_{variant}", f"model.attention.schedule={VARIANTS[variant]}",
      "data.seq_len=512", "data.batch_size=8",
      "data.passkey_fraction=0.5", "data.niah_fraction=0.4",
      "train.steps=150", "train.learning_rate=1e-3", "train.warmup_steps=15",
      "train.log_every=25", "checkpoint.every=150", "eval.passkey_samples=0",
      "checkpoint.init_params_from=runs/longgen_cpu/pretrain",
  ])


@register
def longgen_cpu_extend_full() -> Config:
  return _cpu_extend("full")


@register
def longgen_cpu_extend_hybrid() -> Config:
  return _cpu_extend("hybrid")


@register
def longgen_cpu_extend_hybrid_bottom() -> Config:
  return _cpu_extend("hybrid_bottom")


@register
def longgen_cpu_extend_sparse() -> Config:
  return _cpu_extend("sparse")


# ---------------------------------------------------------------- GPU scale
# ~150M parameters, pretrained at 2K and extended 8x to 16K; sparse layers keep
# 64 sink + 1024 window tokens (1/15 of 16K), as LongGen keeps ~1/64 at 128K.

_GPU_MODEL = [
    "model.embed_dim=1024", "model.num_layers=12", "model.num_heads=16",
    "model.num_kv_heads=4", "model.head_dim=64", "model.mlp_dim=2816",
    "model.dtype=bfloat16", "model.remat=dots",
    "model.attention.sink=64", "model.attention.window=1024",
    "data.answer_digits=5", "data.niah_keys=4", "data.answer_weight=8",
]
_GPU_SPEC = dict(
    lengths=(2048, 4096, 8192, 16384), depths=(0.0, 0.25, 0.5, 0.75, 1.0), samples=16,
    multikey_lengths=(2048, 4096, 8192, 16384))


@register
def longgen_gpu_pretrain() -> Config:
  return override(base(), _GPU_MODEL + [
      "name=longgen_gpu_pretrain", "data.seq_len=2048", "data.batch_size=32",
      "data.passkey_fraction=0.3", "data.niah_fraction=0.1",
      "train.steps=2000", "train.learning_rate=1e-3",
      "train.warmup_steps=100", "train.log_every=50", "checkpoint.every=500",
      "eval.passkey_samples=0",
  ])


def _gpu_extend(variant: str) -> Config:
  return override(base(), _GPU_MODEL + [
      f"name=longgen_gpu_extend_{variant}", f"model.attention.schedule={VARIANTS[variant]}",
      "data.seq_len=16384", "data.batch_size=4",
      "data.passkey_fraction=0.3", "data.niah_fraction=0.2",
      "train.steps=300", "train.learning_rate=3e-4", "train.warmup_steps=30",
      "train.log_every=25", "checkpoint.every=300", "eval.passkey_samples=0",
      "checkpoint.init_params_from=runs/longgen_gpu/pretrain",
  ])


@register
def longgen_gpu_extend_full() -> Config:
  return _gpu_extend("full")


@register
def longgen_gpu_extend_hybrid() -> Config:
  return _gpu_extend("hybrid")


@register
def longgen_gpu_extend_hybrid_bottom() -> Config:
  return _gpu_extend("hybrid_bottom")


@register
def longgen_gpu_extend_sparse() -> Config:
  return _gpu_extend("sparse")


# ---------------------------------------------------------------- pipeline

SCALES = {"cpu": _CPU_SPEC, "gpu": _GPU_SPEC}


def _evaluate(name: str, cfg: Config, params, spec: dict[str, Any], eval_seq_len: int,
              log) -> dict[str, Any]:
  import dataclasses

  from lcjax.data.pipeline import make_source
  from lcjax.data.tokenizer import ByteTokenizer
  from lcjax.inference import Engine
  from lcjax.inference import evaluate as ev
  from lcjax.model import Decoder

  tokenizer = ByteTokenizer()
  longest = max(max(spec["lengths"]), max(spec["multikey_lengths"]))
  engine = Engine(cfg.model, params, max_len=longest + 16,
                  prefill_chunk=min(longest, 4096), vocab_limit=tokenizer.vocab_size)
  t = time.time()
  passkey = ev.retrieval_grid(engine, tokenizer, "passkey", spec["lengths"], spec["depths"],
                              spec["samples"], digits=cfg.data.answer_digits)
  multikey = ev.retrieval_grid(engine, tokenizer, "multikey", spec["multikey_lengths"],
                               spec["depths"], spec["samples"], num_keys=cfg.data.niah_keys,
                               digits=cfg.data.answer_digits)
  source = make_source(dataclasses.replace(cfg.data, seq_len=eval_seq_len), tokenizer)
  ppl = ev.perplexity_by_position(Decoder(cfg.model), params, source.eval_batches(4))
  log(f"{name}: evaluated in {time.time() - t:.0f}s")
  return {"passkey": _cells(passkey), "multikey": _cells(multikey), "ppl_by_position": ppl,
          "kv_cache": engine.kv_report()}


def _cells(grid: dict) -> dict[str, float]:
  return {f"{length}@{depth}": acc for (length, depth), acc in grid.items()}


def _mean(cells: dict[str, float], length: int | None = None) -> float:
  vals = [v for k, v in cells.items() if length is None or int(k.split("@")[0]) == length]
  return sum(vals) / max(len(vals), 1)


def markdown_table(results: dict[str, Any], spec: dict[str, Any]) -> str:
  """Mean accuracy per length for each model, plus KV bytes and perplexity."""
  lines = []
  head = ["model"] + [f"passkey {n}" for n in spec["lengths"]] + [
      f"NIAH-{spec['num_keys']} {n}" for n in spec["multikey_lengths"]] + [
      "KV cache", "ppl first/last bucket"]
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  for name, r in results.items():
    kv = r["kv_cache"]
    row = [name] + [f"{_mean(r['passkey'], n):.2f}" for n in spec["lengths"]] + [
        f"{_mean(r['multikey'], n):.2f}" for n in spec["multikey_lengths"]] + [
        f"{1 - kv['reduction']:.0%} of full",
        f"{r['ppl_by_position'][0]['ppl']:.2f} / {r['ppl_by_position'][-1]['ppl']:.2f}"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def heatmaps(results: dict[str, Any], spec: dict[str, Any], path: str) -> None:
  """One accuracy heatmap (depth x length) per model and task, in one PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  tasks_ = [("passkey", spec["lengths"]), ("multikey", spec["multikey_lengths"])]
  fig, axes = plt.subplots(len(tasks_), len(results),
                           figsize=(3.2 * len(results), 2.8 * len(tasks_)), squeeze=False)
  for j, (name, r) in enumerate(results.items()):
    for i, (task, lengths) in enumerate(tasks_):
      grid = np.array([[r[task][f"{n}@{d}"] for n in lengths] for d in spec["depths"]])
      ax = axes[i, j]
      ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
      ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
      ax.set_yticks(range(len(spec["depths"])), [f"{d:.0%}" for d in spec["depths"]],
                    fontsize=7)
      for (y, x), v in np.ndenumerate(grid):
        ax.text(x, y, f"{v:.1f}", ha="center", va="center", fontsize=7)
      ax.set_title(f"{name}\n{task}", fontsize=8)
      if j == 0:
        ax.set_ylabel("needle depth", fontsize=7)
      if i == len(tasks_) - 1:
        ax.set_xlabel("context length", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(scale: str, workdir: str, log=print, spec_overrides: dict | None = None,
        config_overrides: list[str] = (), variants=tuple(VARIANTS)) -> dict[str, Any]:
  """Pretrain, extend three ways, evaluate; writes results.json/.md and heatmaps.png."""
  from lcjax import registry
  from lcjax.train.trainer import train
  spec = {**SCALES[scale], **(spec_overrides or {})}
  os.makedirs(workdir, exist_ok=True)
  pre_dir = os.path.join(workdir, "pretrain")
  pre_cfg = override(registry.get(f"longgen_{scale}_pretrain"), list(config_overrides))
  spec.update(num_keys=pre_cfg.data.niah_keys, digits=pre_cfg.data.answer_digits)
  t0 = time.time()
  params = {"pretrained only": (pre_cfg, train(pre_cfg, pre_dir).params)}
  log(f"pretrained in {time.time() - t0:.0f}s")
  for variant in variants:
    cfg = override(registry.get(f"longgen_{scale}_extend_{variant}"),
                   list(config_overrides) + [f"checkpoint.init_params_from={pre_dir}"])
    t = time.time()
    params[variant] = (cfg, train(cfg, os.path.join(workdir, variant)).params)
    log(f"extended '{variant}' in {time.time() - t:.0f}s")
  ext_len = list(params.values())[-1][0].data.seq_len  # an extended stage
  results = {name: _evaluate(name, cfg, p, spec, ext_len, log)
             for name, (cfg, p) in params.items()}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"spec": spec, "results": results}, f, indent=1)
  table = markdown_table(results, spec)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  heatmaps(results, spec, os.path.join(workdir, "heatmaps.png"))
  log(table)
  log(f"total {time.time() - t0:.0f}s; results in {workdir}")
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--samples", type=int, default=None, help="prompts per cell")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override applied to every stage")
  parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
  args = parser.parse_args(argv)
  spec = {} if args.samples is None else {"samples": args.samples}
  run(args.scale, args.workdir or f"runs/longgen_{args.scale}", spec_overrides=spec,
      config_overrides=args.set, variants=tuple(args.variants))
  return 0


if __name__ == "__main__":
  from experiments import longgen
  sys.exit(longgen.main())
