"""The profiler helper that benchmarks use to split their time into kernels."""
import jax
import jax.numpy as jnp

from lcjax.bench.profile import format_kernel_times, kernel_times


def test_kernel_times_sums_traced_events_per_call(tmp_path):
  fn = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jax.random.normal(jax.random.key(3), (96, 96))
  fn(x).block_until_ready()
  times = kernel_times(fn, x, repeats=2, trace_dir=str(tmp_path))
  assert times and all(v >= 0 for v in times.values())
  assert sum(times.values()) > 0
  text = format_kernel_times(times, top=3, title="probe:")
  lines = text.splitlines()
  assert lines[0].startswith("probe: device time") and len(lines) == 1 + min(3, len(times))


def test_kernel_times_queued_traces_the_same_events(tmp_path):
  """Calls queued without a sync in between are traced like synced ones."""
  fn = jax.jit(lambda x: jnp.cos(x) @ x.T)
  x = jax.random.normal(jax.random.key(5), (80, 80))
  fn(x).block_until_ready()
  synced = kernel_times(fn, x, repeats=3, trace_dir=str(tmp_path / "synced"))
  queued = kernel_times(fn, x, repeats=3, trace_dir=str(tmp_path / "queued"),
                        queued=True)
  assert queued and sum(queued.values()) > 0
  assert set(queued) & set(synced)
