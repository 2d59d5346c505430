"""Mosaic GPU (Hopper) attention kernels against the float32 jnp reference.

Two kinds of tests:

* GPU (skipped unless the default device is a Hopper GPU): the real kernels on
  fresh random inputs, every case of ``pallas_kernels.mosaic_check``:

    JAX_PLATFORMS=cuda python -m pytest -q tests/attention/test_mosaic_attention.py

  (``tests/conftest.py`` defaults JAX_PLATFORMS to cpu.)
* CPU: everything around the kernels (block lists, launch order, the dK/dV
  work split and the merge of split key tiles, padding, offsets, lse/delta
  algebra) with the three kernels replaced by a numpy emulation that walks the
  same lists and work items step by step as the kernels do (64-row steps,
  FULL entries unmasked, PARTIAL entries masked, per-item ranges over the GQA
  group). Outputs start as NaN, so anything a kernel leaves unwritten shows.
  float32 inputs, so the tolerance is tight. The kernel bodies themselves are
  only checked on the GPU; ``test_kernels_lower_for_cuda`` lowers them on CPU
  where jax >= 0.11 is installed.
"""
from __future__ import annotations

import dataclasses
import math
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import block_mask
from lcjax.attention.reference import dense_attention
from lcjax.attention import patterns as P
from pallas_kernels import mosaic_attention as ma
from pallas_kernels import mosaic_check


def _is_hopper() -> bool:
  dev = jax.devices()[0]
  return (dev.platform == "gpu"
          and str(getattr(dev, "compute_capability", "")).startswith("9"))


hopper_only = pytest.mark.skipif(not _is_hopper(),
                                 reason="Mosaic GPU kernels need a Hopper GPU")


# ----------------------------------------------------------------------------
# GPU: the real kernels.
# ----------------------------------------------------------------------------


@hopper_only
@pytest.mark.parametrize("name", sorted(mosaic_check.CHECK_CASES))
def test_matches_reference(name):
  case = mosaic_check.CHECK_CASES[name]
  tol = mosaic_check.TOLERANCE[jnp.dtype(case.get("dtype", jnp.bfloat16))]
  errors, seed = mosaic_check.compare_with_reference(**case)
  print(name, seed, {k: f"{v:.2e}" for k, v in errors.items()})
  bad = {k: v for k, v in errors.items() if not v <= tol}
  assert not bad, f"{name} seed={seed}: relative errors above {tol}: {bad}"


@hopper_only
def test_supports_gives_reasons():
  args = (P.Causal(), False, None)
  assert ma.supports((1, 256, 4, 128), (1, 256, 2, 128), jnp.bfloat16,
                     *args) is None
  assert "head_dim 96" in ma.supports((1, 256, 4, 96), (1, 256, 4, 96),
                                      jnp.bfloat16, *args)
  assert "float32" in ma.supports((1, 256, 4, 128), (1, 256, 4, 128),
                                  jnp.float32, *args)
  assert "multiple" in ma.supports((1, 256, 6, 128), (1, 256, 4, 128),
                                   jnp.bfloat16, *args)


@hopper_only
def test_mosaic_gradient_under_jit_matches_eager():
  """The custom VJP traces under jit (block lists are static constants)."""
  keys = jax.random.split(jax.random.key(7), 3)
  q, k, v = (jax.random.normal(kk, (1, 384, 2, 64), jnp.bfloat16)
             for kk in keys)
  f = lambda q, k, v: ma.mosaic_attention(q, k, v, P.SlidingWindow(100)).astype(
      jnp.float32).sum()
  g_eager = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  g_jit = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_eager, g_jit):
    assert jnp.array_equal(a, b)


@hopper_only
@pytest.mark.parametrize("pattern", [P.Causal(), P.SinkWindow(64, 300)],
                         ids=["causal", "sink_window"])
