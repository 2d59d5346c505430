"""Sharded safetensors files, streaming onto a device mesh, dtypes, slice reads."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hf_models import hf_logits, make_model, random_tokens, rel_error, transformers

from lcjax import hf
from lcjax.config import MeshConfig
from lcjax.hf import layout, loader
from lcjax.hf.safetensors_io import INDEX_FILE, CheckpointReader
from lcjax.model import Decoder
from lcjax.sharding import make_mesh


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  """A Llama checkpoint written by transformers in several shards + index."""
  model = make_model("llama", seed=3)
  folder = str(tmp_path_factory.mktemp("sharded"))
  model.save_pretrained(folder, max_shard_size="40KB")
  return folder, model


def _flat(params):
  return {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}


def test_transformers_shards_have_an_index(sharded):
  folder, _ = sharded
  with open(os.path.join(folder, INDEX_FILE)) as f:
    files = set(json.load(f)["weight_map"].values())
  assert len(files) > 2


def test_streams_onto_the_mesh_with_logical_shardings(sharded):
  folder, model = sharded
  cfg = hf.model_config_from_hf(hf.read_config(folder))
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  params = hf.load_params(folder, cfg, mesh)
  expected = loader.param_shardings(cfg, mesh)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(leaves) == len(expected)
  for kp, x in leaves:
    assert x.sharding == expected[tuple(k.key for k in kp)], kp
  q = params["group_0"]["attn"]["q"]["kernel"]  # [layers, embed, heads, head_dim]
  assert q.sharding.spec[1:3] == ("fsdp", "tensor")
  assert len({str(s.index) for s in q.addressable_shards}) == 8
  single = hf.load_params(folder, cfg)
  for key, value in _flat(single).items():
    np.testing.assert_array_equal(np.asarray(_flat(params)[key]), np.asarray(value))
  tokens = random_tokens(cfg.vocab_size)
  with jax.set_mesh(mesh):
    ours = np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, tokens))
  assert rel_error(ours, hf_logits(model, tokens)) < 1e-4


def test_each_shard_is_read_once_and_nothing_more(sharded, monkeypatch):
  """Bytes read from the files == the model's bytes: no replica read twice,
  no tensor read whole for a device that holds a slice."""
  folder, _ = sharded
  cfg = hf.model_config_from_hf(hf.read_config(folder))
  read_bytes = []
  original = CheckpointReader.slice_reader

  def counting(self, name):
    read = original(self, name)

    def wrapped(box):
      out = read(box)
      read_bytes.append(out.nbytes)
      return out
    return wrapped
  monkeypatch.setattr(CheckpointReader, "slice_reader", counting)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # "data": replicas
  params = hf.load_params(folder, cfg, mesh)
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  assert sum(read_bytes) == total
  assert max(read_bytes) < total / 8


def test_assemble_reads_each_distinct_shard_once():
  mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))
  full = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  calls = []

  def read(index):
    calls.append(index)
    return full[index]
  x = loader.assemble(full.shape, sharding, np.dtype(ml_dtypes.bfloat16), read)
  assert len(calls) == 4  # 8 devices, 2 replicas of each of 4 shards
  assert x.dtype == jnp.bfloat16 and x.sharding == sharding
  np.testing.assert_array_equal(np.asarray(x), full.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rule_reads_any_box_like_the_full_tensor(seed):
  rng = np.random.default_rng(seed)
  N, H, D = 6, 4, 10
  rule = layout.TensorRule("w", ("attn", "q", "kernel"), ((N, H), (D,)), (2, 0, 1))
  hf_w = rng.normal(size=rule.hf_shape).astype(np.float32)
  ours = rule.to_ours(hf_w)
  assert ours.shape == rule.shape == (D, N, H)
  np.testing.assert_array_equal(rule.to_hf(ours), hf_w)
  boxes = []
  for dim in rule.shape:
    a = int(rng.integers(0, dim))
    boxes.append(slice(a, int(rng.integers(a + 1, dim + 1))))
  seen = []

  def get_slice(box):
    seen.append(box)
    return hf_w[box]
  np.testing.assert_array_equal(rule.read_slice(get_slice, boxes), ours[tuple(boxes)])
  rows = seen[0][0]
  assert rows.stop - rows.start == (boxes[1].stop - boxes[1].start) * H  # heads only


def test_dtype_choice(sharded):
  folder, _ = sharded
  cfg = hf.model_config_from_hf(hf.read_config(folder))
  f32 = hf.load_params(folder, cfg)
  bf16 = hf.load_params(folder, cfg, dtype="bfloat16")
  for key, value in _flat(bf16).items():
    assert value.dtype == jnp.bfloat16, key
    np.testing.assert_array_equal(np.asarray(value),
                                  np.asarray(_flat(f32)[key]).astype(ml_dtypes.bfloat16))


def test_sharded_export_from_the_mesh_reloads_identically(sharded, tmp_path):
  folder, model = sharded
  cfg = hf.model_config_from_hf(hf.read_config(folder))
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  params = hf.load_params(folder, cfg, mesh)
  out = str(tmp_path / "out")
  files = hf.save_pretrained(params, cfg, out, dtype="float32", max_shard_size="30KB")
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  with open(os.path.join(out, INDEX_FILE)) as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == files
  sizes = [os.path.getsize(os.path.join(out, name)) for name in files]
  assert max(sizes) < 30_000 + 20_000  # one tensor may exceed the limit alone
  tokens = random_tokens(cfg.vocab_size, seed=5)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))
  assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_missing_shard_file_is_a_clear_error(sharded, tmp_path):
  folder, _ = sharded
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in ("config.json", INDEX_FILE):
    (broken / name).write_bytes(open(os.path.join(folder, name), "rb").read())
  with pytest.raises(FileNotFoundError, match="shard file"):
    CheckpointReader(str(broken))
  (broken / INDEX_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    CheckpointReader(str(broken))
