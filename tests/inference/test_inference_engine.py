"""The engine's cached decoding reproduces the model's own forward pass."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import AttentionConfig, ModelConfig
from lcjax.eval.retrieval import greedy_continuations
from lcjax.inference import Engine, Sampling
from lcjax.inference import kv_cache
from lcjax.inference.sampling import sample, top_p_logits
from lcjax.model import Decoder, schedule

# Sizes chosen so that rings wrap several times within 40 tokens: window 7,
# strided blocks of 4 with stride 3 (4 query heads on 2 kv heads: each kv head
# keeps 2 of every 3 blocks).
ATT = AttentionConfig(sink=3, window=7, block_size=4, stride=3, local_blocks=1)
BASE = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=48, attention=ATT)
T = 40
KINDS = {
    "full": ("full",),
    "sink_window": ("sink_window",),
    "strided": ("strided",),
    "hybrid": ("sink_window", "full", "strided"),
}


def random_params(model, tokens, seed):
  """Parameters of the model's shapes without compiling its initialiser; weights
  larger than at init make attention sharp, so a wrong cache entry shows."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape) if len(s.shape) > 1
                            else 1.0 + 0.1 * rng.normal(size=s.shape), s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def _model(kinds, seed=0):
  cfg = dataclasses.replace(BASE, num_layers=len(kinds),
                            attention=dataclasses.replace(ATT, layer_kinds=tuple(kinds)))
  model = Decoder(cfg)
  tokens = np.asarray(jax.random.randint(jax.random.key(seed + 1), (3, T), 0, cfg.vocab_size))
  params = random_params(model, tokens[:, :8], seed)
  logits = jax.jit(model.apply)({"params": params}, tokens)
  return cfg, params, tokens, np.asarray(logits)


@functools.lru_cache(maxsize=None)
def _engine(kinds, chunk, slot_multiple=1):
  cfg, params, _, _ = _model(kinds)
  return Engine(cfg, params, max_len=T, prefill_chunk=chunk, slot_multiple=slot_multiple)


@pytest.mark.parametrize("name", list(KINDS))
def test_cached_decoding_equals_full_forward(name):
  """Prefill 13 tokens in chunks of 5, then feed one token at a time to 40:
  every logit equals the full forward pass (rings wrap ~4 times)."""
  _, _, tokens, want = _model(KINDS[name])
  engine = _engine(KINDS[name], 5)
  P = 13
  state, logits = engine.prefill(list(tokens[:, :P]))
  got = [np.asarray(logits)]
  for t in range(P, T - 1):
    state, logits = engine.step(state, tokens[:, t])
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.stack(got, 1), want[:, P - 1:T - 1], atol=2e-4, rtol=2e-4)


def test_caches_are_small_and_wrap():
  _, _, tokens, _ = _model(KINDS["hybrid"])
  engine = _engine(KINDS["hybrid"], T)
  layouts = engine.layouts
  assert layouts["full"] == kv_cache.FullLayout(T)
  # window 7 (a query sees itself and the 7 keys before it) + the new token
  # that a decode step writes before it attends.
  assert layouts["sink_window"] == kv_cache.RingLayout(sink=3, ring=8)
  strided = layouts["strided"]
  # kv head 0 serves query heads 0, 1 -> residues {0, 1}; kv head 1 -> {2, 0}.
  assert strided.residues == ((0, 1), (0, 2))
  # 10 blocks of 4 -> strides 0..3, 2 kept blocks each, plus one local block.
  assert strided.num_slots == 4 + 4 * 2 * 4 < T
  state, _ = engine.prefill(list(tokens[:, :T]))
  ring = state.caches[0]["attn"]["ring"]
  # After 40 tokens the ring holds the sink 0..2 and the last 8 positions.
  assert sorted(np.asarray(ring["pos"][0, 0]).tolist()) == [0, 1, 2] + list(range(32, 40))
  report = engine.kv_report(batch=2)
  assert report["kinds"]["sink_window"]["kv_bytes"] == 2 * 11 * 2 * 2 * 8 * 4
  assert 0.0 < report["reduction"] < 1.0


