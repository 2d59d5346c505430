"""Every context-parallel strategy equals single-device attention, outputs and
gradients, on 8 fake CPU devices (conftest)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lcjax.attention import attend
from lcjax.attention import patterns as P
from lcjax.config import ContextParallelConfig, MeshConfig
from lcjax.parallel import comm_volume, context
from lcjax.parallel.layout import shard_view
from lcjax.parallel.plan import build_plan
from lcjax.sharding import make_mesh

PATTERNS = {
    "causal": P.Causal(),
    "window": P.SlidingWindow(6),
    "sink_window": P.SinkWindow(2, 5),
    "strided": P.StridedBlockSparse(block_size=4, stride=3, local_blocks=1),
    # Ulysses and hybrid split heads, so head-dependent patterns go to the ring
    # (tested below); they get the head-independent variant here.
    "strided_same_heads": P.StridedBlockSparse(block_size=4, stride=3,
                                               local_blocks=1, head_offsets=False),
    "anchor": P.Causal() | P.DocumentAnchor(),
}
STRATEGIES = {
    "ring": ContextParallelConfig("ring", sparse_exchange=False),
    "allgather": ContextParallelConfig("allgather", sparse_exchange=False),
    "ulysses": ContextParallelConfig("ulysses", sparse_exchange=False),
    "hybrid": ContextParallelConfig("hybrid", ulysses_degree=2, sparse_exchange=False),
}


def _segments(rng, B, T):
  """Packed documents: 1..4 documents of random lengths per row."""
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(1, T), size=rng.integers(0, 4), replace=False))
    seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
  return seg


def _inputs(seed, B=2, T=32, N=4, K=2, H=8, packed=False):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return (f(B, T, N, H), f(B, T, K, H), f(B, T, K, H), f(B, T, N, H),
          _segments(rng, B, T) if packed else None)


def _reference(pattern, q, k, v, ct, seg):
  def loss(q, k, v):
    out = attend(q, k, v, pattern, q_segment_ids=seg, kv_segment_ids=seg)
    return jnp.sum(out * ct), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return np.asarray(out), [np.asarray(g) for g in grads]


def _sharded(mesh, cp, pattern, q, k, v, ct, seg, implementation="auto"):
  """Output and gradients of ``context_attention``, back in natural order."""
  T = q.shape[1]
  with jax.set_mesh(mesh):
    layout = context.active_layout(cp, T)
    assert layout is not None
    put = lambda x: jax.device_put(
        layout.permute(x, axis=1),
        NamedSharding(mesh, PartitionSpec("data" if mesh.shape["data"] > 1 else None,
                                          "sequence")))
    args = [put(x) for x in (q, k, v, ct)] + [None if seg is None else put(seg)]

    @jax.jit
    def run(q, k, v, ct, seg):
      def loss(q, k, v):
        out = context.context_attention(q, k, v, pattern, segment_ids=seg, config=cp,
                                        implementation=implementation)
        return jnp.sum(out * ct), out
      return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, out), grads = run(*args)
    return (layout.unpermute(np.asarray(out), 1),
            [layout.unpermute(np.asarray(g), 1) for g in grads])


def _check(mesh, cp, pattern, seed=0, implementation="auto", **shape):
  q, k, v, ct, seg = _inputs(seed, **shape)
  out_ref, grads_ref = _reference(pattern, q, k, v, ct, seg)
  out, grads = _sharded(mesh, cp, pattern, q, k, v, ct, seg, implementation)
  assert np.abs(out_ref).max() > 0.1 and np.abs(grads_ref[1]).max() > 0.1
  np.testing.assert_allclose(out, out_ref, rtol=2e-5, atol=2e-5)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=2e-5, err_msg=f"d{name}")


def _mesh(data=1, sequence=4, tensor=1):
  n = data * sequence * tensor
  return make_mesh(MeshConfig(data=data, sequence=sequence, tensor=tensor),
                   jax.devices()[:n])


@pytest.mark.parametrize("pattern", ["causal", "window", "sink_window", "strided",
                                     "packed"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategies_match_single_device_zigzag(strategy, pattern):
  """sequence=4 x data=2, zigzag; each strategy's own path (no sparse exchange)."""
  cp = STRATEGIES[strategy]
  packed = pattern == "packed"
  if pattern == "strided" and strategy in ("ulysses", "hybrid"):
    pattern = "strided_same_heads"
  with jax.set_mesh(_mesh(data=2)):
    layout = context.active_layout(cp, 32)
    assert context.route(cp, PATTERNS["causal"], layout, 4) == strategy
  _check(_mesh(data=2), cp, PATTERNS["causal" if packed else pattern],
         seed=sum(map(ord, strategy + pattern)), packed=packed)


