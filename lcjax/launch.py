"""Runs any experiment: ``python -m lcjax.launch EXPERIMENT [--set key=value ...]``.

Examples::

  python -m lcjax.launch quickstart
  python -m lcjax.launch quickstart --set model.num_layers=6 --set train.steps=400 \
      --workdir runs/deeper
  python -m lcjax.launch --list
  python -m lcjax.launch quickstart --init-from /models/Llama-3.2-1B \
      --set model.attention.schedule=middle_third:sink_window
"""
from __future__ import annotations

import argparse
import sys

from lcjax import config as config_lib
from lcjax import registry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="lcjax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("experiment", nargs="?", help="experiment name (see --list)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. train.steps=100")
  parser.add_argument("--workdir", default=None,
                      help="checkpoints, metrics and TensorBoard files (default runs/NAME)")
  parser.add_argument("--list", action="store_true", help="list experiments and exit")
  parser.add_argument("--print-config", action="store_true",
                      help="print the resolved config and exit")
  parser.add_argument("--init-from", default=None, metavar="HF_FOLDER",
                      help="start from a Hugging Face checkpoint folder (config.json + "
                      "safetensors): sets model.init_from, whose config.json then "
                      "gives the architecture (see docs/huggingface.md)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.list or not args.experiment:
    print("experiments:\n  " + "\n  ".join(registry.names()))
    return 0 if args.list else 2
  overrides = args.set + ([f"model.init_from={args.init_from}"] if args.init_from else [])
  try:
    cfg = config_lib.override(registry.get(args.experiment), overrides)
    if cfg.model.init_from:
      from lcjax.hf import resolve_config  # the architecture of the checkpoint
      cfg = resolve_config(cfg)
  except (KeyError, ValueError, OSError) as e:
    print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(config_lib.to_text(cfg))
    return 0
  from lcjax.train.trainer import train  # imported late: --list stays fast
  train(cfg, args.workdir or f"runs/{cfg.name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
