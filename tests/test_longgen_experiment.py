"""Smoke test of the LongGen length-extension pipeline at toy size on CPU."""
import json
import os

from experiments import longgen
from lcjax import registry
from lcjax.model import schedule

TOY = ["model.embed_dim=32", "model.mlp_dim=64", "model.head_dim=8", "data.seq_len=96",
       "data.batch_size=4", "train.steps=2", "train.warmup_steps=1", "train.log_every=1",
       "checkpoint.every=2", "eval.batches=1", "data.niah_fraction=0"]


def test_configs_extend_one_pretrained_model_three_ways():
  pre = registry.get("longgen_cpu_pretrain")
  ext = {v: registry.get(f"longgen_cpu_extend_{v}") for v in longgen.VARIANTS}
  assert all(e.data.seq_len == 4 * pre.data.seq_len for e in ext.values())
  kinds = {v: schedule.layer_kinds(e.model) for v, e in ext.items()}
  assert kinds == {"full": ("full",) * 3, "hybrid": ("sink_window", "full", "sink_window"),
                   "hybrid_bottom": ("full", "sink_window", "sink_window"),
                   "sparse": ("sink_window",) * 3}
  assert set(schedule.layer_kinds(pre.model)) == {"full"}
  gpu = registry.get("longgen_gpu_extend_hybrid")
  assert schedule.layer_kinds(gpu.model).count("full") == 4


def test_pipeline_runs_end_to_end(tmp_path):
  spec = dict(lengths=(96,), depths=(0.5,), samples=1, multikey_lengths=(160,))
  results = longgen.run("cpu", str(tmp_path), log=lambda s: None, spec_overrides=spec,
                        config_overrides=TOY, variants=("hybrid",))
  assert list(results) == ["pretrained only", "hybrid"]
  kv = {name: r["kv_cache"]["kv_bytes"] for name, r in results.items()}
  assert kv["hybrid"] < kv["pretrained only"]
  for r in results.values():
    assert set(r["passkey"]) == {"96@0.5"} and 0.0 <= r["passkey"]["96@0.5"] <= 1.0
    assert len(r["ppl_by_position"]) == 8 and all(b["ppl"] > 1 for b in r["ppl_by_position"])
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["results"]["hybrid"]["multikey"].keys() == {"160@0.5"}
  assert os.path.getsize(tmp_path / "heatmaps.png") > 1000
  assert "| hybrid |" in open(tmp_path / "results.md").read()
