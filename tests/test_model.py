import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import AttentionConfig, ModelConfig
from lcjax.model import Decoder
from lcjax.model import schedule
from lcjax.sharding import LOGICAL_RULES

SMALL = ModelConfig(vocab_size=96, embed_dim=48, num_layers=3, num_heads=6,
                    num_kv_heads=2, head_dim=8, mlp_dim=80)


def _init(cfg, B=2, T=13, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)
  variables = Decoder(cfg).init(jax.random.key(seed + 1), tokens)
  return tokens, variables


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [True, False])
def test_forward_shapes_and_dtypes(dtype, tie):
  cfg = ModelConfig(**{**SMALL.__dict__, "dtype": dtype, "tie_embeddings": tie})
  tokens, variables = _init(cfg)
  params = nn.unbox(variables)["params"]
  assert ("lm_head" in params) == (not tie)
  logits = Decoder(cfg).apply({"params": params}, tokens)
  assert logits.shape == (2, 13, cfg.vocab_size) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  hidden = Decoder(cfg).apply({"params": params}, tokens, method=Decoder.hidden)
  assert hidden.dtype == jnp.dtype(dtype)


def test_every_parameter_has_known_logical_axes():
  _, variables = _init(SMALL)
  known = {name for name, _ in LOGICAL_RULES}
  boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxes and all(isinstance(b, nn.Partitioned) for b in boxes)
  for box in boxes:
    assert len(box.names) == box.value.ndim and set(box.names) <= known


def test_layers_are_stacked_per_group():
  cfg = ModelConfig(**{**SMALL.__dict__, "num_layers": 5,
                       "attention": AttentionConfig(layer_kinds=("full",) * 5)})
  _, variables = _init(cfg)
  params = nn.unbox(variables)["params"]
  assert schedule.layer_groups(cfg) == [("full", 5)]
  assert params["group_0"]["attn"]["q"]["kernel"].shape == (5, 48, 6, 8)


def test_bad_schedules_are_rejected():
  with pytest.raises(ValueError, match="has 2 entries but num_layers=3"):
    schedule.layer_kinds(ModelConfig(**{**SMALL.__dict__,
                                        "attention": AttentionConfig(layer_kinds=("full",) * 2)}))
  with pytest.raises(ValueError, match="unknown attention kinds \\['fulll'\\]"):
    schedule.layer_kinds(ModelConfig(**{**SMALL.__dict__, "attention": AttentionConfig(
        layer_kinds=("full", "fulll", "full"))}))


def test_causality_and_segments():
  """Changing a later token never changes earlier logits; other documents are invisible."""
  tokens, variables = _init(SMALL, B=1, T=12, seed=3)
  params = nn.unbox(variables)["params"]
  model = Decoder(SMALL)
  base = model.apply({"params": params}, tokens)
  changed = model.apply({"params": params}, tokens.at[0, 8].set((tokens[0, 8] + 1) % 96))
  np.testing.assert_allclose(base[0, :8], changed[0, :8], rtol=1e-5, atol=1e-5)
  assert not np.allclose(base[0, 8:], changed[0, 8:])
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  packed = model.apply({"params": params}, tokens, pos, seg)
  alone = model.apply({"params": params}, tokens[:, 5:])
  np.testing.assert_allclose(packed[0, 5:], alone[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "offload"])
def test_remat_policies_keep_loss_and_gradients(remat):
  tokens, variables = _init(SMALL, seed=5)
  params = nn.unbox(variables)["params"]

  def loss(cfg, p):
    return jnp.mean(Decoder(cfg).apply({"params": p}, tokens) ** 2)

  ref_loss, ref_grads = jax.value_and_grad(lambda p: loss(SMALL, p))(params)
  cfg = ModelConfig(**{**SMALL.__dict__, "remat": remat})
  got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(cfg, p)))(params)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
