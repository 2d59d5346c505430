"""Mosaic GPU (Hopper) attention kernels against the float32 jnp reference.

GPU only: skipped unless the default device is a Hopper GPU. On the H100:

  JAX_PLATFORMS=cuda python -m pytest -q tests/attention/test_mosaic_attention.py

(``tests/conftest.py`` defaults JAX_PLATFORMS to cpu.) Every case draws fresh
random inputs (the seed is in the failure message) and compares output, lse and
the gradients of a random linear loss on both with the reference; see
``pallas_kernels.mosaic_check.compare_with_reference``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from lcjax.attention import patterns as P


def _is_hopper() -> bool:
  dev = jax.devices()[0]
  return (dev.platform == "gpu"
          and str(getattr(dev, "compute_capability", "")).startswith("9"))


pytestmark = pytest.mark.skipif(not _is_hopper(),
                                reason="Mosaic GPU kernels need a Hopper GPU")


def _case_names():
  from pallas_kernels import mosaic_check  # pylint: disable=g-import-not-at-top
  return sorted(mosaic_check.CHECK_CASES)


@pytest.mark.parametrize("name", _case_names())
def test_matches_reference(name):
  from pallas_kernels import mosaic_check  # pylint: disable=g-import-not-at-top
  case = mosaic_check.CHECK_CASES[name]
  tol = mosaic_check.TOLERANCE[jnp.dtype(case.get("dtype", jnp.bfloat16))]
  errors, seed = mosaic_check.compare_with_reference(**case)
  print(name, seed, {k: f"{v:.2e}" for k, v in errors.items()})
  bad = {k: v for k, v in errors.items() if not v <= tol}
  assert not bad, f"{name} seed={seed}: relative errors above {tol}: {bad}"


def test_supports_gives_reasons():
  from pallas_kernels.mosaic_attention import supports  # pylint: disable=g-import-not-at-top
  args = (P.Causal(), False, None)
  assert supports((1, 256, 4, 128), (1, 256, 2, 128), jnp.bfloat16, *args) is None
  assert "head_dim 96" in supports((1, 256, 4, 96), (1, 256, 4, 96),
                                   jnp.bfloat16, *args)
  assert "float32" in supports((1, 256, 4, 128), (1, 256, 4, 128),
                               jnp.float32, *args)
  assert "multiple" in supports((1, 256, 6, 128), (1, 256, 4, 128),
                                jnp.bfloat16, *args)


def test_mosaic_gradient_under_jit_matches_eager():
  """The custom VJP traces under jit (block lists are static constants)."""
  from pallas_kernels.mosaic_attention import mosaic_attention  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(7), 3)
  q, k, v = (jax.random.normal(kk, (1, 384, 2, 64), jnp.bfloat16) for kk in keys)
  f = lambda q, k, v: mosaic_attention(q, k, v, P.SlidingWindow(100)).astype(
      jnp.float32).sum()
  g_eager = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  g_jit = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_eager, g_jit):
    assert jnp.array_equal(a, b)