def test_chunked_prefill_equals_one_shot():
  """Chunks of 5 (rings smaller than a chunk wrap inside it) against one chunk,
  with prompts of different lengths in one batch."""
  _, _, tokens, want = _model(KINDS["hybrid"])
  lengths = [T - 4, 17, 29]
  prompts = [tokens[b, :n] for b, n in enumerate(lengths)]
  s1, l1 = _engine(KINDS["hybrid"], T).prefill(prompts)
  s5, l5 = _engine(KINDS["hybrid"], 5).prefill(prompts)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(l1[b], want[b, n - 1], atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(l5, l1, atol=2e-4, rtol=2e-4)
  engine = _engine(KINDS["hybrid"], 5)
  for kind, c1, c5 in zip(engine.kinds, s1.caches, s5.caches):
    (name, a), = c1["attn"].items()
    b = jax.tree.map(np.asarray, c5["attn"][name])
    a = jax.tree.map(np.asarray, a)
    np.testing.assert_array_equal(a["end"], np.asarray(lengths))
    np.testing.assert_array_equal(a["end"], b["end"])
    # Every token the one-shot prefill kept, the chunked one kept in the same slot.
    kept = a["pos"] >= 0  # [B, P, S]
    np.testing.assert_array_equal(np.where(kept, b["pos"], -1), a["pos"])
    kept_k = np.moveaxis(np.broadcast_to(kept, (3, 2, kept.shape[2])), 1, 2)[..., None]
    for key in ("k", "v"):
      np.testing.assert_allclose(np.where(kept_k, a[key], 0), np.where(kept_k, b[key], 0),
                                 atol=1e-5)
    # The chunked prefill may leave older tokens in ring slots: no later query
    # of any head may see them.
    pattern = schedule.pattern_for(kind, engine.cfg.attention)
    stale = (b["pos"] >= 0) & ~kept
    for bi, pi, si in zip(*np.nonzero(stale)):
      heads = np.arange(4) if b["pos"].shape[1] == 1 else np.arange(2 * pi, 2 * pi + 2)
      later = np.arange(a["end"][bi], T)[:, None]
      assert not np.asarray(pattern.mask(later, b["pos"][bi, pi, si], heads[None])).any()


def test_batch_with_different_prompt_lengths_decodes_each_row_exactly():
  """Rows at different positions in one decode step; by causality each row's
  logits equal those of the full forward pass over that row."""
  _, _, tokens, want = _model(KINDS["hybrid"])
  engine = _engine(KINDS["hybrid"], 5)
  lengths = [7, 19, 12]
  state, logits = engine.prefill([tokens[b, :n] for b, n in enumerate(lengths)])
  steps = 9
  outs = [np.asarray(logits)]
  for i in range(steps):
    feed = [tokens[b, n + i] for b, n in enumerate(lengths)]
    state, logits = engine.step(state, np.array(feed))
    outs.append(np.asarray(logits))
  for b, n in enumerate(lengths):
    got = np.stack([o[b] for o in outs])
    np.testing.assert_allclose(got, want[b, n - 1:n + steps], atol=2e-4, rtol=2e-4)


def test_greedy_generation_matches_uncached_greedy():
  cfg, params, tokens, _ = _model(KINDS["hybrid"])
  engine = _engine(KINDS["hybrid"], 5)
  prompts = tokens[:2, :20]
  want = greedy_continuations(Decoder(cfg), params, prompts, 10, cfg.vocab_size)
  got = engine.generate(list(prompts), 10)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="max_len=40"):
    engine.generate(list(prompts), 30)


def test_decode_loop_equals_step_by_step():
  _, _, tokens, _ = _model(KINDS["hybrid"])
  engine = _engine(KINDS["hybrid"], 5)
  sampling = Sampling(temperature=0.8, top_p=0.9)
  prompts = [tokens[0, :11], tokens[1, :6]]
  state, _ = engine.prefill(prompts)
  _, sampled = engine.decode(state, tokens[:2, 11], 6, sampling, seed=4)
  # Teacher-force the sampled tokens: the compiled loop's logits must agree with
  # step(), so the tokens are reproducible from the same keys.
  state, _ = engine.prefill(prompts)
  keys = jax.random.split(jax.random.key(4), 6)
  feed = tokens[:2, 11]
  for i in range(6):
    state, logits = engine.step(state, feed)
    feed = sample(logits, keys[i], sampling)
    np.testing.assert_array_equal(feed, sampled[:, i])


def test_sampling():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]]))
  kept = np.isfinite(np.asarray(top_p_logits(logits, 0.75)))
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 0, 1]])
  assert np.asarray(sample(logits, jax.random.key(0), Sampling())).tolist() == [0, 3]
  draws = jax.vmap(lambda k: sample(logits, k, Sampling(temperature=1.0, top_p=0.75)))(
      jax.random.split(jax.random.key(1), 400))
  assert set(np.asarray(draws[:, 0]).tolist()) == {0, 1}  # never outside the nucleus
  assert abs(float(jnp.mean(draws[:, 0] == 0)) - 0.5 / 0.8) < 0.1
  with pytest.raises(ValueError, match="top_p"):
    Sampling(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    Sampling(temperature=-1.0)


def test_dense_model_regrouped_as_hybrid_with_wide_windows_is_unchanged():
  """regroup_params moves layers between schedules; a window wider than the
  sequence makes sink_window layers exactly causal."""
  cfg, params, tokens, want = _model(("full",) * 3)
  wide = dataclasses.replace(cfg, attention=dataclasses.replace(
      cfg.attention, layer_kinds=("sink_window", "full", "sink_window"), window=T))
  regrouped = schedule.regroup_params(params, wide)
  assert set(k for k in regrouped if k.startswith("group_")) == {"group_0", "group_1",
                                                                  "group_2"}
  got = jax.jit(Decoder(wide).apply)({"params": regrouped}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  back = schedule.regroup_params(regrouped, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
