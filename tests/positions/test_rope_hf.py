"""Our RoPE kinds against Hugging Face transformers' own implementations.

For every ``rope_type`` transformers has (default, linear, dynamic, yarn,
llama3) we build its ``LlamaRotaryEmbedding`` (whose ``inv_freq`` comes from
``ROPE_INIT_FUNCTIONS``) and compare, position by position: the inverse
frequencies, the attention scaling, the cos/sin tables (which include it) and
the rotated q/k of ``apply_rotary_pos_emb``. Skipped only when transformers or
torch cannot be imported (they are test extras: ``pip install -e .[test]``).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from lcjax.config import RopeConfig  # noqa: E402
from lcjax.positions import rope  # noqa: E402

HEAD_DIM = 64
MAX_POS = 4096  # transformers' max_position_embeddings
POSITIONS = np.concatenate([np.arange(0, 300), np.arange(300, 8192, 37), [8191]])

# (transformers rope_parameters, our RopeConfig, max_position_embeddings)
CASES = {
    "default": ({"rope_type": "default", "rope_theta": 10_000.0}, RopeConfig()),
    "default_abf": ({"rope_type": "default", "rope_theta": 500_000.0},
                    RopeConfig(theta=500_000.0)),
    "linear": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
               RopeConfig(kind="linear", factor=4.0)),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10_000.0},
                RopeConfig(kind="dynamic", factor=2.0, original_max_len=MAX_POS)),
    "yarn": ({"rope_type": "yarn", "factor": 8.0, "rope_theta": 10_000.0,
              "original_max_position_embeddings": 1024},
             RopeConfig(kind="yarn", factor=8.0, original_max_len=1024)),
    "yarn_betas_mscale": (
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 50_000.0,
         "original_max_position_embeddings": 512, "beta_fast": 16.0, "beta_slow": 2.0,
         "mscale": 0.8, "mscale_all_dim": 0.6},
        RopeConfig(kind="yarn", factor=4.0, theta=50_000.0, original_max_len=512,
                   beta_fast=16.0, beta_slow=2.0, mscale=0.8, mscale_all_dim=0.6)),
    "yarn_attention_factor": (
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10_000.0,
         "original_max_position_embeddings": 1024, "attention_factor": 1.3},
        RopeConfig(kind="yarn", factor=4.0, original_max_len=1024, attention_factor=1.3)),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "rope_theta": 500_000.0,
                "original_max_position_embeddings": 1024},
               RopeConfig(kind="llama3", factor=8.0, theta=500_000.0, original_max_len=1024,
                          low_freq_factor=1.0, high_freq_factor=4.0)),
}


def _hf(params):
  config = LlamaConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, head_dim=HEAD_DIM,
                       max_position_embeddings=MAX_POS, rope_parameters=dict(params))
  return config, modeling_llama.LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cos_sin_match_transformers_position_by_position(name):
  params, cfg = CASES[name]
  config, embedding = _hf(params)
  cos_hf, sin_hf = embedding(torch.zeros(1, 1, HEAD_DIM),
                             torch.as_tensor(POSITIONS)[None])
  # dynamic: transformers grows its base to max(position) + 1; ours, traced, too.
  cos, sin = rope.rope_cos_sin(jnp.asarray(POSITIONS)[None], HEAD_DIM, cfg)
  half = HEAD_DIM // 2
  for ours, theirs in ((cos, cos_hf), (sin, sin_hf)):
    theirs = theirs.numpy()[0]
    np.testing.assert_array_equal(theirs[:, :half], theirs[:, half:])  # rotate-half
    # Frequencies agree to a few float32 ulps (XLA's and torch's pow differ),
    # so the angles agree to about position * frequency * 3e-7.
    tol = 3e-6 + 3e-7 * POSITIONS[:, None] * embedding.inv_freq.numpy()[None, :]
    err = np.abs(np.asarray(ours[0]) - theirs[:, :half])
    assert np.all(err <= tol), (name, float(err.max()))
  assert rope.attention_factor(cfg) == pytest.approx(embedding.attention_scaling,
                                                     rel=1e-12)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if n != "dynamic"])
def test_inverse_frequencies_match_rope_init_functions(name):
  params, cfg = CASES[name]
  config, embedding = _hf(params)
  if params["rope_type"] == "default":
    inv_hf, scale_hf = embedding.compute_default_rope_parameters(config)
  else:
    inv_hf, scale_hf = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
  ours = np.asarray(rope.inverse_frequencies(HEAD_DIM, cfg))
  np.testing.assert_allclose(ours, inv_hf.numpy(), rtol=5e-7, atol=0)  # a few ulps
  assert rope.attention_factor(cfg) == pytest.approx(scale_hf, rel=1e-12)
  # The float64 path computes the same frequencies more exactly.
  wide = rope.inverse_frequencies(HEAD_DIM, cfg, xp=np)
  np.testing.assert_allclose(wide, inv_hf.numpy(), rtol=5e-7)


@pytest.mark.parametrize("seq_len", [100, MAX_POS, 6000, 20_000])
def test_dynamic_ntk_matches_rope_init_function_at_every_length(seq_len):
  params, cfg = CASES["dynamic"]
  config, _ = _hf(params)
  inv_hf, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=seq_len)
  np.testing.assert_allclose(np.asarray(rope.inverse_frequencies(HEAD_DIM, cfg, seq_len)),
                             inv_hf.numpy(), rtol=3e-7)


@pytest.mark.parametrize("name", ["default", "yarn", "llama3"])
def test_rotated_queries_and_keys_match_apply_rotary_pos_emb(name):
  params, cfg = CASES[name]
  _, embedding = _hf(params)
  rng = np.random.default_rng(0)
  B, T, N = 2, 64, 3
  pos = np.stack([np.arange(T) + 1000, np.arange(T) * 7])  # two rows, odd spacing
  q = rng.standard_normal((B, T, N, HEAD_DIM)).astype(np.float32)
  k = rng.standard_normal((B, T, N, HEAD_DIM)).astype(np.float32)
  cos, sin = embedding(torch.zeros(1, 1, HEAD_DIM), torch.as_tensor(pos))
  q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(
      torch.as_tensor(q).transpose(1, 2), torch.as_tensor(k).transpose(1, 2), cos, sin)
  for x, x_hf in ((q, q_hf), (k, k_hf)):
    ours = rope.apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg)
    np.testing.assert_allclose(np.asarray(ours), x_hf.transpose(1, 2).numpy(),
                               atol=5e-5, rtol=1e-5)
