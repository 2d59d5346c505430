"""E²-LLM position augmentation, V2PE increments, and the train-step hook."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcjax.config import ModelConfig, RopeConfig
from lcjax.model import Decoder
from lcjax.positions import augment
from lcjax.train.loss import loss_sums
from lcjax.train.step import make_train_step
from lcjax.train.state import TrainState


def test_e2llm_rows_are_scaled_and_offset_within_the_trained_range():
  B, T, G = 64, 50, 4
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  out = np.asarray(augment.e2llm_positions(positions, jax.random.key(0), G))
  steps = np.diff(out, axis=1)
  scale = 1.0 / steps.min(axis=1)  # steps are 1/g, and (1 + t)/g at the split
  np.testing.assert_allclose(scale, np.round(scale), atol=1e-4)
  assert set(np.round(scale).astype(int)) == {1, 2, 3, 4}
  for row, g in zip(out, np.round(scale)):
    jumps = np.flatnonzero(np.abs(np.diff(row) - 1 / g) > 1e-4)
    assert len(jumps) <= 1  # one split point: t positions inserted there
    if jumps.size:
      t = (row[jumps[0] + 1] - row[jumps[0]]) * g - 1
      assert 0 < t <= (g - 1) * (T - 1) + 1e-3 and abs(t - round(t)) < 1e-3
    assert row[0] == 0 and row[-1] <= T - 1 + 1e-4  # max scaled distance <= trained
  assert (np.abs(np.diff(out, axis=1) - steps[:, :1]) > 1e-4).any(axis=1).mean() > 0.4


def test_e2llm_augmentation_is_a_pure_function_of_seed_and_step():
  cfg = RopeConfig(augment="e2llm", augment_max_scale=3, augment_seed=7)
  batch = {"positions": jnp.broadcast_to(jnp.arange(16), (2, 4, 16))}
  a = augment.augment_batch(cfg, batch, jnp.int32(5))["positions"]
  b = augment.augment_batch(cfg, batch, jnp.int32(5))["positions"]
  c = augment.augment_batch(cfg, batch, jnp.int32(6))["positions"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert augment.augment_batch(RopeConfig(), batch, 5) is batch
  with pytest.raises(ValueError, match="rope.augment='e3llm'"):
    augment.augment_batch(RopeConfig(augment="e3llm"), batch, 5)


def test_train_step_trains_on_augmented_positions():
  """The hook sits in the train step: its loss is the loss on the E²-LLM
  positions of (seed, step), not on the batch's own positions."""
  cfg = ModelConfig(vocab_size=32, embed_dim=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8, mlp_dim=16,
                    rope=RopeConfig(augment="e2llm", augment_max_scale=4))
  tokens = jax.random.randint(jax.random.key(1), (1, 2, 24), 0, 32)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, -1),
           "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(24), tokens.shape),
           "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
  model = Decoder(cfg)
  params = jax.jit(model.init)(jax.random.key(2), tokens[0])["params"]
  # Larger q/k/v/o weights than the init's: attention that depends on positions.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 40.0 if "attn" in jax.tree_util.keystr(p) else x, params)
  tx = optax.sgd(0.1)
  state = TrainState(step=jnp.int32(3), params=params, opt_state=tx.init(params))
  step = jax.jit(make_train_step(model, tx))
  loss = jax.jit(lambda b: jnp.divide(*loss_sums(model, params, b)))
  first = jax.tree.map(lambda x: x[0], batch)
  augmented = augment.augment_batch(cfg.rope, batch, state.step)
  trained = float(step(state, batch)[1]["loss"])
  np.testing.assert_allclose(trained, loss(jax.tree.map(lambda x: x[0], augmented)),
                             rtol=1e-5)
  assert abs(trained - float(loss(first))) > 1e-4
  assert trained == float(step(state, batch)[1]["loss"])  # deterministic per step
  assert trained != float(step(state.replace(step=jnp.int32(4)), batch)[1]["loss"])


def test_v2pe_positions_are_running_sums_of_increments():
  inc = jnp.array([[1, 1, 0.25, 0.25, 0.25, 0.25, 1, 1]], jnp.float32)
  np.testing.assert_allclose(augment.positions_from_increments(inc),
                             [[0, 1, 2, 2.25, 2.5, 2.75, 3, 4]])
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3]])
  np.testing.assert_allclose(augment.positions_from_increments(inc, seg),
                             [[0, 1, 2, 0, 0.25, 0.5, 0.75, 0]])
  ones = jnp.ones((3, 10))
  np.testing.assert_array_equal(augment.positions_from_increments(ones),
                                jnp.broadcast_to(jnp.arange(10.0), (3, 10)))
