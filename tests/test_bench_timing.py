"""The benchmark timers: how often they call and synchronise."""
import jax.numpy as jnp
import pytest

from lcjax.bench import timing


@pytest.fixture
def counted(monkeypatch):
  """A function that counts its calls, and a count of the syncs."""
  counts = {"calls": 0, "syncs": 0}

  def fn(x):
    counts["calls"] += 1
    return x + 1

  def sync(x):
    counts["syncs"] += 1
    return x

  monkeypatch.setattr(timing.jax, "block_until_ready", sync)
  return fn, counts


def test_median_ms_syncs_after_every_call(counted):
  fn, counts = counted
  ms = timing.median_ms(fn, (jnp.ones(3),), repeats=4, warmup=2)
  assert ms >= 0.0
  assert counts == {"calls": 6, "syncs": 6}


def test_back_to_back_syncs_once_per_repeat(counted):
  fn, counts = counted
  ms = timing.back_to_back_ms(fn, (jnp.ones(3),), repeats=3, calls=5, warmup=1)
  assert ms >= 0.0
  assert counts == {"calls": 1 + 3 * 5, "syncs": 1 + 3}
