"""Ring attention (Liu et al., 2023) executing a static exchange plan.

Runs inside ``shard_map`` on the local rows of one device. Keys and values are
stacked into one ``[2, B, L, K, H]`` buffer so each step is one ``ppermute``;
the next step's receive is issued before the current step's compute, so XLA
can overlap them. Partial results are merged by log-sum-exp in float32.

The ``custom_vjp`` keeps only the local q/k/v, the output and the log-sum-exp:
the backward pass rotates K/V again (no per-step buffers are stored), computes
each step's dK/dV on the device that holds the queries and sends them home.
In the chained (dense) ring they travel along with K/V and arrive home after
the last hop; direct (sparse) steps send them straight back.

Which steps exist, which device pairs exchange, and which (query run, key run)
pairs are skipped, computed without a mask (FULL) or with the pattern
(PARTIAL) comes from :mod:`lcjax.parallel.plan`. Chained steps run in an
unrolled ``lax.scan`` with the last step peeled off, so exactly ``R - 1`` K/V
hops are sent. Unrolled because XLA's GPU compiler (jax 0.11.2) segfaults in
its Shardy pass on a ``while`` loop that carries ``ppermute`` and attention
kernels inside ``shard_map`` (4 GPUs; docs/context_parallel.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.parallel import local
from lcjax.parallel.plan import Plan, Step


def _ppermute(tree, axis: str, perm):
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, list(perm)), tree)


def _cycle(plan: Plan):
  R, U = plan.view.num_shards, plan.view.group_size
  return [(g * U + u, ((g + 1) % R) * U + u) for g in range(R) for u in range(U)]


def _schedule(plan: Plan):
  """``(local step, direct steps, chained steps)``."""
  steps = plan.steps
  direct = [s for s in steps[1:] if not s.chained]
  chained = [s for s in steps[1:] if s.chained]
  if chained and len(chained) != plan.view.num_shards - 1:
    raise AssertionError("a chained ring must visit every shard")
  return steps[0], direct, chained


class _Local:
  """This device's query-side arrays, viewed as ``[B, runs, run_len, ...]``."""

  def __init__(self, plan: Plan, axis: str, q, seg):
    view = plan.view
    self.m = view.num_runs
    self.r = jax.lax.axis_index(axis)
    self.g = self.r // view.group_size
    self.q = _stack_runs(q, self.m)
    self.seg = _stack_runs(seg, self.m)
    self.starts = jnp.asarray(view.starts_array)[self.g]