@pytest.mark.parametrize("load_balance", ["none", "striped"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategies_match_on_other_layouts(strategy, load_balance):
  """Packed documents under causal masks, contiguous and striped shards."""
  cp = ContextParallelConfig(STRATEGIES[strategy].strategy, load_balance,
                             STRATEGIES[strategy].ulysses_degree, False)
  _check(_mesh(), cp, PATTERNS["causal"], seed=7, packed=True)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_odd_device_count(strategy):
  """sequence=3 (ring: a 3-step chained ring; Ulysses repeats K/V heads)."""
  _check(_mesh(sequence=3), ContextParallelConfig(strategy), PATTERNS["causal"],
         seed=3, T=36, N=6, K=2, packed=True)


def test_eight_device_ring_and_anchor():
  _check(_mesh(sequence=8), ContextParallelConfig("ring"), PATTERNS["anchor"],
         seed=5, T=64, packed=True)


@pytest.mark.parametrize("implementation", ["pallas", "chunked"])
def test_ring_backward_entry_and_vjp_fallback(implementation):
  """The ring's pair gradients through the kernels' backward entry (portable
  kernel, interpret mode; traced per-device offsets) and, for "chunked", which
  has none, through jax.vjp of the pair's forward."""
  _check(_mesh(), ContextParallelConfig("ring", sparse_exchange=False),
         PATTERNS["causal"], seed=17, implementation=implementation, T=48,
         packed=True)


def test_head_dependent_pattern_with_heads_sharded_over_tensor():
  """Strided heads (head-dependent) with tensor=2: Ulysses falls back to the ring,
  whose shard_map keeps heads global."""
  cp = ContextParallelConfig("ulysses", sparse_exchange=False)
  pattern = PATTERNS["strided"]
  with jax.set_mesh(_mesh(sequence=4, tensor=2)):
    layout = context.active_layout(cp, 32)
    assert context.route(cp, pattern, layout, 4) == "ring"
  _check(_mesh(sequence=4, tensor=2), cp, pattern, seed=11, packed=True)


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_heads_manual_over_tensor(strategy):
  """tensor=2 with a head-independent pattern: the ring's shard_map is manual
  over heads too (each device sees 4 of 8 query heads and 1 of 2 K/V heads);
  Ulysses (4 devices) keeps them automatic, as 4 local heads cannot be split
  over 4 sequence devices *and* 2 tensor devices. Both exact with GQA."""
  cp = ContextParallelConfig(strategy, sparse_exchange=False)
  mesh = _mesh(sequence=4, tensor=2)
  manual, spec, _ = context.manual_specs(mesh, PATTERNS["causal"], (2, 32, 8, 8), 2)
  assert manual == {"data", "fsdp", "sequence", "tensor"}
  assert spec == PartitionSpec(None, "sequence", "tensor")
  manual, _, _ = context.manual_specs(mesh, PATTERNS["causal"], (2, 32, 4, 8), 2, 4)
  assert "tensor" not in manual
  _check(mesh, cp, PATTERNS["sink_window"], seed=13, N=8, packed=True)


def test_manual_specs_choose_axes():
  """Batch axes go manual when they divide the batch, heads when the pattern
  is head-independent and the axis divides both head counts; else automatic."""
  mesh = _mesh(data=2, sequence=2, tensor=2)
  manual, spec, seg_spec = context.manual_specs(mesh, PATTERNS["causal"], (4, 32, 4, 8), 2)
  assert manual == {"data", "fsdp", "sequence", "tensor"}
  assert (spec, seg_spec) == (PartitionSpec("data", "sequence", "tensor"),
                              PartitionSpec("data", "sequence"))
  manual, spec, _ = context.manual_specs(mesh, PATTERNS["strided"], (3, 32, 4, 8), 2)
  assert manual == {"fsdp", "sequence"}  # odd batch; head-dependent pattern
  assert spec == PartitionSpec(None, "sequence", None)
  manual, _, _ = context.manual_specs(mesh, PATTERNS["causal"], (4, 32, 4, 8), 1)
  assert "tensor" not in manual  # 1 K/V head cannot be split in two


def test_ring_program_has_no_while_loop():
  """The chained ring is unrolled: XLA's GPU compiler (jax 0.11.2) segfaults on
  a while loop carrying ppermute and attention inside shard_map (issue 8)."""
  q, k, v, _, _ = _inputs(1)
  mesh = _mesh()
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "sequence")))
    fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(context.context_attention(
        q, k, v, PATTERNS["causal"], config=STRATEGIES["ring"])), argnums=(0, 1, 2)))
    text = fn.lower(put(q), put(k), put(v)).as_text()
  assert "collective_permute" in text and "stablehlo.while" not in text


