"""Starting an experiment from a Hugging Face checkpoint, the LongGen hybrid
conversion of a dense checkpoint, and exporting a run back to transformers."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import hf_logits, make_model, random_tokens, rel_error, transformers
from tiny_tokenizer import write_bpe_tokenizer

from lcjax import config as C
from lcjax import hf, registry
from lcjax.hf.__main__ import main as hf_main
from lcjax.launch import main as launch_main
from lcjax.model import Decoder, schedule
from lcjax.train.trainer import train

TINY = ["data.seq_len=32", "data.batch_size=2", "data.max_documents=40",
        "train.log_every=1", "train.warmup_steps=1", "eval.batches=1",
        "eval.passkey_samples=0", "mesh.data=1", "mesh.fsdp=2", "checkpoint.every=100"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny Llama with a byte-level BPE tokenizer.json (vocab padded to 320)."""
  folder = str(tmp_path_factory.mktemp("llama_tok"))
  model = make_model("llama", seed=7, vocab_size=320, num_hidden_layers=3)
  model.save_pretrained(folder)
  write_bpe_tokenizer(folder, vocab_size=300)
  with open(f"{folder}/tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
  return folder, model


def _cfg(folder, tmp_path, *extra):
  cfg = C.override(registry.get("base"), TINY + [
      f"model.init_from={folder}", f"data.store_dir={tmp_path}/tokens", *extra])
  return hf.resolve_config(cfg)


def test_launcher_takes_the_architecture_from_the_checkpoint(checkpoint, capsys):
  folder, _ = checkpoint
  assert launch_main(["base", "--init-from", folder, "--print-config",
                      "--set", "model.dtype=bfloat16",
                      "--set", "model.attention.schedule=middle_third:sink_window"]) == 0
  out = capsys.readouterr().out
  for line in ("model.embed_dim = 48", "model.num_layers = 3", "model.vocab_size = 320",
               "model.tie_embeddings = False", "model.dtype = 'bfloat16'",
               f"model.init_from = '{folder}'",
               "model.attention.schedule = 'middle_third:sink_window'"):
    assert line in out
  assert launch_main(["base", "--init-from", folder, "--print-config",
                      "--set", "model.attention.layer_kinds=full,full"]) == 2
  assert "layer_kinds has 2 entries but the checkpoint" in capsys.readouterr().err
  assert launch_main(["base", "--init-from", "/nonexistent", "--print-config"]) == 2
  assert "no config.json" in capsys.readouterr().err


def test_training_starts_from_the_checkpoint_and_exports_back(checkpoint, tmp_path):
  folder, model = checkpoint
  cfg = _cfg(folder, tmp_path, "train.steps=0", "train.warmup_steps=0")
  start = train(cfg, str(tmp_path / "start"))
  loaded = hf.load_params(folder, cfg.model)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(start.params)[0],
                          jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))

  run = str(tmp_path / "run")
  result = train(_cfg(folder, tmp_path, "train.steps=2"), run)
  log = open(f"{run}/metrics.jsonl").read()
  assert "train/loss" in log and np.isfinite(result.final_eval["eval_loss"])
  with open(f"{run}/config.json") as f:
    assert json.load(f)["model.embed_dim"] == 48  # the resolved config
  out = str(tmp_path / "exported")
  assert hf_main(["export", run, out, "--dtype", "float32"]) == 0
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = random_tokens(320, seed=11)
  ours = np.asarray(Decoder(cfg.model).apply({"params": result.params}, tokens))
  assert rel_error(hf_logits(reloaded, tokens), ours) < 1e-4
  assert rel_error(hf_logits(reloaded, tokens), hf_logits(model, tokens)) > 1e-6  # trained
  for name in ("tokenizer.json", "tokenizer_config.json"):  # carried over
    assert open(f"{out}/{name}").read() == open(f"{folder}/{name}").read()


def test_longgen_hybrid_from_a_dense_checkpoint(checkpoint, tmp_path):
  """Loading into a hybrid schedule regroups the layers: the same params as
  restacking the dense load, and with a window covering the whole sequence
  the hybrid computes exactly the dense model."""
  folder, model = checkpoint
  base = C.override(registry.get("base"), [f"model.init_from={folder}"])
  dense = hf.resolve_config(base).model
  hybrid = hf.resolve_config(C.override(base, [
      "model.attention.schedule=middle_third:sink_window", "model.attention.sink=2",
      "model.attention.window=64"])).model
  assert schedule.layer_groups(hybrid) == [("sink_window", 1), ("full", 1),
                                           ("sink_window", 1)]
  dense_params = hf.load_params(folder, dense)
  hybrid_params = hf.load_params(folder, hybrid)
  restacked = schedule.regroup_params(dense_params, hybrid)
  assert jax.tree.structure(restacked) == jax.tree.structure(hybrid_params)
  for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(hybrid_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = random_tokens(320, shape=(2, 23), seed=3)
  wide = np.asarray(Decoder(hybrid).apply({"params": hybrid_params}, tokens))
  assert rel_error(wide, hf_logits(model, tokens)) < 1e-4
  narrow_cfg = dataclasses.replace(hybrid, attention=dataclasses.replace(
      hybrid.attention, window=4))
  narrow = np.asarray(Decoder(narrow_cfg).apply({"params": hybrid_params}, tokens))
  assert rel_error(narrow, hf_logits(model, tokens)) > 1e-3  # sparse layers bite
  with pytest.raises(hf.UnsupportedCheckpointError, match="dense_attention=True"):
    hf.save_pretrained(hybrid_params, hybrid, str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()
  out = str(tmp_path / "dense")
  hf.save_pretrained(hybrid_params, hybrid, out, dtype="float32", dense_attention=True)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))


def test_lora_finetune_exports_merged(checkpoint, tmp_path):
  folder, _ = checkpoint
  cfg = hf.resolve_config(C.override(registry.get("base"), [
      f"model.init_from={folder}", "model.lora.rank=2"])).model
  params = hf.load_params(folder, cfg, init_seed=0)
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(  # a "fine-tuned" adapter
      lambda p, x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
      if "lora_b" in jax.tree_util.keystr(p) else x, params)
  out = str(tmp_path / "merged")
  hf.save_pretrained(params, cfg, out, dtype="float32")
  tokens = random_tokens(320, seed=4)
  ours = np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(tokens)))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert rel_error(hf_logits(reloaded, tokens), ours) < 1e-4
