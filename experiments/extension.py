"""Context extension at CPU scale: train at 128 tokens, extend 4x to 512.

A small byte-level model learns passkey retrieval at 128 tokens
(``extension_base``), then is extended to 512 tokens by

* position interpolation (PI), NTK-aware scaling and YaRN, each without
  training and after a brief fine-tune at 512 (``extension_{pi,ntk,yarn}_ft``);
* Dual Chunk Attention, training-free (chunk 96, local window 8: ChunkLlama's
  3/4 and 1/16 of the trained length);
* E²-LLM: the same fine-tune budget spent at 128 tokens with random
  scale/offset augmentation (``extension_e2llm_ft``), then PI by
  ``length / 128`` at inference;
* LongLoRA: rank-8 LoRA on q/k/v/o + trainable embedding and norms, S²-attn
  at 512 with PI (``extension_longlora_ft``), evaluated with full attention
  after merging the adapters.

Each run is an ordinary experiment: ``python -m lcjax.launch extension_base``
writes ``runs/extension_base`` and the fine-tunes start from its params
(``checkpoint.init_params_from``). ``python -m experiments.extension`` runs
the whole study and writes the passkey table (docs/positions.md); ``--quick``
is the smoke version the tests run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable

from experiments.base import base
from lcjax.config import Config, RopeConfig, override
from lcjax.registry import register


@dataclasses.dataclass(frozen=True)
class Scale:
  """Sizes of the study; :data:`FULL` is the reported one, :data:`QUICK` a smoke test."""
  short: int = 128
  factor: int = 4
  rows_per_step: int = 16  # at the short length; long runs keep the tokens per step
  base_steps: int = 3000
  finetune_steps: int = 400
  samples: int = 16  # passkey prompts per (length, depth)
  depths: tuple[float, ...] = (0.1, 0.5, 0.9)
  model: tuple[str, ...] = ("embed_dim=128", "num_layers=4", "num_heads=4",
                            "num_kv_heads=2", "head_dim=32", "mlp_dim=384")

  @property
  def long(self) -> int:
    return self.short * self.factor

  @property
  def num_heads(self) -> int:
    return int(dict(m.split("=") for m in self.model)["num_heads"])

  @property
  def num_layers(self) -> int:
    return int(dict(m.split("=") for m in self.model)["num_layers"])


FULL = Scale()
QUICK = Scale(short=80, factor=2, rows_per_step=2, base_steps=2, finetune_steps=2,
              samples=1, depths=(0.5,), model=("embed_dim=16", "num_layers=2",
                                               "num_heads=2", "num_kv_heads=1",
                                               "head_dim=8", "mlp_dim=32"))


def base_config(s: Scale) -> Config:
  """The short-context model, trained on passkey rows only.

  (At this scale, text rows with 35% passkey rows taught no retrieval in 800
  steps at lr 3e-3, nor did passkey rows alone in 2,000 steps at lr 3e-3; at
  lr 1e-3 the answer loss is 0.07 by step 1,000.)
  """
  return override(base(), [
      "name=extension_base", *[f"model.{m}" for m in s.model],
      f"data.seq_len={s.short}", f"data.batch_size={s.rows_per_step}",
      "data.passkey_fraction=1.0", f"train.steps={s.base_steps}",
      "train.learning_rate=1e-3", f"train.warmup_steps={max(1, s.base_steps // 20)}",
      f"train.log_every={max(1, s.base_steps // 16)}",
      f"checkpoint.every={max(1, s.base_steps // 4)}", "mesh.data=1", "eval.batches=2",
      f"eval.passkey_lengths={s.short}",
      "eval.passkey_depths=" + ",".join(map(str, s.depths)),
      f"eval.passkey_samples={s.samples}",
  ])


def finetune_config(s: Scale, name: str, base_dir: str, seq_len: int,
                    sets: list[str]) -> Config:
  """A brief fine-tune of the base model's params at ``seq_len`` (same tokens/step)."""
  lengths = sorted({s.short, seq_len})
  return override(base_config(s), [
      f"name={name}", f"checkpoint.init_params_from={base_dir}",
      f"data.seq_len={seq_len}",
      f"data.batch_size={max(1, s.rows_per_step * s.short // seq_len)}",
      f"train.steps={s.finetune_steps}", "train.learning_rate=1e-3",
      f"train.warmup_steps={max(1, s.finetune_steps // 10)}",
      f"train.log_every={max(1, s.finetune_steps // 8)}",
      f"checkpoint.every={s.finetune_steps}",
      "eval.passkey_lengths=" + ",".join(map(str, lengths)), *sets,
  ])


