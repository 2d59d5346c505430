"""Block-sparse flash attention in portable Pallas (Triton on GPU, interpret on CPU).

FlashAttention-2 (Dao, 2023) forward and backward, driven by the block metadata
of :mod:`lcjax.attention.block_mask`: each query block visits only the key
blocks its pattern (and segment ids) can see; FULL blocks run without an
element mask, PARTIAL blocks apply ``pattern.mask`` (plus segments and
padding). This is the tested specification of the fast paths; its jnp
reference is :func:`lcjax.attention.reference.dense_attention` (re-exported
here as :func:`reference`).

Kernels (grid order ``(block, batch, head)``):

* forward: per (query block, head), online softmax over the visited key
  blocks; writes ``out`` and ``lse`` (natural log, float32).
* dq: per (query block, head), the same visits, accumulating ``dq``.
* dk/dv: per (key block, query head), the transposed visits; per-query-head
  results are summed over each grouped-query group outside the kernel, so K/V
  are never repeated in memory.

``lse`` is differentiable (its cotangent enters as ``delta - dlse``), which
ring attention and branch merging need.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from lcjax.attention import block_mask
from lcjax.attention.patterns import Pattern
from lcjax.attention.reference import dense_attention as reference

__all__ = ["BlockSizes", "flash_attention", "reference", "supports"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two >= 16 on GPU) and Triton launch parameters."""
  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2

  @classmethod
  def default(cls, head_dim: int, platform: str) -> BlockSizes:
    if platform == "cpu":
      return cls(32, 32, 32, 32, 32, 32)
    if head_dim <= 64:
      return cls(128, 64, 64, 64, 64, 128, num_warps=4, num_stages=3,
                 num_warps_bwd=4, num_stages_bwd=2)
    if head_dim <= 128:
      return cls(128, 64, 64, 64, 64, 64, num_warps=8, num_stages=3,
                 num_warps_bwd=4, num_stages_bwd=2)
    return cls(64, 32, 32, 32, 32, 32, num_warps=4, num_stages=2,
               num_warps_bwd=4, num_stages_bwd=1)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: a custom_vjp nondiff arg)."""
  pattern: Pattern
  scale: float
  softcap: float | None
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  has_segments: bool
  blocks: BlockSizes
  interpret: bool
  has_partial: tuple[bool, bool, bool]  # forward, dq, dkv: any PARTIAL block?

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def supports(q_shape, k_shape, dtype, pattern: Pattern, has_segments: bool,
             softcap) -> str | None:
  """None if the portable kernel runs this call, else the reason why not."""
  del k_shape, softcap
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype)} is not float32/bfloat16/float16"
  if q_shape[-1] > 256:
    return f"head_dim={q_shape[-1]} > 256"
  if not pattern.in_kernel_mask and has_segments:
    return (f"{type(pattern).__name__} is a table lookup, which the kernel "
            "cannot evaluate on the PARTIAL blocks that segment ids create")
  return None


# ------------------------------------------------------------------ tables


def _packed(visit, width: int, xp):
  """``[..., n, width]`` int32: column 0 = count, then ascending indices."""
  idx, count, _ = block_mask.visit_lists(visit, visit, width - 1, xp)
  return xp.concatenate([count[..., None], idx], axis=-1).astype(xp.int32)


def _tables(kind, widths, xp):
  """Per kernel direction: (partial table, full table)."""
  partial, full = kind == block_mask.PARTIAL, kind == block_mask.FULL
  fwd = (_packed(partial, widths[0], xp), _packed(full, widths[1], xp))
  pt, ft = xp.swapaxes(partial, -1, -2), xp.swapaxes(full, -1, -2)
  bwd = (_packed(pt, widths[2], xp), _packed(ft, widths[3], xp))
  return fwd, bwd


def _pad_kind(kind, n_q: int, n_k: int, xp):
  """Pads a kind array with SKIP blocks up to the kernel grid ``n_q x n_k``."""
  pad = ((0, 0), (0, 0), (0, n_q - kind.shape[-2]), (0, n_k - kind.shape[-1]))
  return xp.pad(kind, pad)


def _widths(kind: np.ndarray, with_segments: bool):
  """Static table widths; with segments FULL blocks may turn PARTIAL."""
  partial, full = kind == block_mask.PARTIAL, kind == block_mask.FULL
  visit = partial | full
  p = visit if with_segments else partial
  counts = (p.sum(-1).max(), full.sum(-1).max(), p.sum(-2).max(),
            full.sum(-2).max())
  return tuple(_next_pow2(max(int(c) + 1, 2)) for c in counts)


# Host tables enter the jitted program as constants, which XLA embeds in the
# program text; above this size they are computed on device instead.
MAX_CONSTANT_TABLE_BYTES = 8 << 20


@functools.lru_cache(maxsize=256)
def _host_kind(pattern, q_len, kv_len, bq, bk, q_offset, kv_offset, num_heads,
               n_q, n_k, exact=True):
  kind = block_mask._classify_host(  # pylint: disable=protected-access
      pattern, q_len, kv_len, bq, bk, q_offset, kv_offset, num_heads, exact)[0]
  return _pad_kind(kind[None], n_q, n_k, np)


@functools.lru_cache(maxsize=256)
def _host_tables(pattern, q_len, kv_len, bq, bk, q_offset, kv_offset, num_heads,
                 n_q, n_k):
  kind = _host_kind(pattern, q_len, kv_len, bq, bk, q_offset, kv_offset,
                    num_heads, n_q, n_k)
  widths = _widths(kind, False)
  tables = _tables(kind, widths, np)
  return tables, bool((kind == block_mask.PARTIAL).any()), widths


def _direction_tables(pattern, q_len, kv_len, bq, bk, q_offset, kv_offset,
                      num_heads, q_seg, kv_seg, n_q, n_k):
  """(forward-style tables, transposed tables, any_partial) for one block shape.

  ``n_q``/``n_k`` are the kernel's block counts (lengths padded to the largest
  block of all three kernels). Static offsets use the exact host
  classification while it is small enough to be a program constant; beyond
  that, and for traced offsets or segment ids, the tables are built on device.
  """
  sq, sk = block_mask.static_int(q_offset), block_mask.static_int(kv_offset)
  if sq is None or sk is None:  # traced offsets: conservative device bounds
    widths = tuple(_next_pow2(n + 1) for n in (n_k, n_k, n_q, n_q))
    kind = block_mask.classify_blocks_device(pattern, q_len, kv_len, bq, bk,
                                             q_offset, kv_offset, num_heads,
                                             q_seg, kv_seg)
    fwd, bwd = _tables(_pad_kind(kind, n_q, n_k, jnp), widths, jnp)
    return fwd, bwd, True
  key = (pattern, q_len, kv_len, bq, bk, sq, sk, num_heads, n_q, n_k)
  has_seg = q_seg is not None
  if not has_seg:
    tables, any_partial, widths = _host_tables(*key)
    nbytes = 4 * tables[0][0].shape[1] * (n_q * (widths[0] + widths[1])
                                          + n_k * (widths[2] + widths[3]))
    if nbytes <= MAX_CONSTANT_TABLE_BYTES:
      return (tuple(map(jnp.asarray, tables[0])),
              tuple(map(jnp.asarray, tables[1])), any_partial)
    exact = False
  else:
    exact = _host_kind(*key).nbytes <= MAX_CONSTANT_TABLE_BYTES
  kind = _host_kind(*key, exact)  # static widths of the device result
  widths = _widths(kind, has_seg)
  any_partial = has_seg or bool((kind == block_mask.PARTIAL).any())
  kind = block_mask.classify_blocks_device(pattern, q_len, kv_len, bq, bk, sq,
                                           sk, num_heads, q_seg, kv_seg, exact)
  fwd, bwd = _tables(_pad_kind(kind, n_q, n_k, jnp), widths, jnp)
  return fwd, bwd, any_partial


# ----------------------------------------------------------------- kernels


def _dot(a, b, transpose_b: bool = False):
  dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
  precision = (lax.Precision.HIGHEST if a.dtype == jnp.float32 else None)
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def _logits(cfg: _Config, a, b):
  """Scaled (and soft-capped) logits ``a @ b.T``; returns (s, tanh or None)."""
  s = _dot(a, b, transpose_b=True) * cfg.scale
  if cfg.softcap is None:
    return s, None
  t = jnp.tanh(s / cfg.softcap)
  return cfg.softcap * t, t


def _visible(cfg: _Config, q_idx, k_idx, head, offs_ref, q_seg, k_seg):
  """Element mask for local indices ``q_idx``/``k_idx`` (broadcasting)."""
  q_pos = offs_ref[0] + q_idx
  k_pos = offs_ref[1] + k_idx
  vis = cfg.pattern.mask(q_pos, k_pos, head) & (k_idx < cfg.kv_len)
  if cfg.has_segments:
    same = q_seg == k_seg
    if cfg.pattern.has_segment_exemptions:
      same = same | cfg.pattern.segment_exempt(q_pos, k_pos, head)
    vis = vis & same
  return vis


def _unpack(cfg: _Config, refs, n_out: int):
  """Splits kernel refs into (seg refs or Nones, tables, outputs)."""
  refs = list(refs)
  outs = refs[len(refs) - n_out:]
  refs = refs[:len(refs) - n_out]
  partial_ref, full_ref = refs[-2:]
  segs = tuple(refs[:-2]) if cfg.has_segments else (None, None)
  return segs, partial_ref, full_ref, outs


def _fwd_kernel(offs_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config, nq: int):
  (qseg_ref, kseg_ref), partial_ref, full_ref, (o_ref, lse_ref) = _unpack(
      cfg, refs, 2)
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
  i = nq - 1 - pl.program_id(0)
  head = pl.program_id(2)
  q = q_ref[...]
  q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = qseg_ref[...][:, None] if cfg.has_segments else None

  def visit(table_ref, masked):
    def body(t, carry):
      m, l, acc = carry
      j = table_ref[1 + t]
      start = pl.multiple_of(j * bk, bk)
      k = k_ref[pl.ds(start, bk), :]
      v = v_ref[pl.ds(start, bk), :]
      s, _ = _logits(cfg, q, k)
      s = s * _LOG2E
      if masked:
        k_idx = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k_seg = kseg_ref[pl.ds(start, bk)][None, :] if cfg.has_segments else None
        vis = _visible(cfg, q_idx, k_idx, head, offs_ref, q_seg, k_seg)
        s = jnp.where(vis, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp2(m - m_safe)
      p = jnp.exp2(s - m_safe[:, None])
      l = l * alpha + p.sum(axis=1)
      acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
      return m_new, l, acc
    return body

  head_dim = q.shape[-1]
  carry = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
           jnp.zeros((bq, head_dim), jnp.float32))
  carry = lax.fori_loop(0, full_ref[0], visit(full_ref, False), carry)
  if cfg.has_partial[0]:
    carry = lax.fori_loop(0, partial_ref[0], visit(partial_ref, True), carry)
  m, l, acc = carry
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * _LN2)


def _dq_kernel(offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cfg: _Config, nq: int):
  (qseg_ref, kseg_ref), partial_ref, full_ref, (dq_ref,) = _unpack(cfg, refs, 1)
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
  i = nq - 1 - pl.program_id(0)
  head = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse2 = lse_ref[...][:, None]  # log2 units; +inf on empty rows
  delta = delta_ref[...][:, None]
  q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = qseg_ref[...][:, None] if cfg.has_segments else None

  def visit(table_ref, masked):
    def body(t, dq):
      j = table_ref[1 + t]
      start = pl.multiple_of(j * bk, bk)
      k = k_ref[pl.ds(start, bk), :]
      v = v_ref[pl.ds(start, bk), :]
      s, tanh = _logits(cfg, q, k)
      s = s * _LOG2E
      if masked:
        k_idx = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k_seg = kseg_ref[pl.ds(start, bk)][None, :] if cfg.has_segments else None
        vis = _visible(cfg, q_idx, k_idx, head, offs_ref, q_seg, k_seg)
        s = jnp.where(vis, s, -jnp.inf)
      p = jnp.exp2(s - lse2)
      dp = _dot(do, v, transpose_b=True)
      ds = p * (dp - delta)
      if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
      return dq + _dot(ds.astype(k.dtype), k)
    return body

  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(0, full_ref[0], visit(full_ref, False), dq)
  if cfg.has_partial[1]:
    dq = lax.fori_loop(0, partial_ref[0], visit(partial_ref, True), dq)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                cfg: _Config):
  (qseg_ref, kseg_ref), partial_ref, full_ref, (dk_ref, dv_ref) = _unpack(
      cfg, refs, 2)
  bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
  j = pl.program_id(0)
  head = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
  k_seg = kseg_ref[...][:, None] if cfg.has_segments else None

  def visit(table_ref, masked):
    def body(t, carry):
      dk, dv = carry
      i = table_ref[1 + t]
      start = pl.multiple_of(i * bq, bq)
      q = q_ref[pl.ds(start, bq), :]
      do = do_ref[pl.ds(start, bq), :]
      lse2 = lse_ref[pl.ds(start, bq)][None, :]
      delta = delta_ref[pl.ds(start, bq)][None, :]
      s, tanh = _logits(cfg, k, q)  # [bk, bq]
      s = s * _LOG2E
      if masked:
        q_idx = start + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        q_seg = qseg_ref[pl.ds(start, bq)][None, :] if cfg.has_segments else None
        vis = _visible(cfg, q_idx, k_idx, head, offs_ref, q_seg, k_seg)
        s = jnp.where(vis, s, -jnp.inf)
      p = jnp.exp2(s - lse2)
      dv = dv + _dot(p.astype(do.dtype), do)
      dp = _dot(v, do, transpose_b=True)
      ds = p * (dp - delta)
      if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
      dk = dk + _dot(ds.astype(q.dtype), q)
      return dk, dv
    return body

  zeros = jnp.zeros(k.shape, jnp.float32)
  carry = lax.fori_loop(0, full_ref[0], visit(full_ref, False), (zeros, zeros))
  if cfg.has_partial[2]:
    carry = lax.fori_loop(0, partial_ref[0], visit(partial_ref, True), carry)
  dk, dv = carry
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------- pallas calls


def _compiler_params(cfg: _Config, backward: bool):
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as pl_triton  # GPU only
  b = cfg.blocks
  if backward:
    return pl_triton.CompilerParams(num_warps=b.num_warps_bwd,
                                    num_stages=b.num_stages_bwd)
  return pl_triton.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages)


def _table_spec(table, index_of_row):
  """BlockSpec of one row of a ``[Bm, Hm, n, W]`` table."""
  bm, hm, _, width = table.shape
  return pl.BlockSpec(
      (None, None, None, width),
      lambda r, b, h: (b * (bm > 1), h * (hm > 1), index_of_row(r), 0))


def _seg_specs(cfg, q_block, k_block, q_len_p, k_len_p, q_row, k_row):
  """Segment-id BlockSpecs: a block (None for the whole row) per side."""
  if not cfg.has_segments:
    return []
  q_spec = (pl.BlockSpec((None, q_block), lambda r, b, h: (b, q_row(r)))
            if q_block else pl.BlockSpec((None, q_len_p), lambda r, b, h: (b, 0)))
  k_spec = (pl.BlockSpec((None, k_block), lambda r, b, h: (b, k_row(r)))
            if k_block else pl.BlockSpec((None, k_len_p), lambda r, b, h: (b, 0)))
  return [q_spec, k_spec]


def _forward(cfg: _Config, q, k, v, q_seg, kv_seg, offs, tables):
  B, Tp, N, H = q.shape
  Sp = k.shape[1]
  bq = cfg.blocks.block_q
  nq = Tp // bq
  G = cfg.group
  row = lambda r: nq - 1 - r  # heaviest (latest) query blocks first
  in_specs = [
      pl.BlockSpec((2,), lambda r, b, h: (0,)),
      pl.BlockSpec((None, bq, None, H), lambda r, b, h: (b, row(r), h, 0)),
      pl.BlockSpec((None, Sp, None, H), lambda r, b, h: (b, 0, h // G, 0)),
      pl.BlockSpec((None, Sp, None, H), lambda r, b, h: (b, 0, h // G, 0)),
      *_seg_specs(cfg, bq, None, Tp, Sp, row, None),
      _table_spec(tables[0], row),
      _table_spec(tables[1], row),
  ]
  segs = [q_seg, kv_seg] if cfg.has_segments else []
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, nq=nq),
      grid=(nq, B, N),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, bq, None, H), lambda r, b, h: (b, row(r), h, 0)),
          pl.BlockSpec((None, None, bq), lambda r, b, h: (b, h, row(r))),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
      interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg, backward=False),
      name="lcjax_flash_fwd",
  )(offs, q, k, v, *segs, *tables)
  return out, lse


def _backward(cfg: _Config, q, k, v, q_seg, kv_seg, offs, dq_tables, dkv_tables,
              out, lse, d_out, d_lse):
  B, Tp, N, H = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = cfg.group
  segs = [q_seg, kv_seg] if cfg.has_segments else []
  # delta = rowsum(dO * O) - dlse: the lse cotangent enters the softmax
  # gradient as a shift of delta (d lse_i / d s_ij = p_ij).
  delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32),
                     out.astype(jnp.float32)) - d_lse.astype(jnp.float32)
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * _LOG2E)

  bq, nq = cfg.blocks.block_q_dq, Tp // cfg.blocks.block_q_dq
  row = lambda r: nq - 1 - r
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, nq=nq),
      grid=(nq, B, N),
      in_specs=[
          pl.BlockSpec((2,), lambda r, b, h: (0,)),
          pl.BlockSpec((None, bq, None, H), lambda r, b, h: (b, row(r), h, 0)),
          pl.BlockSpec((None, Sp, None, H), lambda r, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, Sp, None, H), lambda r, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, bq, None, H), lambda r, b, h: (b, row(r), h, 0)),
          pl.BlockSpec((None, None, bq), lambda r, b, h: (b, h, row(r))),
          pl.BlockSpec((None, None, bq), lambda r, b, h: (b, h, row(r))),
          *_seg_specs(cfg, bq, None, Tp, Sp, row, None),
          _table_spec(dq_tables[0], row),
          _table_spec(dq_tables[1], row),
      ],
      out_specs=pl.BlockSpec((None, bq, None, H), lambda r, b, h: (b, row(r), h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg, backward=True),
      name="lcjax_flash_dq",
  )(offs, q, k, v, d_out, lse2, delta, *segs, *dq_tables)

  bk, nk = cfg.blocks.block_k_dkv, Sp // cfg.blocks.block_k_dkv
  ident = lambda r: r
  kv_dtype = k.dtype if G == 1 else jnp.float32
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(nk, B, N),
      in_specs=[
          pl.BlockSpec((2,), lambda r, b, h: (0,)),
          pl.BlockSpec((None, Tp, None, H), lambda r, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, bk, None, H), lambda r, b, h: (b, r, h // G, 0)),
          pl.BlockSpec((None, bk, None, H), lambda r, b, h: (b, r, h // G, 0)),
          pl.BlockSpec((None, Tp, None, H), lambda r, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, None, Tp), lambda r, b, h: (b, h, 0)),
          pl.BlockSpec((None, None, Tp), lambda r, b, h: (b, h, 0)),
          *_seg_specs(cfg, None, bk, Tp, Sp, None, ident),
          _table_spec(dkv_tables[0], ident),
          _table_spec(dkv_tables[1], ident),
      ],
      out_specs=[
          pl.BlockSpec((None, bk, None, H), lambda r, b, h: (b, r, h, 0)),
          pl.BlockSpec((None, bk, None, H), lambda r, b, h: (b, r, h, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, Sp, N, H), kv_dtype)] * 2,
      interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg, backward=True),
      name="lcjax_flash_dkv",
  )(offs, q, k, v, d_out, lse2, delta, *segs, *dkv_tables)
  if G > 1:  # sum the per-query-head gradients of each K/V head
    dk = dk.reshape(B, Sp, K, G, H).sum(axis=3).astype(k.dtype)
    dv = dv.reshape(B, Sp, K, G, H).sum(axis=3).astype(v.dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_seg, kv_seg, offs, fwd_tables, dq_tables, dkv_tables):
  return _forward(cfg, q, k, v, q_seg, kv_seg, offs, fwd_tables)


def _flash_fwd(cfg, q, k, v, q_seg, kv_seg, offs, fwd_tables, dq_tables,
               dkv_tables):
  out, lse = _forward(cfg, q, k, v, q_seg, kv_seg, offs, fwd_tables)
  res = (q, k, v, q_seg, kv_seg, offs, dq_tables, dkv_tables, out, lse)
  return (out, lse), res


def _flash_bwd(cfg, res, cotangents):
  q, k, v, q_seg, kv_seg, offs, dq_tables, dkv_tables, out, lse = res
  d_out, d_lse = cotangents
  dq, dk, dv = _backward(cfg, q, k, v, q_seg, kv_seg, offs, dq_tables,
                         dkv_tables, out, lse, d_out, d_lse)
  return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------- public


def _pad_to(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _fit_block(block: int, length: int) -> int:
  """Shrinks a block to the smallest power of two >= 16 covering ``length``."""
  return max(16, min(block, _next_pow2(length)))


def _prepare(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern, *, q_segment_ids,
             kv_segment_ids, q_offset, kv_offset, scale, softcap, block_sizes,
             interpret):
  """Checks a call and returns ``(cfg, padded q/k/v/segments/offsets, tables)``
  shared by the forward and :func:`flash_attention_backward`."""
  B, T, N, H = q_BxTxNxH.shape
  _, S, K, _ = k_BxSxKxH.shape
  reason = supports(q_BxTxNxH.shape, k_BxSxKxH.shape, q_BxTxNxH.dtype, pattern,
                    q_segment_ids is not None, softcap)
  if reason:
    raise ValueError(f"pallas flash attention cannot run this call: {reason}")
  if k_BxSxKxH.dtype != q_BxTxNxH.dtype or v_BxSxKxH.dtype != q_BxTxNxH.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q_BxTxNxH.dtype}, "
                     f"{k_BxSxKxH.dtype}, {v_BxSxKxH.dtype}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if softcap is not None and softcap <= 0:
    raise ValueError(f"softcap={softcap} must be positive (or None)")
  platform = jax.default_backend()
  if interpret is None:
    interpret = platform == "cpu"
  blocks = block_sizes or BlockSizes.default(H, "cpu" if interpret else platform)
  blocks = dataclasses.replace(
      blocks,
      block_q=_fit_block(blocks.block_q, T), block_k=_fit_block(blocks.block_k, S),
      block_q_dq=_fit_block(blocks.block_q_dq, T),
      block_k_dq=_fit_block(blocks.block_k_dq, S),
      block_q_dkv=_fit_block(blocks.block_q_dkv, T),
      block_k_dkv=_fit_block(blocks.block_k_dkv, S))
  for name in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv",
               "block_k_dkv"):
    b = getattr(blocks, name)
    if b & (b - 1):
      raise ValueError(f"BlockSizes.{name}={b} must be a power of two")
  pad_q = max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv)
  pad_k = max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv)
  Tp, Sp = -(-T // pad_q) * pad_q, -(-S // pad_k) * pad_k
  Hp = max(16, _next_pow2(H))
  scale = H ** -0.5 if scale is None else float(scale)

  q_seg = kv_seg = None
  if q_segment_ids is not None:
    q_seg = _pad_to(q_segment_ids.astype(jnp.int32), 1, Tp)
    kv_seg = _pad_to(kv_segment_ids.astype(jnp.int32), 1, Sp)
  tables, partial = [], []
  for bq, bk in ((blocks.block_q, blocks.block_k),
                 (blocks.block_q_dq, blocks.block_k_dq),
                 (blocks.block_q_dkv, blocks.block_k_dkv)):
    fwd_t, bwd_t, any_partial = _direction_tables(
        pattern, T, S, bq, bk, q_offset, kv_offset, N, q_segment_ids,
        kv_segment_ids, Tp // bq, Sp // bk)
    tables.append((fwd_t, bwd_t))
    partial.append(any_partial)
  if not pattern.in_kernel_mask and any(partial):
    raise ValueError(
        f"{type(pattern).__name__} is a table lookup: the kernel blocks must "
        "tile its blocks exactly (pass BlockSizes whose blocks divide the "
        "pattern's blocks and lengths that are multiples of them)")
  cfg = _Config(pattern=pattern, scale=scale, softcap=softcap, q_len=T,
                kv_len=S, num_heads=N, num_kv_heads=K,
                has_segments=q_segment_ids is not None, blocks=blocks,
                interpret=bool(interpret), has_partial=tuple(partial))
  offs = jnp.stack([jnp.asarray(q_offset, jnp.int32),
                    jnp.asarray(kv_offset, jnp.int32)])
  q = _pad_to(_pad_to(q_BxTxNxH, 1, Tp), 3, Hp)
  k = _pad_to(_pad_to(k_BxSxKxH, 1, Sp), 3, Hp)
  v = _pad_to(_pad_to(v_BxSxKxH, 1, Sp), 3, Hp)
  return cfg, (q, k, v, q_seg, kv_seg, offs), tables


def flash_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    pattern: Pattern,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
):
  """Block-sparse flash attention; same semantics as ``attend``.

  Lengths that are not block multiples and head dims that are not powers of
  two are zero-padded internally. ``interpret`` defaults to True on CPU.
  """
  _, T, _, H = q_BxTxNxH.shape
  cfg, padded, tables = _prepare(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_offset=kv_offset,
      scale=scale, softcap=softcap, block_sizes=block_sizes, interpret=interpret)
  out, lse = _flash(cfg, *padded, tables[0][0], tables[1][0], tables[2][1])
  out = out[:, :T, :, :H]
  lse = lse[:, :, :T]
  return (out, lse) if return_lse else out


def flash_attention_backward(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    pattern: Pattern,
    out_BxTxNxH: jax.Array,
    lse_BxNxT: jax.Array,
    d_out_BxTxNxH: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(dq, dk, dv)`` from the backward kernels alone, given the rows' final
  ``out``/``lse`` (see ``lcjax.attention.attend_backward``): no forward pass."""
  _, T, _, H = q_BxTxNxH.shape
  S = k_BxSxKxH.shape[1]
  cfg, (q, k, v, q_seg, kv_seg, offs), tables = _prepare(
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_offset=kv_offset,
      scale=scale, softcap=softcap, block_sizes=block_sizes, interpret=interpret)
  Tp, Hp = q.shape[1], q.shape[3]
  pad = lambda x: _pad_to(_pad_to(x.astype(q.dtype), 1, Tp), 3, Hp)
  lse = jnp.pad(lse_BxNxT.astype(jnp.float32), ((0, 0), (0, 0), (0, Tp - T)),
                constant_values=-jnp.inf)
  dq, dk, dv = _backward(cfg, q, k, v, q_seg, kv_seg, offs, tables[1][0],
                         tables[2][1], pad(out_BxTxNxH), lse, pad(d_out_BxTxNxH),
                         jnp.zeros(lse.shape, jnp.float32))
  return dq[:, :T, :, :H], dk[:, :S, :, :H], dv[:, :S, :, :H]
