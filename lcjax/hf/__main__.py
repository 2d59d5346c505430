"""Command line: ``python -m lcjax.hf {config,export} ...``.

  python -m lcjax.hf config /models/Qwen2.5-0.5B          # the mapped ModelConfig
  python -m lcjax.hf export runs/my_run exported/ --dtype bfloat16

``export`` writes the params of an lcjax run's checkpoint (latest, or
``--step``) as a Hugging Face folder; if the run started from a Hugging Face
checkpoint (``model.init_from``), that folder's token ids and tokenizer files
are carried over.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from lcjax import config as config_lib


def config_from_run(run_dir: str) -> config_lib.Config:
  """The resolved config a run wrote to ``run_dir/config.json``."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {run_dir!r}: not an lcjax run directory")
  with open(path) as f:
    flat = json.load(f)
  cfg = config_lib.Config()
  for key, value in flat.items():
    cfg = config_lib.replace(cfg, key, value)
  return cfg


def restore_run_params(run_dir: str, cfg: config_lib.Config, step: int | None = None):
  """Params of a run's checkpoint, sharded over all devices (``fsdp``)."""
  import jax
  from lcjax.model import Decoder, lora
  from lcjax.sharding import make_mesh
  from lcjax.train.checkpoint import Checkpointer
  from lcjax.train.optimizer import make_optimizer
  from lcjax.train.state import abstract_state, state_shardings

  mesh = make_mesh(config_lib.MeshConfig(data=1, fsdp=-1))
  model = Decoder(cfg.model)
  tx = lora.freeze(make_optimizer(cfg.train), cfg.model)
  seq_len = cfg.data.seq_len
  with jax.set_mesh(mesh):
    shardings = state_shardings(model, tx, mesh, seq_len)
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), cfg.checkpoint)
    try:
      step = checkpointer.latest_step() if step is None else step
      if step is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}/checkpoints")
      state, _ = checkpointer.restore(step, abstract_state(model, tx, shardings, seq_len))
    finally:
      checkpointer.close()
  return state.params


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lcjax.hf", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  show = sub.add_parser("config", help="print the ModelConfig of an HF checkpoint")
  show.add_argument("folder")
  export = sub.add_parser("export", help="write an lcjax run as an HF checkpoint")
  export.add_argument("run_dir")
  export.add_argument("out_dir")
  export.add_argument("--step", type=int, default=None)
  export.add_argument("--dtype", default="bfloat16",
                      choices=("bfloat16", "float16", "float32"))
  export.add_argument("--family", default=None, choices=("llama", "qwen2", "mistral"))
  export.add_argument("--max-shard-size", default="5GB")
  export.add_argument("--dense-attention", action="store_true",
                      help="write every layer as full attention (the only way to "
                      "export sink/strided layers; the params are the same)")
  args = parser.parse_args(argv)

  from lcjax import hf
  try:
    if args.command == "config":
      cfg = hf.model_config_from_hf(hf.read_config(args.folder))
      print(config_lib.to_text(cfg))
      return 0
    cfg = config_from_run(args.run_dir)
    params = restore_run_params(args.run_dir, cfg, args.step)
    files = hf.save_pretrained(params, cfg.model, args.out_dir, family=args.family,
                               dtype=args.dtype, base=cfg.model.init_from or None,
                               max_shard_size=args.max_shard_size,
                               dense_attention=args.dense_attention)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out_dir}: config.json, {', '.join(files)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