@pytest.mark.parametrize("pattern", [
    P.SinkWindow(3, 5),
    P.StridedBlockSparse(block_size=4, stride=8, local_blocks=1, head_offsets=False),
], ids=["sink_window", "strided"])
def test_sparse_exchange_moves_only_needed_shards(pattern):
  """Sparse layers exchange only the halo (+ the broadcast sink) or the shards
  that hold needed blocks, under any strategy, and stay exact (contiguous
  shards here; the zigzag plans run in the ring column above)."""
  cp = ContextParallelConfig("allgather", "none")
  T, n, N, K, H = 64, 4, 4, 2, 8
  shape = comm_volume.Shape(2, T, N, K, H, 4, True)
  with jax.set_mesh(_mesh(sequence=n)):
    layout = context.active_layout(cp, T)
    plan = build_plan(pattern, shard_view(layout), N)
    assert context.route(cp, pattern, layout, N, shape) == "ring"
  assert plan.is_sparse and plan.received.sum() < n * (n - 1)  # < a full ring
  if isinstance(pattern, P.SinkWindow):
    assert plan.sink is not None  # the sink is broadcast, not fetched by a ring
    assert [s.shift for s in plan.steps] == [0, 1]  # window 5 < shard: one halo
  else:
    # stride blocks start at 0 and 32: shard 3 needs shards 0 and 2, never 1
    assert all((d, (d - s.shift) % n) != (3, 1) for s in plan.steps for _, d in s.perm)
    np.testing.assert_array_equal(plan.received, [0, 1, 1, 2])
  _check(_mesh(sequence=n), cp, pattern, seed=13, T=T, packed=True)


def test_size_one_sequence_axis_is_a_direct_call():
  q, k, v, _, seg = _inputs(1, packed=True)
  cp = ContextParallelConfig("ring")
  mesh = _mesh(data=2, sequence=1)
  with jax.set_mesh(mesh):
    assert context.active_layout(cp, 32) is None
    fn = lambda q, k, v: context.context_attention(q, k, v, P.Causal(),
                                                   segment_ids=seg, config=cp)
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
    direct = str(jax.make_jaxpr(lambda q, k, v: attend(
        q, k, v, P.Causal(), q_segment_ids=seg, kv_segment_ids=seg))(q, k, v))
  assert "shard_map" not in jaxpr and jaxpr == direct


def test_bad_configurations_name_the_problem():
  with jax.set_mesh(_mesh(sequence=4)):
    with pytest.raises(ValueError, match="strategy='rnig'"):
      context.active_layout(ContextParallelConfig("rnig"), 32)
    with pytest.raises(ValueError, match="load_balance='zig'"):
      context.active_layout(ContextParallelConfig("ring", "zig"), 32)
    with pytest.raises(ValueError, match="ulysses_degree=3 must divide"):
      context.active_layout(ContextParallelConfig("hybrid", ulysses_degree=3), 32)
  q, k, v, _, _ = _inputs(2, N=6, K=2)
  mesh = _mesh(sequence=4)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="num_heads=6 is not divis"):
    jax.jit(lambda q, k, v: context.context_attention(
        q, k, v, P.Causal(), config=ContextParallelConfig("ulysses")))(q, k, v)


def test_avoid_shardy_crash_only_for_gpu_sequence_meshes(monkeypatch):
  """GSPMD instead of Shardy on GPU meshes with a sequence axis (issue 8's
  workaround), never on CPU, with sequence=1, or when the user chose."""
  monkeypatch.delenv("JAX_USE_SHARDY_PARTITIONER", raising=False)
  before = jax.config.jax_use_shardy_partitioner
  try:
    jax.config.update("jax_use_shardy_partitioner", True)
    assert context.avoid_shardy_crash(_mesh()) is None  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert context.avoid_shardy_crash(_mesh(sequence=1)) is None
    monkeypatch.setenv("JAX_USE_SHARDY_PARTITIONER", "1")
    assert context.avoid_shardy_crash(_mesh()) is None
    monkeypatch.delenv("JAX_USE_SHARDY_PARTITIONER")
    assert "GSPMD" in context.avoid_shardy_crash(_mesh())
    assert not jax.config.jax_use_shardy_partitioner
  finally:
    jax.config.update("jax_use_shardy_partitioner", before)
