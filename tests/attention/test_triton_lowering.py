"""The portable kernels lower to Triton IR for CUDA (no GPU needed).

Interpret mode (the numerical tests) never runs Pallas' Triton lowering rules;
this lowers forward and backward for the ``cuda`` platform on the CPU, which
catches primitives and block shapes the Triton backend rejects. It does not
compile PTX (that needs the GPU: ``python -m lcjax.bench.gpu_check``).
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

from lcjax.attention import patterns as P
from pallas_kernels import flash_attention as fa


@pytest.fixture(autouse=True)
def _pretend_hopper(monkeypatch):
  """jax >= 0.11 asks the (absent) GPU for its compute capability."""
  try:
    from jax._src.pallas.triton import pallas_call_registration as reg
  except ImportError:
    pytest.skip("Pallas Triton backend unavailable")
  if hasattr(reg, "gpu_info_lib"):
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info",
                        lambda: types.SimpleNamespace(compute_capability="9.0"))


CASES = [
    (P.Causal(), jnp.bfloat16, False, None, 128),
    (P.SinkWindow(16, 64), jnp.float16, True, 30.0, 64),
    (P.StridedBlockSparse(64, 4), jnp.bfloat16, False, None, 256),
    (P.PerHead((P.Causal(), P.SlidingWindow(32), P.Full(), P.Sink(8)))
     | P.DocumentAnchor(), jnp.float32, True, None, 128),
    (P.CausalShiftedGroups(64, 4), jnp.bfloat16, False, 50.0, 128),
]


@pytest.mark.parametrize("pattern,dtype,segments,softcap,head_dim", CASES,
                         ids=lambda x: type(x).__name__)
def test_forward_and_backward_lower_for_cuda(pattern, dtype, segments, softcap,
                                             head_dim):
  B, T, N, K = 1, 256, 4, 2
  q = jax.ShapeDtypeStruct((B, T, N, head_dim), dtype)
  k = jax.ShapeDtypeStruct((B, T, K, head_dim), dtype)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
  offset = jax.ShapeDtypeStruct((), jnp.int32)

  def loss(q, k, v, seg, q_offset):
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
    out, lse = fa.flash_attention(
        q, k, v, pattern, q_offset=q_offset, kv_offset=q_offset,
        softcap=softcap, return_lse=True, interpret=False,
        block_sizes=fa.BlockSizes.default(head_dim, "gpu"), **kw)
    return (out.astype(jnp.float32) ** 2).sum() + lse.sum()

  lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(
      q, k, k, seg, offset).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # fwd, dq, dkv
