"""``attend``: the one attention call used by every model layer, and its dispatch.

Implementations:

* ``"reference"``: dense jnp (materialises logits; the specification).
* ``"chunked"``: memory-efficient jnp (online softmax over chunks).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` for
  the patterns cuDNN runs exactly (full, causal, causal left window).
* ``"pallas"``: our block-sparse kernels. On a Hopper GPU the Mosaic GPU
  kernel (``pallas_kernels.mosaic_attention``) when it supports the call, else
  the portable Triton-lowered kernel; on CPU the portable kernel in interpret
  mode.
* ``"auto"``: on GPU cuDNN where it runs the pattern, our kernels for the rest;
  on CPU the dense reference for short sequences and the chunked one for long.

A forced implementation that cannot run the call raises a ValueError saying why.
"""
from __future__ import annotations

import jax

from lcjax.attention import cudnn, reference
from lcjax.attention.patterns import Pattern

IMPLEMENTATIONS = ("auto", "reference", "chunked", "cudnn", "pallas")

# Above this many logits (batch * heads * q_len * kv_len) "auto" on CPU uses
# the chunked reference: 2**26 float32 logits are 256 MiB.
DENSE_LOGITS_LIMIT = 1 << 26


def attend(
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
    implementation: str = "auto",
    block_sizes=None,
):
  """Attention of ``q`` over ``k``/``v`` restricted by ``pattern``.

  Shapes: q ``[batch, q_len, num_heads, head_dim]``, k/v
  ``[batch, kv_len, num_kv_heads, head_dim]`` with ``num_heads`` a multiple of
  ``num_kv_heads`` (grouped-query attention). ``q_offset``/``kv_offset`` are the
  absolute positions of the first query/key (chunked prefill, ring attention;
  ints or traced int scalars). Segment ids (packed documents) restrict
  attention to equal ids. ``softcap`` applies ``c * tanh(logits / c)``.
  Returns ``out`` (and ``lse [batch, num_heads, q_len]`` in float32 if asked;
  rows that see no key give zeros and ``lse = -inf``). ``block_sizes``
  (``pallas_kernels.flash_attention.BlockSizes``) tunes the portable kernel.
  """
  _check_inputs(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern, q_segment_ids,
                kv_segment_ids, softcap)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"choose one of {IMPLEMENTATIONS}")
  args = (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern)
  kwargs = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                q_offset=q_offset, kv_offset=kv_offset, scale=scale,
                softcap=softcap)
  if implementation == "auto":
    implementation = choose_implementation(*args, **kwargs,
                                           return_lse=return_lse)
  if implementation in ("reference", "chunked"):
    fn = (reference.dense_attention if implementation == "reference"
          else reference.chunked_attention)
    out, lse = fn(*args, q_segment_ids_BxT=q_segment_ids,
                  kv_segment_ids_BxS=kv_segment_ids, q_offset=q_offset,
                  kv_offset=kv_offset, scale=scale, softcap=softcap)
    return (out, lse) if return_lse else out
  if implementation == "cudnn":
    reason = _cudnn_reason(*args, **kwargs, return_lse=return_lse)
    if reason:
      raise ValueError(f"implementation='cudnn' cannot run this call: {reason}")
    return cudnn.cudnn_attention(*args, scale=scale)
  return _pallas(*args, **kwargs, return_lse=return_lse, block_sizes=block_sizes)


BACKWARD_IMPLEMENTATIONS = ("auto", "reference", "pallas")


