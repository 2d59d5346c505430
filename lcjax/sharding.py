"""Device mesh, logical axis rules, and sharding helpers.

Every parameter and activation is annotated with *logical* axis names
("batch", "embed", "heads", ...). One table, :data:`LOGICAL_RULES`, maps them to
the four mesh axes. Changing how a model is parallelised means changing this
table or the mesh sizes in the config, never the model code.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lcjax.config import MeshConfig

# Outermost to innermost: "tensor" last so it lands on the fastest links.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical axis -> mesh axes, in order of preference. A mesh axis is used at most
# once per array (first come, first served along the array's dimensions), and a
# dimension is only sharded if its size divides evenly.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("sequence", ("sequence",)),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),
)
_RULES = dict(LOGICAL_RULES)


def maybe_initialize_distributed() -> None:
  """Starts multi-process JAX when launched as one process per host.

  Set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every host; or run under
  SLURM / Open MPI, which JAX detects itself. Single-process runs skip this.
  """
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize(
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(
      os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Resolves ``-1`` and checks that the sizes fit ``num_devices``."""
  sizes = {name: getattr(cfg, name) for name in MESH_AXES}
  bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
  if bad:
    raise ValueError(f"mesh sizes must be positive or -1, got {bad}")
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible "
                       f"by the fixed axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) > num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"but only {num_devices} are available")
  return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all). A single process may ask for fewer
  devices than it has; it then uses the first ones and says so."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(cfg, len(devices))
  needed = math.prod(sizes.values())
  if needed < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"mesh {sizes} uses {needed} of {len(devices)} devices; "
                       "a multi-process run must use them all")
    print(f"mesh {sizes} uses {needed} of the {len(devices)} devices")
    devices = devices[:needed]
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None,
                    mesh: Mesh | jax.sharding.AbstractMesh) -> PartitionSpec:
  """Maps logical axis names to a ``PartitionSpec`` under :data:`LOGICAL_RULES`."""
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    if name is not None and name not in _RULES:
      raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(_RULES)}")
    axes = [a for a in (_RULES[name] if name else ())
            if a not in used and mesh.shape.get(a, 1) > 1]
    if shape is not None:  # shard only over axes whose product divides the dim
      while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None],
                   shape: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation, by logical names; no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def put_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch (identical on every process) on the mesh.

  Arrays are ``[batch, sequence]`` or ``[micro, batch, sequence]``; each process
  copies only the slices its own devices hold, so this works across hosts.
  """
  out = {}
  for key, value in batch.items():
    names = ("batch", "sequence") if value.ndim == 2 else (None, "batch", "sequence")
    sharding = named_sharding(mesh, names, value.shape)
    out[key] = jax.make_array_from_callback(value.shape, sharding,
                                            lambda idx, v=value: v[idx])
  return out
