"""The same model gives the same loss and gradients on 1 device and on a 2x2x2 mesh."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lcjax.config import MeshConfig, ModelConfig, TrainConfig
from lcjax.model import Decoder
from lcjax.sharding import logical_to_spec, make_mesh, mesh_shape, put_global_batch
from lcjax.train import step as step_lib
from lcjax.train.optimizer import make_optimizer
from lcjax.train.state import init_state, state_shardings

from sharded_loss import loss_and_grads

CFG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_dim=64)
B, T = 8, 16


def _batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  seg = np.sort(rng.integers(1, 4, (B, T)), axis=1).astype(np.int32)
  starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    for t in range(T):
      pos[b, t] = 0 if starts[b, t] else pos[b, t - 1] + 1
  mask = rng.random((B, T)) < 0.9
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
          "positions": pos, "loss_mask": mask.astype(np.float32)}


def test_one_device_and_eight_devices_agree():
  assert jax.device_count() >= 8, "conftest should provide 8 CPU devices"
  model, tx = Decoder(CFG), make_optimizer(TrainConfig())
  mesh1 = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  with jax.set_mesh(mesh1):
    params = jax.device_get(init_state(model, tx, 7, state_shardings(model, tx, mesh1, T),
                                       T).params)
  batch = _batch(11)
  loss1, grads1, _ = loss_and_grads(CFG, mesh1, params, batch)
  loss8, grads8, params8 = loss_and_grads(CFG, mesh8, params, batch)
  assert np.isfinite(loss1) and loss1 > 0
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for (path, g1), g8 in zip(jax.tree_util.tree_leaves_with_path(grads1),
                            jax.tree.leaves(grads8)):
    np.testing.assert_allclose(g8, g1, rtol=2e-4, atol=1e-6, err_msg=str(path))
  # The parameters really are split over the mesh.
  q_spec = params8["group_0"]["attn"]["q"]["kernel"].sharding.spec
  assert q_spec == P(None, "fsdp", "tensor", None)


def test_train_step_is_the_same_on_both_meshes():
  model, tx = Decoder(CFG), make_optimizer(TrainConfig(learning_rate=1e-3))
  batch = {k: v.reshape(2, B // 2, T) for k, v in _batch(5).items()}  # grad_accum=2
  results = []
  for mesh in (make_mesh(MeshConfig(data=1), jax.devices()[:1]),
               make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])):
    with jax.set_mesh(mesh):
      shardings = state_shardings(model, tx, mesh, T)
      state = init_state(model, tx, 3, shardings, T)
      step = step_lib.jit_train_step(model, tx, mesh, shardings, (2, B // 2, T))
      state, metrics = step(state, put_global_batch(batch, mesh))
      results.append((jax.device_get(metrics), jax.device_get(state.params)))
  (m1, p1), (m8, p8) = results
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_matches_one_big_batch():
  model, tx = Decoder(CFG), make_optimizer(TrainConfig())
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  batch = _batch(9)
  metrics = []
  with jax.set_mesh(mesh):
    shardings = state_shardings(model, tx, mesh, T)
    for accum in (1, 4):
      shaped = {k: v.reshape(accum, B // accum, T) for k, v in batch.items()}
      state = init_state(model, tx, 1, shardings, T)
      step = step_lib.jit_train_step(model, tx, mesh, shardings, (accum, B // accum, T))
      _, m = step(state, put_global_batch(shaped, mesh))
      metrics.append(jax.device_get(m))
  np.testing.assert_allclose(metrics[1]["loss"], metrics[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics[1]["grad_norm"], metrics[0]["grad_norm"], rtol=1e-4)


def test_logical_rules():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  assert logical_to_spec(("batch", "sequence", "embed"), (8, 4, 6), mesh) == \
      P(("data", "fsdp"), None, None)  # fsdp already taken by batch
  assert logical_to_spec(("embed", "mlp"), (6, 8), mesh) == P("fsdp", "tensor")
  assert logical_to_spec(("kv_heads",), (3,), mesh) == P(None)  # 3 % 2 != 0
  with pytest.raises(ValueError, match="logical axis 'embd' has no rule"):
    logical_to_spec(("embd",), None, mesh)


def test_mesh_shape_errors():
  assert mesh_shape(MeshConfig(data=-1, tensor=2), 8) == \
      {"data": 4, "fsdp": 1, "sequence": 1, "tensor": 2}
  with pytest.raises(ValueError, match="needs 10 devices, but only 8"):
    mesh_shape(MeshConfig(data=5, tensor=2), 8)
  with pytest.raises(ValueError, match="not divisible"):
    mesh_shape(MeshConfig(data=-1, tensor=3), 8)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
