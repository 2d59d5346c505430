"""Serving: chunked prefill, compiled decoding, KV caches per attention kind.

``Engine`` (``lcjax.inference.engine``) is imported lazily: the model's attention
layer imports ``lcjax.inference.kv_cache``, and the engine imports the model.
"""
from __future__ import annotations

from lcjax.inference.sampling import Sampling

__all__ = ["Engine", "DecodeState", "Sampling"]


def __getattr__(name):
  if name in ("Engine", "DecodeState"):
    from lcjax.inference import engine
    return getattr(engine, name)
  raise AttributeError(f"module 'lcjax.inference' has no attribute {name!r}")
