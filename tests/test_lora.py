"""LoRA / LongLoRA: where adapters go, what trains, merging, S²-attn layers."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention.patterns import CausalShiftedGroups
from lcjax.config import AttentionConfig, LoraConfig, ModelConfig, TrainConfig
from lcjax.model import Decoder, lora, schedule
from lcjax.train.loss import loss_sums
from lcjax.train.optimizer import make_optimizer
from lcjax.train.step import make_train_step
from lcjax.train.state import TrainState

BASE = ModelConfig(vocab_size=40, embed_dim=24, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=6, mlp_dim=32, tie_embeddings=False)
LORA = dataclasses.replace(BASE, lora=LoraConfig(rank=3, alpha=6.0))


def _tokens(seed=0, B=2, T=11):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, 40)


@functools.lru_cache(maxsize=None)
def _init(cfg):
  return nn.unbox(jax.jit(Decoder(cfg).init)(jax.random.key(1), _tokens()))["params"]


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  return jax.jit(Decoder(cfg).apply)


def _params(cfg):
  """Fresh-init params (cached: every init compiles the scanned layers)."""
  return jax.tree.map(lambda x: x, _init(cfg))


def _randomize_b(params, seed=2):
  """Adapters start with B = 0 (the pretrained model); give them a value."""
  def f(path, x):
    if jax.tree_util.keystr(path).endswith("['lora_b']"):
      return 0.3 * jax.random.normal(jax.random.fold_in(jax.random.key(seed), x.size),
                                     x.shape, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(f, params)


def _batch(B=2, T=11):
  tokens = _tokens(3, B, T)
  return {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
          "segment_ids": jnp.ones_like(tokens),
          "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
          "loss_mask": jnp.ones((B, T), jnp.float32)}


def _names(params):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _shapes(cfg):
  return nn.unbox(jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                           _tokens())))["params"]


def test_adapters_sit_on_the_targeted_attention_projections_only():
  names = _names(_shapes(LORA))
  adapters = sorted(n for n in names if "lora" in n)
  assert adapters == sorted(f"['group_0']['attn']['{p}']['{ab}']" for p in "qkvo"
                            for ab in ("lora_a", "lora_b"))
  assert names["['group_0']['attn']['q']['lora_a']"].shape == (2, 24, 3)  # layers stacked
  assert names["['group_0']['attn']['o']['lora_a']"].shape == (2, 4, 6, 3)
  assert names["['group_0']['attn']['k']['lora_b']"].shape == (2, 3, 2, 6)
  qv = dataclasses.replace(BASE, lora=LoraConfig(rank=2, targets=("q", "v")))
  assert sorted(n.split("']['")[2] for n in _names(_shapes(qv)) if "lora" in n) == [
      "q", "q", "v", "v"]


def test_fresh_adapters_leave_the_pretrained_model_unchanged():
  params = _params(LORA)
  base_params = {k: v for k, v in _names(params).items() if "lora" not in k}
  assert all(float(jnp.abs(x).max()) == 0 for n, x in _names(params).items()
             if n.endswith("['lora_b']"))
  stripped = jax.tree.map(lambda x: x, params)
  for p in "qkvo":
    for ab in ("lora_a", "lora_b"):
      del stripped["group_0"]["attn"][p][ab]
  assert set(_names(stripped)) == set(base_params)
  np.testing.assert_array_equal(_apply(LORA)({"params": params}, _tokens()),
                                _apply(BASE)({"params": stripped}, _tokens()))


def test_only_adapters_embedding_and_norms_get_gradients():
  params = _randomize_b(_params(LORA))
  loss = lambda p: loss_sums(Decoder(LORA), lora.stop_frozen_gradients(p, LORA),
                             _batch())[0]
  grads = _names(jax.jit(jax.grad(loss))(params))
  trainable = {n for n in grads if n.endswith(("['lora_a']", "['lora_b']", "['embed']",
                                               "['scale']"))}
  assert len(trainable) == 8 + 1 + 3  # adapters, embedding, layer norms, final norm
  for name, g in grads.items():
    if name in trainable:
      assert float(jnp.abs(g).max()) > 0, name
    else:
      assert float(jnp.abs(g).max()) == 0, name  # kernels, MLP, lm_head: frozen
  assert "['lm_head']" in grads and "['lm_head']" not in trainable
  plain = _params(BASE)
  assert lora.stop_frozen_gradients(plain, BASE) is plain  # without LoRA: all train


def test_train_step_updates_only_the_trainable_partition():
  params = _randomize_b(_params(LORA))
  tx = lora.freeze(make_optimizer(TrainConfig(learning_rate=1e-2, warmup_steps=0,
                                              weight_decay=0.1)), LORA)
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
  # Frozen parameters carry no optimizer state (LoRA's memory saving).
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  labels = _names(lora.trainable_labels(params))
  n_trainable = sum(x.size for n, x in _names(params).items() if labels[n] == "trainable")
  assert sum(x.size for x in moments) == 2 * n_trainable  # Adam's mu and nu
  new, metrics = jax.jit(make_train_step(Decoder(LORA), tx))(
      state, jax.tree.map(lambda x: x[None], _batch()))
  assert np.isfinite(float(metrics["loss"]))
  before, after = _names(params), _names(new.params)
  for name in before:
    same = np.array_equal(before[name], after[name])
    assert same == (labels[name] == "frozen"), name  # weight decay does not touch them


def test_merged_model_gives_the_same_logits():
  params = _randomize_b(_params(LORA))
  merged, cfg = lora.merge(params, LORA)
  assert cfg.lora.rank == 0 and not any("lora" in n for n in _names(merged))
  tokens = _tokens(5, 3, 13)
  unmerged_logits = _apply(LORA)({"params": params}, tokens)
  merged_logits = _apply(cfg)({"params": merged}, tokens)
  np.testing.assert_allclose(merged_logits, unmerged_logits, atol=2e-5, rtol=2e-5)
  # The merge really moved the kernels.
  q = "['group_0']['attn']['q']['kernel']"
  assert float(jnp.abs(_names(merged)[q] - _names(params)[q]).max()) > 1e-3
  # A model without adapters passes through unchanged.
  plain = _params(BASE)
  same, cfg2 = lora.merge(plain, BASE)
  assert cfg2 == BASE and same is plain


def test_longlora_shifted_groups_kind_builds_s2_attention():
  att = AttentionConfig(layer_kinds=("shifted_groups", "full"), shift_group_size=4,
                        shift_num_heads=4)
  cfg = dataclasses.replace(LORA, attention=att)
  pattern = schedule.pattern_for("shifted_groups", att)
  assert pattern == CausalShiftedGroups(4, 4)
  mask = pattern.dense_mask(8, 8, num_heads=4)
  # Heads 0-1: groups [0,4) and [4,8); heads 2-3 shifted by half a group.
  assert mask[0, 5, 3] == 0 and mask[0, 5, 4] == 1 and mask[0, 3, 0] == 1
  assert mask[3, 3, 2] == 1 and mask[3, 3, 1] == 0 and mask[3, 5, 2] == 1
  params = schedule.regroup_params(_params(LORA), cfg)
  tokens = _tokens()
  s2 = _apply(cfg)({"params": params}, tokens)
  full = _apply(LORA)({"params": _params(LORA)}, tokens)
  np.testing.assert_allclose(s2[:, :2], full[:, :2], atol=1e-5)  # first half group
  assert float(jnp.abs(s2 - full).max()) > 1e-4
  with pytest.raises(ValueError, match="written for 3 heads but num_heads=4"):
    schedule.layer_kinds(dataclasses.replace(cfg, attention=dataclasses.replace(
        att, shift_num_heads=3)))


@pytest.mark.parametrize("lora_cfg,match", [
    (LoraConfig(rank=-1), "lora.rank=-1"),
    (LoraConfig(rank=2, alpha=0.0), "lora.alpha=0.0"),
    (LoraConfig(rank=2, targets=("q", "mlp")), "lora.targets"),
])
def test_bad_lora_configs_are_rejected(lora_cfg, match):
  with pytest.raises(ValueError, match=match):
    _shapes(dataclasses.replace(BASE, lora=lora_cfg))