def _stack_runs(x, m: int, axis: int = 1):
  """``[..., m * n, ...] -> [..., m, n, ...]`` (a free reshape)."""
  if x is None:
    return None
  return x.reshape(x.shape[:axis] + (m, x.shape[axis] // m) + x.shape[axis + 1:])


def _run(stack, index, axis: int = 1):
  """Run ``index`` (a Python int, or traced: a dynamic slice) of a stack."""
  if stack is None:
    return None
  if isinstance(index, int):
    return jax.lax.index_in_dim(stack, index, axis, keepdims=False)
  return jax.lax.dynamic_index_in_dim(stack, index, axis, keepdims=False)


def _slots(kinds: np.ndarray):
  """The run pairs each device computes, as slots ``(a, b, kind)`` of tables
  shaped like ``kinds[..., 0, 0]`` (``[..., devices]``).

  Device lists are padded with SKIP to the same length. Where devices differ
  only in *which* runs they pair (zigzag: the off-diagonal steps compute query
  run 0 x key run 0 on some devices and 1 x 1 on others, both mask-free), one
  slot selects its runs by dynamic index and no conditional is needed.
  """
  *lead, m, _ = kinds.shape
  flat = kinds.reshape(-1, m, m)
  lists = [[(a, b, int(row[a, b])) for a in range(m) for b in range(m) if row[a, b]]
           for row in flat]
  slots = []
  for i in range(max(len(pairs) for pairs in lists)):
    fill = next(pairs[i] for pairs in lists if len(pairs) > i)[:2] + (0,)
    entries = np.asarray([pairs[i] if len(pairs) > i else fill for pairs in lists])
    slots.append(tuple(entries[:, c].reshape(lead) for c in range(3)))
  return slots


def _pick(table: np.ndarray, index):
  """``table[index]``: a Python int when the table is constant."""
  if (table == table.flat[0]).all():
    return int(table.flat[0])
  return jnp.asarray(table, jnp.int32)[index]


def _add_to_run(runs: list, table: np.ndarray, index, value, combine):
  """``runs[index] = combine(runs[index], value)`` for a static or traced index."""
  if isinstance(index, int):
    runs[index] = combine(runs[index], value)
    return runs
  for a in np.unique(table):
    new = combine(runs[a], value)
    runs[a] = jax.tree.map(lambda n, o: jnp.where(index == a, n, o), new, runs[a])
  return runs


def _attend_step(args, me: _Local, kinds, index, kv_starts, buf, acc):
  kv, kv_seg = buf
  k, v, kv_seg = _stack_runs(kv[0], me.m), _stack_runs(kv[1], me.m), _stack_runs(
      kv_seg, me.m)
  acc = list(acc)
  for a_table, b_table, kind_table in _slots(kinds):
    a, b = _pick(a_table, index), _pick(b_table, index)
    part = local.pair_attention(args, kind_table, index, _run(me.q, a), _run(k, b),
                                _run(v, b), _run(me.seg, a), _run(kv_seg, b),
                                me.starts[a], kv_starts[b])
    acc = _add_to_run(acc, a_table, a, part, local.merge)
  return acc


def _grad_step(args, me: _Local, kinds, index, kv_starts, buf, dq, dout):
  """Adds this step's dq to ``dq``; returns ``(dq, dkv [2, B, L, K, H])``."""
  kv, kv_seg = buf
  k, v, kv_seg = _stack_runs(kv[0], me.m), _stack_runs(kv[1], me.m), _stack_runs(
      kv_seg, me.m)
  do, lse, delta, out = dout
  dq = list(dq)
  dkv = [jnp.zeros((2,) + k.shape[:1] + k.shape[2:], jnp.float32)
         for _ in range(me.m)]
  for a_table, b_table, kind_table in _slots(kinds):
    a, b = _pick(a_table, index), _pick(b_table, index)
    dq_p, dk_p, dv_p = local.pair_grads(
        args, kind_table, index, _run(me.q, a), _run(k, b), _run(v, b),
        _run(me.seg, a), _run(kv_seg, b), me.starts[a], kv_starts[b], _run(out, a),
        _run(do, a), _run(lse, a, axis=2), _run(delta, a, axis=2))
    dq = _add_to_run(dq, a_table, a, dq_p, jnp.add)
    dkv = _add_to_run(dkv, b_table, b, jnp.stack([dk_p, dv_p]), jnp.add)
  return dq, local.concat_runs(dkv, axis=2)


def _step_table(steps: list[Step]):
  kinds = np.stack([s.kinds for s in steps])
  starts = jnp.asarray(np.stack([s.kv_starts for s in steps]))
  return kinds, starts


def _sink_buffer(plan: Plan, axis: str, r, kv, seg):
  """The first ``n`` keys, values and segment ids, broadcast from their holder."""
  sink = plan.sink
  take = lambda x, ax: jax.lax.slice_in_dim(x, sink.row, sink.row + sink.num_tokens,
                                            axis=ax)
  mine = r == sink.holder
  kv_sink = jax.lax.psum(jnp.where(mine, take(kv, 2), jnp.zeros((), kv.dtype)), axis)
  seg_sink = None
  if seg is not None:
    seg_sink = jax.lax.psum(jnp.where(mine, take(seg, 1), 0), axis)
  return kv_sink, seg_sink


def _forward(plan: Plan, args: local.AttendArgs, axis: str, q, k, v, seg):
  me = _Local(plan, axis, q, seg)
  first, direct, chained = _schedule(plan)
  own = (jnp.stack([k, v]), seg)
  receives = [lambda s=s: _ppermute(own, axis, s.perm) for s in direct]
  if chained:
    receives.append(lambda: _ppermute(own, axis, _cycle(plan)))
  acc = [local.empty_acc(_run(me.q, a)) for a in range(me.m)]
  pending = receives[0]() if receives else None  # issued before the local compute
  acc = _attend_step(args, me, first.kinds, me.g,
                     jnp.asarray(first.kv_starts)[me.g], own, acc)
  for i, step in enumerate(direct):
    buf, pending = pending, receives[i + 1]() if i + 1 < len(receives) else None
    acc = _attend_step(args, me, step.kinds, me.g,
                       jnp.asarray(step.kv_starts)[me.g], buf, acc)
  if chained:
    kinds, starts = _step_table(chained)

    def body(carry, i):
      buf, acc = carry
      nxt = _ppermute(buf, axis, _cycle(plan))  # before this step's compute
      acc = _attend_step(args, me, kinds, (i, me.g), starts[i, me.g], buf, acc)
      return (nxt, acc), None

    last = len(chained) - 1  # peeled: nothing is left to send after it
    (buf, acc), _ = jax.lax.scan(body, (pending, acc), jnp.arange(last),
                                 unroll=True)
    acc = _attend_step(args, me, kinds[last], me.g, starts[last, me.g], buf, acc)
  if plan.sink is not None:
    kv_sink, seg_sink = _sink_buffer(plan, axis, me.r, own[0], seg)
    for a in range(me.m):
      if (plan.sink.kinds[:, a] != 0).any():
        part = local.pair_attention(args, plan.sink.kinds[:, a], me.g, _run(me.q, a),
                                    kv_sink[0], kv_sink[1], _run(me.seg, a), seg_sink,
                                    me.starts[a], 0)
        acc[a] = local.merge(acc[a], part)
  out = local.concat_runs([o for o, _ in acc]).astype(q.dtype)
  lse = local.concat_runs([l for _, l in acc], axis=2)
  return out, lse


def _backward(plan: Plan, args: local.AttendArgs, axis: str, res, do):
  q, k, v, seg, out, lse = res
  me = _Local(plan, axis, q, seg)
  first, direct, chained = _schedule(plan)
  do_f32 = do.astype(jnp.float32)
  delta = jnp.sum(do_f32 * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  dout = (_stack_runs(do_f32, me.m), _stack_runs(lse, me.m, axis=2),
          _stack_runs(delta, me.m, axis=2), _stack_runs(out, me.m))
  own = (jnp.stack([k, v]), seg)
  receives = [lambda s=s: _ppermute(own, axis, s.perm) for s in direct]
  if chained:
    receives.append(lambda: _ppermute(own, axis, _cycle(plan)))
  dq = [jnp.zeros(_run(me.q, a).shape, jnp.float32) for a in range(me.m)]
  pending = receives[0]() if receives else None
  dq, dkv_home = _grad_step(args, me, first.kinds, me.g,
                            jnp.asarray(first.kv_starts)[me.g], own, dq, dout)
  for i, step in enumerate(direct):
    buf, pending = pending, receives[i + 1]() if i + 1 < len(receives) else None
    dq, dkv = _grad_step(args, me, step.kinds, me.g,
                         jnp.asarray(step.kv_starts)[me.g], buf, dq, dout)
    back = [(dst, src) for src, dst in step.perm]  # straight back to the source
    dkv_home = dkv_home + jax.lax.ppermute(dkv, axis, back)
  if chained:
    kinds, starts = _step_table(chained)

    def body(carry, i):
      buf, travel, dq = carry
      nxt = _ppermute(buf, axis, _cycle(plan))
      dq, dkv = _grad_step(args, me, kinds, (i, me.g), starts[i, me.g], buf, dq,
                           dout)
      # dK/dV of the shard in ``buf`` travel one hop behind it; after the last
      # of the R - 1 steps they have come full circle to their home device.
      travel = jax.lax.ppermute(travel + dkv, axis, _cycle(plan))
      return (nxt, travel, dq), None

    last = len(chained) - 1
    travel = jnp.zeros(dkv_home.shape, jnp.float32)
    (buf, travel, dq), _ = jax.lax.scan(body, (pending, travel, dq),
                                        jnp.arange(last), unroll=True)
    dq, dkv = _grad_step(args, me, kinds[last], me.g, starts[last, me.g], buf, dq,
                         dout)
    dkv_home = dkv_home + jax.lax.ppermute(travel + dkv, axis, _cycle(plan))
  if plan.sink is not None:
    sink = plan.sink
    kv_sink, seg_sink = _sink_buffer(plan, axis, me.r, own[0], seg)
    dsink = jnp.zeros(kv_sink.shape, jnp.float32)
    for a in range(me.m):
      kinds = sink.kinds[:, a]
      if (kinds != 0).any():
        dq_p, dk_p, dv_p = local.pair_grads(
            args, kinds, me.g, _run(me.q, a), kv_sink[0], kv_sink[1],
            _run(me.seg, a), seg_sink, me.starts[a], 0, _run(dout[3], a),
            _run(dout[0], a), _run(dout[1], a, axis=2), _run(dout[2], a, axis=2))
        dq[a] = dq[a] + dq_p
        dsink = dsink + jnp.stack([dk_p, dv_p])
    dsink = jax.lax.psum(dsink, axis) * (me.r == sink.holder).astype(jnp.float32)
    rows = jax.lax.slice_in_dim(dkv_home, sink.row, sink.row + sink.num_tokens, axis=2)
    dkv_home = jax.lax.dynamic_update_slice_in_dim(dkv_home, rows + dsink, sink.row,
                                                   axis=2)
  dq = local.concat_runs(dq).astype(q.dtype)
  return dq, dkv_home[0].astype(k.dtype), dkv_home[1].astype(v.dtype)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                   segment_ids: jax.Array | None, *, plan: Plan,
                   args: local.AttendArgs, axis: str = "sequence") -> jax.Array:
  """Attention of the local rows ``q [B, L, N, H]`` over all shards' ``k``/``v``.

  Call inside ``shard_map`` over ``axis``; rows follow ``plan.view``.
  ``segment_ids [B, L]`` (or None) travel with K/V.
  """
  @jax.custom_vjp
  def ring(q, k, v, seg):
    return _forward(plan, args, axis, q, k, v, seg)[0]

  def fwd(q, k, v, seg):
    out, lse = _forward(plan, args, axis, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)

  def bwd(res, do):
    dq, dk, dv = _backward(plan, args, axis, res, do)
    return dq, dk, dv, None

  ring.defvjp(fwd, bwd)
  return ring(q, k, v, segment_ids)
