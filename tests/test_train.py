"""End-to-end training: the loss falls, resume continues the identical curve, SIGTERM saves."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from lcjax import config as C
from lcjax import registry
from lcjax.train.trainer import train

TINY = [
    "model.embed_dim=32", "model.num_layers=2", "model.num_heads=2",
    "model.num_kv_heads=1", "model.head_dim=16", "model.mlp_dim=64",
    "data.seq_len=64", "data.batch_size=4", "train.learning_rate=3e-3",
    "train.warmup_steps=2", "train.log_every=1", "eval.batches=1",
    "eval.passkey_samples=0", "mesh.data=1", "checkpoint.every=3",
]


def _cfg(*extra):
  return C.override(registry.get("base"), TINY + list(extra))


def _losses(history):
  return {r["step"]: r["train/loss"] for r in history if "train/loss" in r}


def test_resume_continues_the_same_loss_curve(tmp_path):
  straight = train(_cfg("train.steps=6"), str(tmp_path / "straight"))
  first = train(_cfg("train.steps=3"), str(tmp_path / "resumed"))
  assert first.steps_run == 3
  assert os.path.isdir(tmp_path / "resumed" / "checkpoints" / "3")
  second = train(_cfg("train.steps=6"), str(tmp_path / "resumed"))
  assert second.steps_run == 3  # started from the step-3 checkpoint
  a, b = _losses(straight.history), _losses(second.history)
  assert sorted(b) == [4, 5, 6]
  np.testing.assert_allclose([b[s] for s in (4, 5, 6)], [a[s] for s in (4, 5, 6)],
                             rtol=1e-6)
  lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines if "train/loss" in l] == list(range(1, 7))
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "straight" / "tensorboard"))


def test_loss_falls_and_final_eval_runs(tmp_path):
  result = train(_cfg("train.steps=30", "checkpoint.every=100"), str(tmp_path))
  losses = _losses(result.history)
  assert np.mean([losses[s] for s in (28, 29, 30)]) < losses[1] - 0.5
  assert np.isfinite(result.final_eval["eval_loss"])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 30


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  cmd = [sys.executable, "-m", "lcjax.launch", "base", "--workdir", str(tmp_path),
         *sum((["--set", s] for s in TINY + ["train.steps=100000",
                                               "checkpoint.every=100000"]), [])]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and
                                         len(metrics.read_text().splitlines()) >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  assert "SIGTERM: saving a checkpoint" in out
  steps = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert steps and max(steps) >= 2


def test_launcher_lists_and_rejects_bad_keys(capsys):
  from lcjax.launch import main
  assert main(["--list"]) == 0
  assert "quickstart" in capsys.readouterr().out
  assert main(["quickstart", "--set", "train.stpes=3"]) == 2
  assert "unknown config key 'train.stpes'" in capsys.readouterr().err
  assert main(["quickstart", "--set", "train.steps=7", "--print-config"]) == 0
  assert "train.steps = 7" in capsys.readouterr().out
