"""cuDNN flash attention through ``jax.nn.dot_product_attention``.

cuDNN covers the dense corner of the pattern space: full, causal and a causal
left window (``local_window_size=(left, 0)``), with grouped-query attention,
bf16/fp16 inputs. It has no segment ids (a boolean mask becomes a dense bias,
which is slow), no logits soft-cap, no position offsets (its causal mask is
aligned at position 0 of q and k), and its log-sum-exp is returned in the
input dtype without a gradient. :func:`supports` names the gap for each call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.attention import block_mask
from lcjax.attention import patterns as P


def supports(q_shape, k_shape, dtype, pattern: P.Pattern, has_segments: bool,
             softcap, q_offset=0, kv_offset=0, return_lse: bool = False,
             platform: str | None = None) -> str | None:
  """None if cuDNN can run the call exactly, else the reason it cannot."""
  platform = platform or jax.default_backend()
  if platform != "gpu":
    return f"cuDNN needs an NVIDIA GPU (platform is {platform!r})"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN takes bfloat16/float16 only, not {jnp.dtype(dtype)}"
  if has_segments:
    return "cuDNN has no segment ids (packed documents)"
  if softcap is not None:
    return "cuDNN has no logits soft-cap"
  if return_lse:
    return ("cuDNN's log-sum-exp comes back in the input dtype and without a "
            "gradient; use implementation='pallas' for return_lse")
  if q_shape[-1] > 256 or q_shape[-1] % 8:
    return f"cuDNN needs head_dim a multiple of 8 and <= 256, not {q_shape[-1]}"
  if isinstance(pattern, P.Full):
    return None
  if not isinstance(pattern, (P.Causal, P.SlidingWindow)):
    return (f"cuDNN runs Full, Causal and SlidingWindow(left, right=0) only, "
            f"not {pattern!r}")
  if isinstance(pattern, P.SlidingWindow) and (pattern.left is None
                                               or pattern.right != 0):
    return (f"cuDNN's window is causal with a finite left size; {pattern!r} "
            "is not")
  sq, sk = block_mask.static_int(q_offset), block_mask.static_int(kv_offset)
  if sq is None or sk is None or sq != sk or q_shape[1] != k_shape[1]:
    return ("cuDNN's causal mask assumes q and k start at the same position "
            "with equal lengths; got q_offset/kv_offset "
            f"{q_offset}/{kv_offset} and lengths {q_shape[1]}/{k_shape[1]}")
  return None


def cudnn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, pattern: P.Pattern, *,
                    scale: float | None = None) -> jax.Array:
  """Runs a pattern :func:`supports` accepted."""
  kwargs = {}
  if isinstance(pattern, P.Causal):
    kwargs["is_causal"] = True
  elif isinstance(pattern, P.SlidingWindow):
    kwargs["is_causal"] = True
    kwargs["local_window_size"] = (pattern.left, 0)
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                                      scale=scale, implementation="cudnn",
                                      **kwargs)
