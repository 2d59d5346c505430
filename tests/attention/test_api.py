"""Dispatch of ``attend``: implementations agree, errors say why."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import api, attend, cudnn
from lcjax.attention import patterns as P
from pallas_kernels import flash_attention as fa

SMALL = fa.BlockSizes(16, 16, 16, 16, 16, 16)


def _qkv(B=1, T=40, N=4, K=2, H=16, dtype=jnp.float32):
  rng = np.random.default_rng()
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, T, K, H)), dtype)
  return q, k, v


def test_implementations_agree_on_cpu():
  q, k, v = _qkv()
  seg = jnp.asarray(np.repeat([[0, 1, 2, 3]], 10, axis=1))
  kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_offset=3, kv_offset=3,
            softcap=5.0, return_lse=True)
  pattern = P.SinkWindow(2, 9)
  ref = attend(q, k, v, pattern, implementation="reference", **kw)
  for impl in ("chunked", "pallas", "auto"):
    out = attend(q, k, v, pattern, implementation=impl,
                 block_sizes=SMALL if impl == "pallas" else None, **kw)
    np.testing.assert_allclose(out[0], ref[0], atol=2e-5, err_msg=impl)
    np.testing.assert_allclose(out[1], ref[1], atol=2e-5, err_msg=impl)


def test_auto_on_cpu_picks_reference_or_chunked(monkeypatch):
  q, k, v = _qkv()
  assert api.choose_implementation(q, k, v, P.Causal()) == "reference"
  monkeypatch.setattr(api, "DENSE_LOGITS_LIMIT", 16)
  assert api.choose_implementation(q, k, v, P.Causal()) == "chunked"


def test_auto_on_gpu_prefers_cudnn_where_it_runs(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q, k, v = _qkv(dtype=jnp.bfloat16, H=64)
  assert api.choose_implementation(q, k, v, P.Causal()) == "cudnn"
  assert api.choose_implementation(q, k, v, P.SlidingWindow(15)) == "cudnn"
  assert api.choose_implementation(q, k, v, P.SinkWindow(2, 15)) == "pallas"
  assert api.choose_implementation(q, k, v, P.Causal(), softcap=3.0) == "pallas"
  seg = jnp.zeros(q.shape[:2], jnp.int32)
  assert api.choose_implementation(q, k, v, P.Causal(), q_segment_ids=seg,
                                   kv_segment_ids=seg) == "pallas"


@pytest.mark.parametrize("kwargs,pattern,match", [
    ({}, P.Causal(), "NVIDIA GPU"),
])
def test_cudnn_forced_on_cpu_explains(kwargs, pattern, match):
  q, k, v = _qkv(dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    attend(q, k, v, pattern, implementation="cudnn", **kwargs)


@pytest.mark.parametrize("pattern,kwargs,match", [
    (P.SinkWindow(2, 8), {}, "SlidingWindow"),
    (P.SlidingWindow(4, 4), {}, "causal with a finite left"),
    (P.Causal(), {"softcap": 2.0}, "soft-cap"),
    (P.Causal(), {"has_segments": True}, "segment ids"),
    (P.Causal(), {"q_offset": 4}, "same position"),
    (P.Causal(), {"return_lse": True}, "return_lse"),
    (P.Causal(), {"dtype": jnp.float32}, "bfloat16/float16"),
    (P.Full(), {}, None),
    (P.SlidingWindow(31), {}, None),
])
def test_cudnn_support_reasons(pattern, kwargs, match):
  kwargs = dict(kwargs)
  dtype = kwargs.pop("dtype", jnp.bfloat16)
  has_segments = kwargs.pop("has_segments", False)
  softcap = kwargs.pop("softcap", None)
  reason = cudnn.supports((1, 64, 4, 64), (1, 64, 2, 64), dtype, pattern,
                          has_segments, softcap, platform="gpu", **kwargs)
  if match is None:
    assert reason is None
  else:
    assert reason is not None and match in reason


def test_pallas_forced_errors_explain():
  q, k, v = _qkv()
  pattern = P.BlockMask.from_array(np.ones((3, 3), bool), 16, 16)
  seg = jnp.zeros(q.shape[:2], jnp.int32)
  with pytest.raises(ValueError, match="implementation='pallas'.*table lookup"):
    attend(q, k, v, pattern, q_segment_ids=seg, kv_segment_ids=seg,
           implementation="pallas")


def test_mosaic_absent_or_unsupported_falls_back_to_portable(monkeypatch):
  q, k, v = _qkv()
  assert api.mosaic_reason(q, k, P.Causal(), False, None) is not None
  monkeypatch.setattr(api, "_on_hopper", lambda: True)
  monkeypatch.setattr(api, "_mosaic_module", lambda: None)
  assert "not importable" in api.mosaic_reason(q, k, P.Causal(), False, None)


def test_bad_inputs():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="unknown attention implementation"):
    attend(q, k, v, P.Causal(), implementation="flash")
  with pytest.raises(TypeError, match="Pattern"):
    attend(q, k, v, "causal")
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    attend(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2),
           P.Causal())
  with pytest.raises(ValueError, match="both"):
    attend(q, k, v, P.Causal(), q_segment_ids=jnp.zeros((1, 40), jnp.int32))
  with pytest.raises(ValueError, match="softcap"):
    attend(q, k, v, P.Causal(), softcap=-1.0)
  with pytest.raises(ValueError, match="written for 2 query heads"):
    attend(q, k, v, P.PerHead((P.Causal(), P.Full())))