def test_backward_entry_with_merged_statistics(pattern):
  """``mosaic_attention_backward`` from the merged out/lse of keys split in two
  parts (the second with a traced offset, as in ring attention): the parts'
  gradients sum to the reference gradient over all keys."""
  from lcjax.parallel.local import merge  # pylint: disable=import-outside-toplevel
  seed = secrets.randbits(31)
  keys = jax.random.split(jax.random.key(seed), 4)
  T, cut = 1000, 512
  q = jax.random.normal(keys[0], (1, T, 8, 128), jnp.bfloat16)
  k, v = (jax.random.normal(kk, (1, T, 2, 128), jnp.bfloat16) for kk in keys[1:3])
  ct = jax.random.normal(keys[3], q.shape, jnp.float32)

  @jax.jit
  def grads(q, k, v, offset):
    parts = [(0, cut, 0), (cut, T, offset)]
    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full((1, 8, T), -jnp.inf))
    for a, b, off in parts:
      acc = merge(acc, ma.mosaic_attention(q, k[:, a:b], v[:, a:b], pattern,
                                           kv_offset=off, return_lse=True))
    out = acc[0].astype(q.dtype)
    dq, dk, dv = 0.0, [], []
    for a, b, off in parts:
      g = ma.mosaic_attention_backward(q, k[:, a:b], v[:, a:b], pattern, out,
                                       acc[1], ct, kv_offset=off)
      dq = dq + g[0].astype(jnp.float32)
      dk.append(g[1])
      dv.append(g[2])
    return dq, jnp.concatenate(dk, 1), jnp.concatenate(dv, 1)

  got = grads(q, k, v, jnp.int32(cut))
  f32 = lambda x: x.astype(jnp.float32)
  want = jax.grad(lambda q, k, v: jnp.vdot(dense_attention(
      q, k, v, pattern)[0], ct), argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
  for name, a, b in zip(("dq", "dk", "dv"), got, want):
    a, b = np.asarray(f32(a)), np.asarray(b)
    err = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert np.isfinite(a).all() and err < 2e-2, f"{name} seed={seed}: {err:.2e}"


# ----------------------------------------------------------------------------
# CPU: numpy emulation of the three kernels over the same lists and items.
# ----------------------------------------------------------------------------

_BLK = ma._META_BLOCK  # pylint: disable=protected-access
_HALF = _BLK // 2


def _host_call(fn, out_shapes, *args):
  """``fn`` on numpy arrays through ``jax.pure_callback`` (None args kept)."""
  present = [a is not None for a in args]

  def host(*arrays):
    it = iter(arrays)
    return fn(*(np.asarray(next(it)) if p else None for p in present))

  return jax.pure_callback(host, out_shapes,
                           *(a for a in args if a is not None))


def _logits(s, st):
  """Kernel logits in log2 units, and tanh for the soft-cap VJP."""
  if st.softcap is None:
    return s * (st.scale * math.log2(math.e)), None
  t = np.tanh(s * (st.scale / st.softcap))
  return t * (st.softcap * math.log2(math.e)), t


def _visible(st, q_loc, k_loc, offsets, head, q_seg, kv_seg):
  """Like the kernels' mask: pattern on absolute positions (or the causal
  comparison where the host found every PARTIAL tile causal), segments,
  padding."""
  q_pos, k_pos = q_loc + offsets[0], k_loc + offsets[1]
  if st.partial.kind != "pattern":
    vis = q_pos >= k_pos
  else:
    vis = np.asarray(st.pattern.mask(q_pos, k_pos, head))
  if st.has_segments:
    same = q_seg == kv_seg
    if st.pattern.has_segment_exemptions:
      same = same | np.asarray(st.pattern.segment_exempt(q_pos, k_pos, head))
    vis = vis & same
  return vis & (k_loc < st.kv_len)


def _index(shape, b, h):
  return (b if shape[0] > 1 else 0, h if shape[1] > 1 else 0)


def _seg(seg, b, idx):
  return None if seg is None else seg[b, idx]


def _cta_runs(items, bounds, num_sms):
  """The items in the order the kernel's CTAs walk them (CTA by CTA)."""
  assert bounds[0] == 0 and bounds[-1] == len(items), bounds
  assert (np.diff(bounds) >= 1).all(), "every CTA gets work"
  assert len(bounds) - 1 <= max(num_sms, 1) or (np.diff(bounds) == 1).all()
  for c in range(len(bounds) - 1):
    yield from items[bounds[c]:bounds[c + 1]]


def _emu_forward(q, k, v, q_seg, kv_seg, offsets, rows, lists, st):
  """Forward kernel: per scheduled (b, head, query tile) the online softmax
  over its list (both 64-row warpgroups at once; they share the list)."""

  def run(q, k, v, q_seg, kv_seg, offsets, items, bounds, blocks, num_full,
          count, _):
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.full(q.shape, np.nan, q.dtype)
    lse = np.full((B, N, T), np.nan, np.float32)
    seen = np.zeros((B, N, T // _BLK), int)
    for b, h, qt in _cta_runs(items, bounds, st.cfg.num_sms):
      seen[b, h, qt] += 1
      bm, hm = _index(blocks.shape, b, h)
      r = qt * _BLK + np.arange(_BLK)
      m = np.full(_BLK, -np.inf, np.float32)
      l = np.zeros(_BLK, np.float32)
      acc = np.zeros((_BLK, H), np.float32)
      for t in range(count[bm, hm, qt]):
        masked = t >= num_full[bm, hm, qt]
        c = blocks[bm, hm, qt, t] * _BLK + np.arange(_BLK)
        s, _ = _logits(q[b, r, h] @ k[b, c, h // G].T, st)
        if masked:
          c_mask = c
          if st.partial.kind == "diagonal":  # the kernel's own-tile positions
            c_mask = (qt + st.partial.shift) * _BLK + np.arange(_BLK)
          vis = _visible(st, r[:, None], c_mask[None, :], offsets, h,
                         _seg(q_seg, b, r)[:, None] if st.has_segments else None,
                         _seg(kv_seg, b, c)[None, :] if st.has_segments else None)
          s = np.where(vis, s, -np.inf)
        m_new = np.maximum(m, s.max(1))
        m_sub = np.where(m_new == -np.inf, 0.0, m_new) if masked else m_new
        alpha = np.exp2(m - m_sub)
        p = np.exp2(s - m_sub[:, None])
        acc = acc * alpha[:, None] + p @ v[b, c, h // G]
        l = l * alpha + p.sum(1)
        m = m_new
      empty = l == 0
      l_safe = np.where(empty, 1.0, l)
      out[b, r, h] = acc / l_safe[:, None]
      lse[b, h, r] = np.where(empty, -np.inf, m * math.log(2) + np.log(l_safe))
    assert (seen == 1).all(), "forward schedule must run every tile once"
    return out, lse

  B, T, N, _ = q.shape
  shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, N, T), jnp.float32))
  return _host_call(run, shapes, q, k, v, q_seg, kv_seg, offsets, rows.items,
                    rows.bounds, *lists)


def _emu_dq(q, k, v, do, out, lse2, dlse, q_seg, kv_seg, offsets, rows, lists,
            st):
  """dQ kernel: per scheduled query tile, delta = <out, dO> - dlse of its
  rows, then its list in key steps of ``block_kv_dq`` (the kernel's index
  arithmetic), 128 rows at once. Returns (dq, delta)."""
  bk = st.cfg.block_kv_dq
  split = _BLK // bk

  def run(q, k, v, do, out, lse2, dlse, q_seg, kv_seg, offsets, items, bounds,
          blocks, num_full, count, quarters):
    G = q.shape[2] // k.shape[2]
    dq = np.full(q.shape, np.nan, q.dtype)
    B, T, N, _ = q.shape
    delta = np.full((B, N, T), np.nan, np.float32)
    for b, h, qt in _cta_runs(items, bounds, st.cfg.num_sms):
      bm, hm = _index(blocks.shape, b, h)
      r = qt * _BLK + np.arange(_BLK)
      delta[b, h, r] = (out[b, r, h].astype(np.float32)
                        * do[b, r, h].astype(np.float32)).sum(-1)
      if dlse is not None:
        delta[b, h, r] -= dlse[b, h, r]
      acc = np.zeros((_BLK, q.shape[3]), np.float32)
      for t in range(count[bm, hm, qt] * split):
        masked = t >= num_full[bm, hm, qt] * split
        c = (blocks[bm, hm, qt, t // split] * _BLK + (t % split) * bk
             + np.arange(bk))
        kc = k[b, c, h // G]
        s, tanh = _logits(q[b, r, h] @ kc.T, st)
        if masked:
          c_mask = c
          if st.partial.kind == "diagonal":  # the kernel's own-tile positions
            c_mask = ((qt + st.partial.shift) * _BLK + (t % split) * bk
                      + np.arange(bk))
          vis = _visible(st, r[:, None], c_mask[None, :], offsets, h,
                         _seg(q_seg, b, r)[:, None] if st.has_segments else None,
                         _seg(kv_seg, b, c)[None, :] if st.has_segments else None)
          s = np.where(vis, s, -np.inf)
        p = np.exp2(s - lse2[b, h, r][:, None])
        ds = p * (do[b, r, h] @ v[b, c, h // G].T - delta[b, h, r][:, None])
        if tanh is not None:
          ds = ds * (1.0 - tanh * tanh)
        if masked and quarters is not None:  # warpgroup (query half) skips
          bits = quarters[bm, hm, qt, t // split - num_full[bm, hm, qt]]
          halves = [t % split] if split == 2 else [0, 1]
          for qh in range(2):
            if all(bits >> (2 * qh + kh) & 1 for kh in halves):
              ds[qh * _HALF:(qh + 1) * _HALF] = 0.0
        if masked and "dq" in st.partial.skips and split == 2 and t % 2:
          ds[:_HALF] = 0.0  # queries 0-63 against keys 64-127 of the diagonal
        acc += ds @ kc
      dq[b, r, h] = acc * st.scale
    return dq, delta

  B, T, N, _ = q.shape
  shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, N, T), jnp.float32))
  return _host_call(run, shapes, q, k, v, do, out, lse2, dlse, q_seg, kv_seg,
                    offsets, rows.items, rows.bounds, *lists)


def _check_kv_items(items, counts, merge_tiles, merge_valid, B, N, KH):
  """Every key tile's group list is covered once: whole, or by split parts."""
  total = ma._group_counts(counts, B, N, KH)  # pylint: disable=protected-access
  ranges = {}
  for b, kvh, kt, start, end, slot in items:
    ranges.setdefault((b, kvh, kt), []).append((start, end, slot))
  assert len(ranges) == total.size, "every key tile needs a work item"
  max_parts = merge_valid.shape[1]
  split_tiles = {tuple(t): i for i, t in enumerate(merge_tiles)}
  for tile, rs in ranges.items():
    rs.sort()
    bounds = [0] + [e for _, e, _ in rs]
    assert [s for s, _, _ in rs] == bounds[:-1], (tile, rs)
    assert bounds[-1] == total[tile], (tile, rs, total[tile])
    if len(rs) == 1 and rs[0][2] < 0:
      assert tile not in split_tiles
      continue
    i = split_tiles[tile]
    assert [s for _, _, s in rs] == [i * max_parts + p for p in range(len(rs))]
    assert merge_valid[i].sum() == len(rs)


def _emu_dkv(q, k, v, do, lse2, delta, q_seg, kv_seg, offsets, lists, sched,
             st):
  """dK/dV kernel: per work item, its range of the GQA group's transposed
  lists (``_item_bounds`` per head, FULL entries unmasked, PARTIAL masked) in
  query steps of ``block_q_dkv``; whole tiles write dK/dV, split ones their
  float32 partial slot. Both 64-key warpgroups at once."""
  bq = st.cfg.block_q_dkv
  split = _BLK // bq
  n_slots = int(np.prod(sched.merge_valid.shape))

  def run(q, k, v, do, lse2, delta, q_seg, kv_seg, offsets, items, bounds,
          blocks, num_full, count, quarters, merge_tiles, merge_valid):
    B, _, N, H = q.shape
    KH = k.shape[2]
    G = N // KH
    _check_kv_items(items, count, merge_tiles, merge_valid, B, N, KH)
    dk = np.full(k.shape, np.nan, k.dtype)
    dv = np.full(k.shape, np.nan, k.dtype)
    dkp = np.full((n_slots, _BLK, H), np.nan, np.float32)
    dvp = np.full((n_slots, _BLK, H), np.nan, np.float32)
    for b, kvh, kt, start, end, slot in _cta_runs(items, bounds,
                                                  st.cfg.num_sms):
      c = kt * _BLK + np.arange(_BLK)
      kc, vc = k[b, c, kvh], v[b, c, kvh]
      acc_k = np.zeros((_BLK, H), np.float32)
      acc_v = np.zeros((_BLK, H), np.float32)
      offset = 0
      for g in range(G):
        hq = kvh * G + g
        bm, hm = _index(blocks.shape, b, hq)
        n_full, n_tot = num_full[bm, hm, kt], count[bm, hm, kt]
        lo, mid, hi = (int(x) for x in ma._item_bounds(  # pylint: disable=protected-access
            start, end, offset, n_full, n_tot))
        # The producer streams steps [lo, hi); the consumers run the FULL
        # loop [lo, mid) and the masked loop [mid, hi): same steps, same order.
        unmasked = range(lo * split, mid * split)
        masked = range(mid * split, hi * split)
        assert [*unmasked, *masked] == list(range(lo * split, hi * split))
        for j, is_masked in [(j, False) for j in unmasked] + [
            (j, True) for j in masked]:
          r = (blocks[bm, hm, kt, j // split] * _BLK + (j % split) * bq
               + np.arange(bq))
          qr, dor = q[b, r, hq], do[b, r, hq]
          s_t, tanh = _logits(kc @ qr.T, st)
          if is_masked:
            r_mask = r
            if st.partial.kind == "diagonal":  # the kernel's own-tile positions
              r_mask = ((kt - st.partial.shift) * _BLK + (j % split) * bq
                        + np.arange(bq))
            vis = _visible(
                st, r_mask[None, :], c[:, None], offsets, hq,
                _seg(q_seg, b, r)[None, :] if st.has_segments else None,
                _seg(kv_seg, b, c)[:, None] if st.has_segments else None)
            s_t = np.where(vis, s_t, -np.inf)
          p_t = np.exp2(s_t - lse2[b, hq, r][None, :])
          ds_t = p_t * (vc @ dor.T - delta[b, hq, r][None, :])
          if tanh is not None:
            ds_t = ds_t * (1.0 - tanh * tanh)
          if is_masked and quarters is not None:  # warpgroup (key half) skips
            bits = quarters[bm, hm, kt, j // split - n_full]
            halves = [j % split] if split == 2 else [0, 1]
            for kh in range(2):
              if all(bits >> (2 * qh + kh) & 1 for qh in halves):
                p_t[kh * _HALF:(kh + 1) * _HALF] = 0.0
                ds_t[kh * _HALF:(kh + 1) * _HALF] = 0.0
          if (is_masked and "dkv" in st.partial.skips and split == 2
              and j % 2 == 0):  # keys 64-127 against queries 0-63: skipped
            p_t[_HALF:] = 0.0
            ds_t[_HALF:] = 0.0
          acc_v += p_t @ dor
          acc_k += ds_t @ qr
        offset += n_tot
      acc_k *= st.scale
      if slot < 0:
        dk[b, c, kvh], dv[b, c, kvh] = acc_k, acc_v
      else:
        dkp[slot], dvp[slot] = acc_k, acc_v
    return dk, dv, dkp, dvp

  H = q.shape[3]
  kv = jax.ShapeDtypeStruct(k.shape, k.dtype)
  part = jax.ShapeDtypeStruct((n_slots, _BLK, H), jnp.float32)
  dk, dv, dkp, dvp = _host_call(run, (kv, kv, part, part), q, k, v, do, lse2,
                                delta, q_seg, kv_seg, offsets, sched.items,
                                sched.bounds, *lists, sched.merge_tiles,
                                sched.merge_valid)
  return (dk, dv, dkp, dvp) if n_slots else (dk, dv, None, None)


@pytest.fixture
def emulated(monkeypatch):
  """Runs ``mosaic_attention`` on CPU with the kernels emulated."""
  monkeypatch.setattr(ma, "supports", lambda *a, **k: None)
  monkeypatch.setattr(ma, "_forward", _emu_forward)
  monkeypatch.setattr(ma, "_backward_dq", _emu_dq)
  monkeypatch.setattr(ma, "_backward_dkv", _emu_dkv)
  ma._attention_fn.cache_clear()  # pylint: disable=protected-access
  yield
  ma._attention_fn.cache_clear()  # pylint: disable=protected-access


_F32_TOL = 2e-5
_SPLIT = {"auto": ma.DEFAULT_CONFIG,
          "never_grid_order": dataclasses.replace(ma.DEFAULT_CONFIG,
                                                  schedule="grid", dkv_split=0),
          "cap1": dataclasses.replace(ma.DEFAULT_CONFIG, dkv_split=1),
          "cap3_dq64": dataclasses.replace(ma.DEFAULT_CONFIG, dkv_split=3,
                                           block_kv_dq=64),
          # Persistent CTAs that walk many items each / one CTA per item.
          "3_ctas": dataclasses.replace(ma.DEFAULT_CONFIG, num_sms=3),
          "one_cta_per_item": dataclasses.replace(ma.DEFAULT_CONFIG,
                                                  persistent=False),
          "ascending_dkv": dataclasses.replace(ma.DEFAULT_CONFIG, num_sms=4,
                                               dkv_order="ascending")}

# The GPU check cases plus cases that stress the split, in float32 and with
# head_dim 16 (the lists do not depend on it; numpy matmuls are the cost).
_EMULATED_CASES = {
    **{n: dict({k: v for k, v in c.items() if k != "dtype"}, head_dim=16)
       for n, c in mosaic_check.CHECK_CASES.items()},
    "strided_mqa_long_columns": dict(
        pattern=P.StridedBlockSparse(block_size=128, stride=3,
                                     local_blocks=1), q_len=1280,
        kv_len=1280, heads=3, kv_heads=1, head_dim=16),
}
# Split variants run on cases with long lists or device-built lists.
_SPLIT_CASES = ("strided_mqa_long_columns", "sinkwindow_mqa_padded",
                "segments_anchor")


@pytest.mark.parametrize(
    "name,split", [(n, "auto") for n in sorted(_EMULATED_CASES)]
    + [(n, s) for n in _SPLIT_CASES for s in sorted(_SPLIT) if s != "auto"])
def test_emulated_kernels_match_reference(emulated, name, split):
  del emulated
  case = dict(_EMULATED_CASES[name], dtype=jnp.float32)
  if split != "auto":  # else the case's own config (some force a split)
    case["config"] = _SPLIT[split]
  errors, seed = mosaic_check.compare_with_reference(**case)
  bad = {k: v for k, v in errors.items() if not v <= _F32_TOL}
  assert not bad, f"{name}/{split} seed={seed}: errors above {_F32_TOL}: {bad}"


def test_emulated_device_lists_for_large_tables(emulated, monkeypatch):
  """Static offsets whose tables would be too large to embed: device lists."""
  del emulated
  monkeypatch.setattr(ma, "_MAX_CONSTANT_TABLE_BYTES", 0)
  ma._host_plan.cache_clear()  # pylint: disable=protected-access
  errors, seed = mosaic_check.compare_with_reference(
      P.StridedBlockSparse(block_size=128, stride=4, local_blocks=2),
      q_len=768, kv_len=768, head_dim=16, dtype=jnp.float32)
  ma._host_plan.cache_clear()  # pylint: disable=protected-access
  bad = {k: v for k, v in errors.items() if not v <= _F32_TOL}
  assert not bad, f"seed={seed}: {bad}"


def test_check_cli_configs(monkeypatch):
  """``--configs`` / ``--check-config`` parsing, and the overrides reach
  every check case on top of the case's own config."""
  cfg = mosaic_check._parse_config(  # pylint: disable=protected-access
      "stages_dkv=3,dkv_order=ascending,skip_empty_quarters=dq,persistent=0")
  assert (cfg.stages_dkv, cfg.dkv_order, cfg.skip_empty_quarters,
          cfg.persistent) == (3, "ascending", ("dq",), False)
  with pytest.raises(ValueError, match="unknown Config field 'stage'.*stages_dkv"):
    mosaic_check._parse_config("stage=3")  # pylint: disable=protected-access
  seen = {}

  def fake_compare(config=ma.DEFAULT_CONFIG, **_):
    seen[config.num_sms] = config
    return {"out": 1e-3}, 7

  monkeypatch.setattr(mosaic_check, "compare_with_reference", fake_compare)
  names = ["causal_gqa", "persistent_3ctas_strided"]
  assert mosaic_check.run_checks(names, overrides={"dkv_order": "ascending"})
  own = mosaic_check.CHECK_CASES["persistent_3ctas_strided"]["config"]
  assert seen[3] == dataclasses.replace(own, dkv_order="ascending")
  assert seen[ma.DEFAULT_CONFIG.num_sms] == dataclasses.replace(
      ma.DEFAULT_CONFIG, dkv_order="ascending")


# ----------------------------------------------------------------------------
# CPU: schedules.
# ----------------------------------------------------------------------------


def _work_class(work):
  """Classes of work within a factor of 2 (the kernel's launch classes)."""
  return np.frexp(work + ma._ITEM_OVERHEAD)[1]  # pylint: disable=protected-access


def _bwd_counts(pattern, length, heads):
  meta = block_mask.block_metadata(pattern, length, length, _BLK, _BLK,
                                   num_heads=heads)
  return meta.q_counts, meta.kv_counts


_ONE_CTA_PER_ITEM = dataclasses.replace(ma.DEFAULT_CONFIG, persistent=False)


@pytest.mark.parametrize("kv_heads", [16, 4, 1])
def test_kv_schedule_covers_every_tile_and_splits_only_long_lists(kv_heads):
  q_counts, _ = _bwd_counts(P.SinkWindow(64, 1023), 16384, 16)
  cfg = _ONE_CTA_PER_ITEM
  sched = ma._kv_schedule(q_counts, 2, 16, kv_heads, cfg)  # pylint: disable=protected-access
  _check_kv_items(sched.items, q_counts, sched.merge_tiles, sched.merge_valid,
                  2, 16, kv_heads)
  work = sched.items[:, 4] - sched.items[:, 3]
  assert (np.diff(_work_class(work)) <= 0).all(), "heaviest first"
  total = ma._group_counts(q_counts, 2, 16, kv_heads)  # pylint: disable=protected-access
  threshold, size = ma._split_sizes(total, cfg)  # pylint: disable=protected-access
  mean = (total.sum() + total.size * ma._ITEM_OVERHEAD) / cfg.num_sms  # pylint: disable=protected-access
  assert threshold == pytest.approx(max(ma._MIN_PART, 0.75 * mean))  # pylint: disable=protected-access
  assert work.max() <= max(threshold, size)
  if kv_heads == 16:  # 32 * 16 tiles of ~9 entries, the sink tiles 128: whole
    assert len(sched.merge_tiles) == 0 and (sched.items[:, 5] < 0).all()
  else:  # the sink column of a group of 4 / 16 heads is far above the mean
    assert len(sched.merge_tiles) == 2 * kv_heads


def test_kv_schedule_never_and_fixed_cap():
  q_counts, _ = _bwd_counts(P.Causal(), 2048, 2)
  never = ma._kv_schedule(q_counts, 1, 2, 1,  # pylint: disable=protected-access
                          dataclasses.replace(_ONE_CTA_PER_ITEM, dkv_split=0))
  assert never.items.shape == (16, 6) and never.merge_tiles.shape == (0, 3)
  assert list(never.items[:, 2]) == list(range(16)), "key tile 0 is heaviest"
  capped = ma._kv_schedule(q_counts, 1, 2, 1,  # pylint: disable=protected-access
                           dataclasses.replace(ma.DEFAULT_CONFIG, dkv_split=5))
  work = capped.items[:, 4] - capped.items[:, 3]
  assert work.max() <= 5 and work.sum() == 2 * 16 * 17 // 2
  _check_kv_items(capped.items, q_counts, capped.merge_tiles,
                  capped.merge_valid, 1, 2, 1)


def test_row_schedule_heaviest_first_over_heads():
  _, kv_counts = _bwd_counts(P.StridedBlockSparse(128, 4, 1), 2048, 4)
  rows = ma._row_schedule(kv_counts, 2, 4, _ONE_CTA_PER_ITEM).items  # pylint: disable=protected-access
  assert sorted(map(tuple, rows)) == sorted(
      (b, h, t) for b in range(2) for h in range(4) for t in range(16))
  work_class = _work_class(kv_counts[0, rows[:, 1], rows[:, 2]])
  assert (np.diff(work_class) <= 0).all()
  for c in np.unique(work_class):  # grid order inside a class: head-major
    assert (np.diff(rows[work_class == c, 1]) >= 0).all()
  grid = ma._row_schedule(kv_counts, 2, 4, dataclasses.replace(  # pylint: disable=protected-access
      _ONE_CTA_PER_ITEM, schedule="grid")).items
  assert tuple(grid[0]) == (0, 0, 15) and tuple(grid[1]) == (1, 0, 15)
  device = jax.jit(lambda c: ma._row_schedule(c, 2, 4, _ONE_CTA_PER_ITEM))(  # pylint: disable=protected-access
      jnp.asarray(kv_counts))
  np.testing.assert_array_equal(np.asarray(device.items), rows)
  np.testing.assert_array_equal(np.asarray(device.bounds),
                                np.arange(len(rows) + 1))


def _cta_loads(work, bounds):
  return np.add.reduceat(work + ma._ITEM_OVERHEAD, bounds[:-1])  # pylint: disable=protected-access


@pytest.mark.parametrize("num_sms", [1, 5, 132])
def test_persistent_ctas_balance_host_work(num_sms):
  """Host lists: every item runs once, each CTA keeps the given
  (heaviest-class-first) order, and no CTA ends more than one item after the
  mean (greedy list scheduling). Device lists: one CTA per item."""
  rng = np.random.default_rng(num_sms)
  work = rng.integers(0, 40, size=700).astype(np.int32)
  work = work[ma._heaviest_first(work, np)]  # pylint: disable=protected-access
  items = np.stack([np.arange(700), work], axis=-1).astype(np.int32)
  cfg = dataclasses.replace(ma.DEFAULT_CONFIG, num_sms=num_sms)
  got, bounds = ma._assign_to_ctas(items, work, cfg)  # pylint: disable=protected-access
  assert len(bounds) == num_sms + 1 and bounds[0] == 0
  assert sorted(got[:, 0]) == list(range(700)), "each item exactly once"
  for c in range(num_sms):
    assert (np.diff(got[bounds[c]:bounds[c + 1], 0]) > 0).all()
  cost = work + ma._ITEM_OVERHEAD  # pylint: disable=protected-access
  loads = _cta_loads(got[:, 1], bounds)
  assert loads.max() <= cost.sum() / num_sms + cost.max(), loads.max()
  few = ma._assign_to_ctas(items[:3], work[:3], cfg)  # pylint: disable=protected-access
  assert len(few.bounds) == min(num_sms, 3) + 1
  device = jax.jit(lambda i, w: ma._assign_to_ctas(i, w, cfg))(items, work)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(device.items), items)
  np.testing.assert_array_equal(np.asarray(device.bounds), np.arange(701))


@pytest.mark.parametrize("xp", [np, jnp])
def test_full_first_lists_descending(xp):
  """FULL entries first (ascending, or descending on request), then the
  PARTIAL ones in their order; entries past the count stay where they are."""
  blocks = xp.asarray([[3, 5, 6, 8, 9, 9], [1, 2, 4, 4, 4, 4]])
  full = xp.asarray([[False, True, True, False, True, False],
                     [True, True, False, False, False, False]])
  count = xp.asarray([5, 3])
  up = ma._full_first(blocks, full, count)  # pylint: disable=protected-access
  down = ma._full_first(blocks, full, count, descending=True)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(up.blocks),
                                [[5, 6, 9, 3, 8, 9], [1, 2, 4, 4, 4, 4]])
  np.testing.assert_array_equal(np.asarray(down.blocks),
                                [[9, 6, 5, 3, 8, 9], [2, 1, 4, 4, 4, 4]])
  for lists in (up, down):
    np.testing.assert_array_equal(np.asarray(lists.num_full), [3, 2])
    np.testing.assert_array_equal(np.asarray(lists.count), [5, 3])


@pytest.mark.parametrize("pattern,q_len,kv_len,q_off,kv_off", [
    (P.StridedBlockSparse(block_size=128, stride=4, local_blocks=1), 1024,
     1024, 0, 0),
    (P.SinkWindow(64, 300), 1000, 1000, 0, 0),
    (P.PerHead((P.Causal(), P.SlidingWindow(200), P.Full(),
                P.TriShape(32, 100, 700))), 700, 900, 0, 0),
    (P.Causal(), 320, 1024, 704, 0),
])
def test_empty_quarters_are_the_empty_64x64_quarters(pattern, q_len, kv_len,
                                                     q_off, kv_off):
  """Bit 2 * query_half + key_half of every PARTIAL entry, in both list
  directions, is set exactly when that quarter sees no pair (padding
  included), and entries past the PARTIAL ones carry no bits."""
  heads = 4
  bits_cfg = dataclasses.replace(ma.DEFAULT_CONFIG, causal_partial_masks=False)
  (fwd, bwd, *_), has_partial, _ = ma._host_plan(  # pylint: disable=protected-access
      pattern, q_len, kv_len, q_off, kv_off, 1, heads, heads, bits_cfg)
  assert has_partial
  t_pad, s_pad = -(-q_len // _BLK) * _BLK, -(-kv_len // _BLK) * _BLK
  dense = np.zeros((heads, t_pad, s_pad), bool)
  dense[:, :q_len, :kv_len] = pattern.dense_mask(q_len, kv_len, q_off, kv_off,
                                                 heads)
  assert fwd.empty_quarters is not None
  for lists, rows_are_queries in ((fwd, True), (bwd, False)):
    quarters = lists.empty_quarters
    if quarters is None:  # dK/dV: PARTIAL entries mostly in short lists
      continue
    for h in range(heads):
      hm = h if lists.blocks.shape[1] > 1 else 0
      for row in range(lists.blocks.shape[2]):
        nf, n = lists.num_full[0, hm, row], lists.count[0, hm, row]
        for p in range(quarters.shape[-1]):
          bits = quarters[0, hm, row, p]
          if nf + p >= n:
            assert bits == 0
            continue
          other = lists.blocks[0, hm, row, nf + p]
          qi, ki = (row, other) if rows_are_queries else (other, row)
          for qh in range(2):
            for kh in range(2):
              quarter = dense[h, qi * _BLK + qh * _HALF:][:_HALF,
                              ki * _BLK + kh * _HALF:][:, :_HALF]
              assert bool(bits >> (2 * qh + kh) & 1) == (not quarter.any()), (
                  h, row, p, qh, kh)


@pytest.mark.parametrize("pattern, q_len, kv_len, q_off, kv_off, want", [
    (P.Causal(), 1024, 1024, 0, 0, "diagonal"),
    (P.Causal(), 1000, 1000, 0, 0, "causal"),   # padded query rows: PARTIAL
    (P.Causal(), 320, 1024, 704, 0, "causal"),  # chunked prefill, off-grid
    (P.Causal(), 256, 1024, 768, 0, "diagonal"),  # on the grid: shift 6
    (P.Causal(), 384, 384, 37, 37, "diagonal"),
    (P.Causal(), 300, 400, 37, 3, "causal"),
    (P.StridedBlockSparse(block_size=128, stride=4, local_blocks=1), 1024,
     1024, 0, 0, "diagonal"),
    (P.StridedBlockSparse(block_size=128, stride=16, local_blocks=2), 1024,
     1000, 0, 0, "diagonal"),                 # padded keys: masked apart
    (P.StridedBlockSparse(block_size=128, stride=16, local_blocks=2), 1000,
     1000, 0, 0, "causal"),
    (P.StridedBlockSparse(block_size=64, stride=4, local_blocks=1), 1024,
     1024, 0, 0, "pattern"),                  # 64-blocks inside the tiles
    (P.SinkWindow(64, 300), 1000, 1000, 0, 0, "pattern"),
    (P.SlidingWindow(200), 1000, 1000, 0, 0, "pattern"),
    (P.PerHead((P.Causal(), P.SlidingWindow(200), P.Full(), P.Causal())),
     700, 900, 0, 0, "pattern"),
    (P.Causal() & P.StridedBlocks(block_size=128, stride=4), 640, 640, 64,
     64, "pattern"),                          # 128-blocks off the tile grid
])
def test_partial_masks(pattern, q_len, kv_len, q_off, kv_off, want):
  """The host proof behind the kernels' cheap masks: "causal" exactly when
  every PARTIAL tile's real pairs are the causal ones (checked here against
  the dense mask), "diagonal" when those tiles are also the diagonal ones
  (key tile = query tile + shift; no empty-quarter bits then), off by the
  config."""
  heads = 4
  (fwd, bwd, *_), has_partial, masks = ma._host_plan(  # pylint: disable=protected-access
      pattern, q_len, kv_len, q_off, kv_off, 1, heads, heads,
      ma.DEFAULT_CONFIG)
  assert has_partial and masks.kind == want
  kind = block_mask.classify_blocks(pattern, q_len, kv_len, _BLK, _BLK, q_off,
                                    kv_off, heads)
  dense = np.broadcast_to(pattern.dense_mask(q_len, kv_len, q_off, kv_off,
                                             heads), (heads, q_len, kv_len))
  causal_pairs = (np.arange(q_len)[:, None] + q_off
                  >= np.arange(kv_len)[None, :] + kv_off)
  partial = np.broadcast_to(kind == block_mask.PARTIAL,
                            (heads,) + kind.shape[1:])
  partial_pairs = np.kron(partial, np.ones((_BLK, _BLK), bool))
  agree = ~partial_pairs[:, :q_len, :kv_len] | (dense == causal_pairs)
  assert bool(agree.all()) == (want != "pattern")
  _, qi, ki = np.nonzero(partial)
  diagonal = (q_off - kv_off) % _BLK == 0 and (
      ki - qi == (q_off - kv_off) // _BLK).all()
  assert (want == "diagonal") == bool(agree.all() and diagonal)
  if want == "diagonal":
    assert masks.shift == (q_off - kv_off) // _BLK
    assert fwd.empty_quarters is None and bwd.empty_quarters is None
  off = dataclasses.replace(ma.DEFAULT_CONFIG, causal_partial_masks=False)
  assert ma._host_plan(pattern, q_len, kv_len, q_off, kv_off, 1, heads,  # pylint: disable=protected-access
                       heads, off)[2] == ma.PartialMasks()


def test_quarters_empty_reads_the_bits():
  for bits in range(16):
    for q_half in (0, 1, None):
      for k_half in (0, 1, None):
        want = all(bits >> (2 * qh + kh) & 1
                   for qh in ((0, 1) if q_half is None else (q_half,))
                   for kh in ((0, 1) if k_half is None else (k_half,)))
        got = ma._quarters_empty(  # pylint: disable=protected-access
            jnp.int32(bits), None if q_half is None else jnp.int32(q_half),
            None if k_half is None else jnp.int32(k_half))
        assert bool(got) == want, (bits, q_half, k_half)


def test_empty_quarters_config():
  """Where PARTIAL entries are frequent (not dense causal), and for dK/dV
  only if most sit in long lists (not strided diagonals); none when off."""
  def quarters(pattern, cfg=ma.DEFAULT_CONFIG, length=4096):
    (fwd, bwd, *_), _, masks = ma._host_plan(pattern, length, length, 0, 0, 1,  # pylint: disable=protected-access
                                             4, 4, cfg)
    if masks.kind == "diagonal":  # skips known from the tile index, no bits
      assert fwd.empty_quarters is None and bwd.empty_quarters is None
      return "dq" in masks.skips, "dkv" in masks.skips
    assert not masks.skips
    return fwd.empty_quarters is not None, bwd.empty_quarters is not None

  assert quarters(P.StridedBlockSparse(128, 16, 1)) == (True, False)
  assert quarters(P.SinkWindow(64, 1023)) == (True, True)
  assert quarters(P.Causal(), length=32768) == (False, False)  # 1/256 PARTIAL
  assert quarters(P.Causal()) == (True, True)  # 32 tiles: 1/16.5 PARTIAL
  off = dataclasses.replace(ma.DEFAULT_CONFIG, skip_empty_quarters=())
  assert quarters(P.SinkWindow(64, 1023), off) == (False, False)
  assert quarters(P.StridedBlockSparse(128, 16, 1), off) == (False, False)
  with pytest.raises(ValueError, match="skip_empty_quarters"):
    dataclasses.replace(ma.DEFAULT_CONFIG, skip_empty_quarters=("fwd",))


def test_item_bounds():
  # Head list [offset, offset + count) = [10, 16) with 4 FULL entries.
  for start, end, want in ((0, 100, (0, 4, 6)), (12, 14, (2, 4, 4)),
                           (15, 30, (5, 5, 6)), (0, 10, (0, 0, 0)),
                           (16, 20, (6, 6, 6)), (13, 15, (3, 4, 5))):
    got = tuple(int(x) for x in ma._item_bounds(start, end, 10, 4, 6))  # pylint: disable=protected-access
    assert got == want, (start, end, got, want)


def test_merge_split_tiles_sums_parts_in_place():
  rng = np.random.default_rng(0)
  d = jnp.asarray(rng.normal(size=(2, 3 * _BLK, 2, 8)), jnp.float32)
  parts = rng.normal(size=(2 * 3, _BLK, 8)).astype(np.float32)
  parts[2] = np.nan  # a slot of no part: must not leak into the sum
  sched = ma.KvSchedule(
      items=np.zeros((0, 6), np.int32), bounds=np.zeros(1, np.int32),
      merge_tiles=np.array([[1, 0, 2], [0, 1, 1]], np.int32),
      merge_valid=np.array([[True, True, False], [True, True, True]]))
  got = np.asarray(ma._merge_split_tiles(d, jnp.asarray(parts), sched))  # pylint: disable=protected-access
  want = np.array(d)
  want[1, 2 * _BLK:3 * _BLK, 0] = parts[0] + parts[1]
  want[0, _BLK:2 * _BLK, 1] = parts[3] + parts[4] + parts[5]
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.skipif(tuple(map(int, jax.__version__.split(".")[:2])) < (0, 11),
                    reason="the kernels use the jax 0.11 Mosaic GPU API")
def test_benchmark_compares_lowerings_without_mosaic_payloads(monkeypatch):
  """Two lowerings of one Mosaic call differ only in the kernels' serialized
  modules and hashes, which the CP benchmark's program comparison masks;
  a different pattern still gives a different program."""
  from lcjax.bench.context_parallel import comparable_program  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(ma, "supports", lambda *a, **k: None)
  qd = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
  kd = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)

  def lowered(pattern):
    fn = jax.jit(lambda q, k, v: ma.mosaic_attention(q, k, v, pattern))
    return fn.trace(qd, kd, kd).lower(lowering_platforms=("cuda",)).as_text()

  first, second = (lowered(P.SinkWindow(64, 300)) for _ in range(2))
  assert comparable_program(first) == comparable_program(second)
  assert 'kernel_hash = "..."' in comparable_program(first)
  assert comparable_program(first) != comparable_program(
      lowered(P.SinkWindow(64, 700)))


@pytest.mark.skipif(tuple(map(int, jax.__version__.split(".")[:2])) < (0, 11),
                    reason="the kernels use the jax 0.11 Mosaic GPU API")
@pytest.mark.parametrize("split, causal_masks", [(0, True), (2, False)])
def test_kernels_lower_for_cuda(monkeypatch, split, causal_masks):
  """Traces and lowers forward + backward (all three kernels) for CUDA, with
  the pattern's element mask or the causal comparison on PARTIAL tiles."""
  monkeypatch.setattr(ma, "supports", lambda *a, **k: None)
  cfg = dataclasses.replace(ma.DEFAULT_CONFIG, dkv_split=split,
                            causal_partial_masks=causal_masks)
  pattern = P.StridedBlockSparse(block_size=128, stride=4, local_blocks=2)

  def f(q, k, v, do):
    out, vjp = jax.vjp(lambda q, k, v: ma.mosaic_attention(
        q, k, v, pattern, softcap=30.0, config=cfg), q, k, v)
    return out, vjp(do)

  qd = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
  kd = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
  text = jax.jit(f).trace(qd, kd, kd, qd).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 3
  n_dkv_outputs = 4 if split else 2
  assert f":{n_dkv_outputs} = stablehlo.custom_call @mosaic_gpu" in text