def attend_backward(
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
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(dq, dk, dv)`` of attention over these keys, from the rows' ``out`` and
  ``lse`` and the cotangent ``d_out``, without a forward pass.

  The FlashAttention backward (``reference.dense_attention_backward``). When
  ``out``/``lse`` are the *final* result of rows whose attention also spans
  other keys (ring attention merging per-shard results), this is exactly the
  gradient share through these keys; ring attention uses it instead of
  recomputing each pair's forward under ``jax.vjp``. Implementations:
  "reference" (dense jnp), "pallas" (the backward kernels: Mosaic GPU on
  Hopper, else the portable kernel), "auto" (the kernels on GPU where they run
  the call, else the reference). Returns float32 for "reference", the input
  dtype for "pallas".
  """
  _check_inputs(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern, q_segment_ids,
                kv_segment_ids, softcap)
  if implementation not in BACKWARD_IMPLEMENTATIONS:
    raise ValueError(f"attend_backward has no implementation {implementation!r}; "
                     f"choose one of {BACKWARD_IMPLEMENTATIONS} (cuDNN and the "
                     "chunked reference have no backward entry: use jax.vjp of "
                     "attend)")
  if out_BxTxNxH.shape != q_BxTxNxH.shape or d_out_BxTxNxH.shape != q_BxTxNxH.shape:
    raise ValueError(f"out{out_BxTxNxH.shape} and d_out{d_out_BxTxNxH.shape} must "
                     f"have q's shape {q_BxTxNxH.shape}")
  B, T, N, _ = q_BxTxNxH.shape
  if lse_BxNxT.shape != (B, N, T):
    raise ValueError(f"lse{lse_BxNxT.shape} must be [batch, heads, q_len] = "
                     f"{(B, N, T)}")
  kwargs = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                q_offset=q_offset, kv_offset=kv_offset, scale=scale, softcap=softcap)
  args = (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern, out_BxTxNxH, lse_BxNxT,
          d_out_BxTxNxH)
  if implementation == "auto":  # the kernels where attend(return_lse=True) runs them
    forward = choose_implementation(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern,
                                    **kwargs, return_lse=True)
    implementation = "pallas" if forward == "pallas" else "reference"
  if implementation == "reference":
    return reference.dense_attention_backward(
        *args, q_segment_ids_BxT=q_segment_ids, kv_segment_ids_BxS=kv_segment_ids,
        q_offset=q_offset, kv_offset=kv_offset, scale=scale, softcap=softcap)
  has_seg = q_segment_ids is not None
  if mosaic_reason(q_BxTxNxH, k_BxSxKxH, pattern, has_seg, softcap) is None:
    return _mosaic_module().mosaic_attention_backward(*args, **kwargs)
  from pallas_kernels import flash_attention as fa  # pylint: disable=import-outside-toplevel
  reason = fa.supports(q_BxTxNxH.shape, k_BxSxKxH.shape, q_BxTxNxH.dtype, pattern,
                       has_seg, softcap)
  if reason:
    raise ValueError(f"attend_backward(implementation='pallas') cannot run this "
                     f"call: {reason}")
  return fa.flash_attention_backward(*args, **kwargs)


def _cudnn_reason(q, k, v, pattern, *, q_segment_ids, kv_segment_ids, q_offset,
                  kv_offset, scale, softcap, return_lse):
  del v, kv_segment_ids, scale
  return cudnn.supports(q.shape, k.shape, q.dtype, pattern,
                        q_segment_ids is not None, softcap, q_offset, kv_offset,
                        return_lse)


def _on_hopper() -> bool:
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(
      getattr(dev, "compute_capability", "")).startswith("9")


def _mosaic_module():
  """The colleague's Mosaic GPU kernel module, or None if it is absent."""
  try:
    from pallas_kernels import mosaic_attention  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return mosaic_attention


def mosaic_reason(q, k, pattern, has_segments: bool, softcap) -> str | None:
  """None if the Mosaic GPU fast path takes this call, else why not."""
  if not _on_hopper():
    return "the Mosaic GPU kernel needs a Hopper GPU"
  module = _mosaic_module()
  if module is None:
    return "pallas_kernels.mosaic_attention is not importable"
  return module.supports(q_shape=q.shape, k_shape=k.shape, dtype=q.dtype,
                         pattern=pattern, has_segments=has_segments,
                         softcap=softcap)


def _pallas(q, k, v, pattern, *, q_segment_ids, kv_segment_ids, q_offset,
            kv_offset, scale, softcap, return_lse, block_sizes):
  from pallas_kernels import flash_attention as fa  # pylint: disable=import-outside-toplevel
  has_seg = q_segment_ids is not None
  kwargs = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                q_offset=q_offset, kv_offset=kv_offset, scale=scale,
                softcap=softcap, return_lse=return_lse)
  if block_sizes is None and mosaic_reason(q, k, pattern, has_seg, softcap) is None:
    return _mosaic_module().mosaic_attention(q, k, v, pattern, **kwargs)
  reason = fa.supports(q.shape, k.shape, q.dtype, pattern, has_seg, softcap)
  if reason:
    raise ValueError(f"implementation='pallas' cannot run this call: {reason}")
  return fa.flash_attention(q, k, v, pattern, **kwargs, block_sizes=block_sizes)


def choose_implementation(q, k, v, pattern, *, q_segment_ids=None,
                          kv_segment_ids=None, q_offset=0, kv_offset=0,
                          scale=None, softcap=None, return_lse=False) -> str:
  """What ``implementation="auto"`` runs for this call (see module docstring)."""
  del scale
  platform = jax.default_backend()
  if platform == "gpu":
    if not _cudnn_reason(q, k, v, pattern, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, q_offset=q_offset,
                         kv_offset=kv_offset, scale=None, softcap=softcap,
                         return_lse=return_lse):
      return "cudnn"
    from pallas_kernels import flash_attention as fa  # pylint: disable=import-outside-toplevel
    if not fa.supports(q.shape, k.shape, q.dtype, pattern,
                       q_segment_ids is not None, softcap):
      return "pallas"
  B, T, N, _ = q.shape
  if B * N * T * k.shape[1] > DENSE_LOGITS_LIMIT:
    return "chunked"
  return "reference"


def _check_inputs(q, k, v, pattern, q_seg, kv_seg, softcap):
  if not isinstance(pattern, Pattern):
    raise TypeError(f"pattern must be an lcjax.attention Pattern, got {pattern!r}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError("q, k, v must be [batch, length, heads, head_dim]; got "
                     f"q{q.shape} k{k.shape} v{v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k{k.shape} and v{v.shape} must have the same shape")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"batch and head_dim of q{q.shape} and k{k.shape} differ")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"num_heads={q.shape[2]} is not a multiple of "
                     f"num_kv_heads={k.shape[2]}")
  if (q_seg is None) != (kv_seg is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
  if q_seg is not None and q_seg.shape != q.shape[:2]:
    raise ValueError(f"q_segment_ids{q_seg.shape} must be {q.shape[:2]}")
  if kv_seg is not None and kv_seg.shape != k.shape[:2]:
    raise ValueError(f"kv_segment_ids{kv_seg.shape} must be {k.shape[:2]}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap={softcap!r} must be a positive float or None")
  required = pattern.required_num_heads
  if required is not None and required != q.shape[2]:
    raise ValueError(f"{pattern!r} is written for {required} query heads but q "
                     f"has num_heads={q.shape[2]}")
