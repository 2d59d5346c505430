"""A whole model under context parallelism (sequence=4 x data=2) gives the loss,
gradients and hidden states of the unsharded run."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from lcjax.config import (AttentionConfig, ContextParallelConfig, MeshConfig,
                          ModelConfig, TrainConfig)
from lcjax.model import Decoder
from lcjax.parallel import context
from lcjax.sharding import make_mesh, put_global_batch
from lcjax.train.optimizer import make_optimizer
from lcjax.train.state import init_state, state_shardings

from sharded_loss import loss_and_grads

# A causal layer (the strategy under test) and a sink + window layer (the
# sparse exchange). Strided layers and head-dependent routing are covered in
# test_parallel_attention.py.
CFG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_dim=48,
                  attention=AttentionConfig(layer_kinds=("full", "sink_window"),
                                            sink=2, window=6))
B, T = 4, 64


def _batch(seed):
  """Packed documents with per-document RoPE positions and a partial loss mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  seg = np.sort(rng.integers(1, 4, (B, T)), axis=1).astype(np.int32)
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    for t in range(1, T):
      pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
  mask = (rng.random((B, T)) < 0.9).astype(np.float32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
          "positions": pos, "loss_mask": mask}


@pytest.fixture(scope="module")
def unsharded():
  model, tx = Decoder(CFG), make_optimizer(TrainConfig())
  mesh1 = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  with jax.set_mesh(mesh1):
    params = jax.device_get(init_state(model, tx, 3, state_shardings(model, tx, mesh1, T),
                                       T).params)
  batch = _batch(17)
  return params, batch, loss_and_grads(CFG, mesh1, params, batch)[:2]


@pytest.mark.parametrize("strategy, load_balance, degree", [
    ("ring", "zigzag", 1), ("ulysses", "striped", 1),
])
def test_model_loss_and_gradients_match_unsharded(unsharded, strategy, load_balance,
                                                  degree):
  params, batch, (loss1, grads1) = unsharded
  cfg = dataclasses.replace(CFG, context_parallel=ContextParallelConfig(
      strategy, load_balance, degree))
  mesh = make_mesh(MeshConfig(data=2, sequence=4), jax.devices()[:8])
  with jax.set_mesh(mesh):
    assert context.active_layout(cfg.context_parallel, T).kind == load_balance
  loss, grads, _ = loss_and_grads(cfg, mesh, params, batch)
  assert np.isfinite(loss1) and loss1 > 0
  np.testing.assert_allclose(loss, loss1, rtol=1e-5)
  for (path, g1), g in zip(jax.tree_util.tree_leaves_with_path(grads1),
                           jax.tree.leaves(grads)):
    np.testing.assert_allclose(g, g1, rtol=2e-4, atol=2e-6, err_msg=str(path))


def test_hidden_states_in_natural_order(unsharded):
  """Callers passing rows in natural order (generation, evaluation) get them
  back in natural order: the model permutes in and out."""
  params, batch, _ = unsharded
  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  expected = Decoder(CFG).apply({"params": params}, *args, method=Decoder.hidden)
  mesh = make_mesh(MeshConfig(data=2, sequence=4), jax.devices()[:8])
  with jax.set_mesh(mesh):
    hidden = jax.jit(lambda p, *a: Decoder(CFG).apply({"params": p}, *a,
                                                      method=Decoder.hidden))(
        params, *put_global_batch(dict(zip("abc", args)), mesh).values())
    assert context.model_layout(CFG, T).kind == "zigzag"
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(expected), rtol=2e-5,
                             atol=2e-5)
