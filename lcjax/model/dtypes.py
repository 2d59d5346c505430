"""Names of the floating-point types a config may ask for."""
from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
  return jnp.dtype(DTYPES[name])