def pi(s: Scale) -> RopeConfig:
  return RopeConfig(kind="linear", factor=float(s.factor))


def ntk(s: Scale) -> RopeConfig:
  return RopeConfig(kind="ntk", factor=float(s.factor))


def yarn(s: Scale) -> RopeConfig:
  return RopeConfig(kind="yarn", factor=float(s.factor), original_max_len=s.short)


def dca(s: Scale) -> RopeConfig:
  return RopeConfig(dca_chunk_size=s.short * 3 // 4, dca_local_window=s.short // 16)


def _rope_sets(rope: RopeConfig) -> list[str]:
  default = RopeConfig()
  return [f"model.rope.{f.name}={getattr(rope, f.name)}" for f in dataclasses.fields(rope)
          if getattr(rope, f.name) != getattr(default, f.name)]


RopeForLength = Callable[[int], RopeConfig]


def finetunes(s: Scale, base_dir: str) -> dict[str, tuple[Config, RopeForLength]]:
  """Method -> (fine-tune config, evaluation RoPE as a function of the length)."""
  long = s.long
  e2llm = RopeConfig(augment="e2llm", augment_max_scale=s.factor)
  e2llm_eval = lambda L: (RopeConfig(kind="linear", factor=L / s.short) if L > s.short
                          else RopeConfig())
  s2 = ["model.lora.rank=8", "model.lora.alpha=16", "train.learning_rate=3e-3",
        "model.attention.layer_kinds=" + ",".join(["shifted_groups"] * s.num_layers),
        f"model.attention.shift_group_size={s.short}",
        f"model.attention.shift_num_heads={s.num_heads}"]
  return {
      "PI": (finetune_config(s, "extension_pi_ft", base_dir, long, _rope_sets(pi(s))),
             lambda L: pi(s)),
      "NTK": (finetune_config(s, "extension_ntk_ft", base_dir, long, _rope_sets(ntk(s))),
              lambda L: ntk(s)),
      "YaRN": (finetune_config(s, "extension_yarn_ft", base_dir, long,
                               _rope_sets(yarn(s))), lambda L: yarn(s)),
      "E²-LLM": (finetune_config(s, "extension_e2llm_ft", base_dir, s.short,
                                 _rope_sets(e2llm)), e2llm_eval),
      "LongLoRA": (finetune_config(s, "extension_longlora_ft", base_dir, long,
                                   _rope_sets(pi(s)) + s2), lambda L: pi(s)),
  }


def training_free(s: Scale) -> dict[str, RopeForLength]:
  return {"plain RoPE (no extension)": lambda L: RopeConfig(), "PI": lambda L: pi(s),
          "NTK": lambda L: ntk(s), "YaRN": lambda L: yarn(s), "DCA": lambda L: dca(s)}


BASE_RUN = "runs/extension_base"


@register
def extension_base() -> Config:
  return base_config(FULL)


@register
def extension_pi_ft() -> Config:
  return finetunes(FULL, BASE_RUN)["PI"][0]


@register
def extension_ntk_ft() -> Config:
  return finetunes(FULL, BASE_RUN)["NTK"][0]


@register
def extension_yarn_ft() -> Config:
  return finetunes(FULL, BASE_RUN)["YaRN"][0]


@register
def extension_e2llm_ft() -> Config:
  return finetunes(FULL, BASE_RUN)["E²-LLM"][0]


@register
def extension_longlora_ft() -> Config:
  return finetunes(FULL, BASE_RUN)["LongLoRA"][0]


# ------------------------------------------------------------------ the study


def passkey_by_length(model_cfg, params, rope_for_length, lengths, s: Scale) -> dict:
  """Mean passkey accuracy over the depths for each length (greedy, exact match)."""
  import numpy as np

  from lcjax.data import tasks
  from lcjax.data.tokenizer import ByteTokenizer
  from lcjax.eval.retrieval import retrieval_accuracy
  from lcjax.model import Decoder

  out = {}
  for L in lengths:
    cfg = dataclasses.replace(model_cfg, rope=rope_for_length(L))
    acc = retrieval_accuracy(Decoder(cfg), params, ByteTokenizer(), tasks.make_passkey,
                             (L,), s.depths, s.samples, seed=1)
    out[L] = float(np.mean(list(acc.values())))
  return out


def run_study(root: str, s: Scale = FULL, methods: tuple[str, ...] | None = None) -> dict:
  """Trains the base model and the fine-tunes under ``root``; returns the
  passkey accuracy of every method by length and the training times.

  ``methods`` restricts the study to these names of :func:`training_free` and
  :func:`finetunes` (default: all). Runs skip the trainer's own passkey eval:
  the study evaluates every method the same way.
  """
  from lcjax.model import lora, schedule
  from lcjax.train.trainer import train

  lengths = (s.short, 2 * s.short, s.long) if s.factor > 2 else (s.short, s.long)
  chosen = lambda name: methods is None or name in methods
  base_dir = os.path.join(root, "extension_base")
  no_eval = ["eval.passkey_samples=0"]
  t0 = time.time()
  base_cfg = override(base_config(s), no_eval)
  base_run = train(base_cfg, base_dir)
  seconds = {"extension_base": base_run.wall_seconds}
  accuracy = {}
  for method, rope_for_length in training_free(s).items():
    if chosen(method):
      accuracy[f"{method}, training-free"] = passkey_by_length(
          base_cfg.model, base_run.params, rope_for_length, lengths, s)
  for method, (cfg, rope_for_length) in finetunes(s, base_dir).items():
    if not chosen(method):
      continue
    cfg = override(cfg, no_eval)
    run = train(cfg, os.path.join(root, cfg.name))
    seconds[cfg.name] = run.wall_seconds
    params, model_cfg = run.params, cfg.model
    if lora.is_enabled(model_cfg):  # LongLoRA: merge, back to full attention
      params, model_cfg = lora.merge(params, model_cfg)
      model_cfg = schedule.with_layer_kinds(model_cfg, ("full",) * model_cfg.num_layers)
      params = schedule.regroup_params(params, model_cfg)
    label = f"{method}, {cfg.train.steps} fine-tune steps at {cfg.data.seq_len}"
    accuracy[label] = passkey_by_length(model_cfg, params, rope_for_length, lengths, s)
  return {"scale": dataclasses.asdict(s), "lengths": list(lengths),
          "accuracy": accuracy, "train_seconds": seconds,
          "total_seconds": time.time() - t0}


def table(study: dict) -> str:
  """Markdown: passkey accuracy (mean over depths) by prompt length."""
  lengths = study["lengths"]
  lines = ["| method | " + " | ".join(f"{L} tokens" for L in lengths) + " |",
           "|---|" + "---:|" * len(lengths)]
  for method, acc in study["accuracy"].items():
    acc = {int(k): v for k, v in acc.items()}
    lines.append(f"| {method} | " + " | ".join(f"{acc[L]:.2f}" for L in lengths) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Context-extension study (CPU scale).")
  parser.add_argument("--workdir", default="runs/extension")
  parser.add_argument("--quick", action="store_true", help="the smoke version (tiny)")
  args = parser.parse_args(argv)
  study = run_study(args.workdir, QUICK if args.quick else FULL)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(study, f, indent=1)
  with open(os.path.join(args.workdir, "table.md"), "w") as f:
    f.write(table(study) + "\n")
  print(table(study))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
