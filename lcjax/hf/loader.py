"""Load a Hugging Face safetensors checkpoint into lcjax params, on the mesh.

Streaming: every parameter is assembled shard by shard from its
``NamedSharding``. For each distinct device shard the loader reads only that
box of each layer's tensor from the memory-mapped file, converts it to the
target dtype, and sends it to its device(s) before reading the next one. Host
memory peaks at one device shard of one (layer-stacked) parameter; the whole
model is never in host memory, let alone twice. Each process reads only the
shards of its own devices, so this works on several hosts.

Per-layer tensors ``model.layers.{i}.*`` are stacked on the leading layers axis
of the scan group the layer falls in, whatever the schedule: loading a dense
checkpoint into a hybrid LongGen schedule (Ge et al., 2024, "A Little Goes a
Long Way") is just loading with that schedule.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lcjax.config import MeshConfig, ModelConfig
from lcjax.hf import layout
from lcjax.hf.config_map import model_config_from_hf, read_config
from lcjax.hf.safetensors_io import CheckpointReader
from lcjax.model import Decoder, schedule
from lcjax.model.dtypes import dtype_of
from lcjax.sharding import make_mesh, named_sharding

Path = tuple[str, ...]
# The fields that decide parameter shapes: a checkpoint fits a config only if
# they agree. (RoPE, attention kinds and dtypes may differ: that is fine-tuning.)
SHAPE_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "mlp_dim", "tie_embeddings", "qkv_bias")


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors or config do not fit the model config."""


def check_config_matches(folder: str, cfg: ModelConfig) -> None:
  """Raises if ``cfg``'s shape-deciding fields differ from the checkpoint's."""
  ckpt = model_config_from_hf(read_config(folder), base=cfg)
  diffs = [f"{f}: config {getattr(cfg, f)!r} vs checkpoint {getattr(ckpt, f)!r}"
           for f in SHAPE_FIELDS if getattr(cfg, f) != getattr(ckpt, f)]
  if diffs:
    raise CheckpointMismatchError(
        f"model config does not fit the checkpoint {folder!r}: " + "; ".join(diffs)
        + " (lcjax.hf.resolve_config takes the architecture from the checkpoint)")


def abstract_params(cfg: ModelConfig) -> Any:
  """Boxed ``ShapeDtypeStruct`` params of ``Decoder(cfg)`` (names and shapes)."""
  model = Decoder(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def param_layout(cfg: ModelConfig, mesh: Mesh
                 ) -> dict[Path, tuple[tuple[int, ...], NamedSharding]]:
  """``{path: (shape, NamedSharding)}`` of every param, from its logical axes."""
  boxed = abstract_params(cfg)
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=_is_box)[0]
  return {_path(kp): (box.value.shape, named_sharding(mesh, box.names, box.value.shape))
          for kp, box in flat}


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[Path, NamedSharding]:
  """``{path: NamedSharding}`` of every param, from its logical axis names."""
  return {path: sharding for path, (_, sharding) in param_layout(cfg, mesh).items()}


def _path(keypath) -> Path:
  return tuple(k.key for k in keypath)


def layer_sources(cfg: ModelConfig) -> dict[Path, tuple[layout.TensorRule, int]]:
  """``{our param path: (rule, first layer)}``; per-layer rules under each group."""
  out = {}
  starts = []
  start = 0
  for _, count in schedule.layer_groups(cfg):
    starts.append(start)
    start += count
  for rule in layout.tensor_rules(cfg):
    if rule.per_layer:
      for g, first in enumerate(starts):
        out[(f"group_{g}",) + rule.path] = (rule, first)
    else:
      out[rule.path] = (rule, 0)
  return out


def _check_tensors(reader: CheckpointReader, cfg: ModelConfig,
                   sources: dict[Path, tuple[layout.TensorRule, int]]) -> None:
  expected = {}
  for rule in {r for r, _ in sources.values()}:
    names = ([rule.hf_name.format(i=i) for i in range(cfg.num_layers)]
             if rule.per_layer else [rule.hf_name])
    expected.update({n: rule.hf_shape for n in names})
  present = set(reader.names())
  missing = sorted(set(expected) - present)
  if missing:
    raise CheckpointMismatchError(
        f"checkpoint {reader.folder!r} lacks {len(missing)} tensor(s) the model "
        f"needs, e.g. {missing[:5]}")
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  extra = sorted(n for n in present - set(expected)
                 if n not in ignorable and not layout.is_ignorable(n))
  if extra:
    raise CheckpointMismatchError(
        f"checkpoint {reader.folder!r} has {len(extra)} tensor(s) lcjax has no "
        f"parameter for, e.g. {extra[:5]}; loading without them would be wrong")
  bad = [f"{n}: {reader.shape(n)} != expected {s}" for n, s in sorted(expected.items())
         if reader.shape(n) != s]
  if bad:
    raise CheckpointMismatchError(f"tensor shapes differ from the config: {bad[:5]}")


def assemble(shape: tuple[int, ...], sharding: jax.sharding.Sharding, dtype,
             read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
  """A global array from ``read(index)`` of each distinct addressable shard.

  Replicas of a shard are read once; each shard goes to its devices before the
  next one is read.
  """
  devices_of: dict[tuple, tuple[tuple[slice, ...], list]] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    devices_of.setdefault(key, (index, []))[1].append(device)
  arrays = []
  for index, devices in devices_of.values():
    host = read(index)
    if host.dtype != dtype:
      host = host.astype(dtype)
    arrays.extend(jax.device_put(host, d) for d in devices)
    del host
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _reader_for(reader: CheckpointReader, rule: layout.TensorRule, first: int,
                shape: tuple[int, ...], dtype) -> Callable:
  """``read(index)`` of our (maybe layer-stacked) array, layer by layer."""
  if not rule.per_layer:
    return lambda index: rule.read_slice(reader.slice_reader(rule.hf_name), index)

  def read(index):
    layers = range(*index[0].indices(shape[0]))
    inner = index[1:]
    out = None
    for j, layer in enumerate(layers):
      name = rule.hf_name.format(i=first + layer)
      part = rule.read_slice(reader.slice_reader(name), inner)
      if out is None:
        out = np.empty((len(layers),) + part.shape, dtype)
      out[j] = part
    return out
  return read


def load_params(folder: str, cfg: ModelConfig, mesh: Mesh | None = None, *,
                dtype: str | None = None, init_seed: int | None = None) -> dict:
  """Params of ``Decoder(cfg)`` from an HF safetensors checkpoint folder.

  Args:
    folder: holds ``config.json`` and ``model.safetensors`` or a sharded set
      with ``model.safetensors.index.json``.
    cfg: the model config; its shape-deciding fields must match the checkpoint
      (see :func:`lcjax.hf.resolve_config`). Its attention schedule decides how
      layers are grouped.
    mesh: where the params go, each with the ``NamedSharding`` of its logical
      axes; ``None``: the first device.
    dtype: of the loaded params (default ``cfg.param_dtype``), converted from
      the file's dtype slice by slice.
    init_seed: params the checkpoint does not have (e.g. adapters added by
      lcjax) are initialised with the model's initialisers from this seed;
      ``None`` makes them an error.
  """
  check_config_matches(folder, cfg)
  if mesh is None:
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  target = np.dtype(dtype_of(dtype or cfg.param_dtype))
  params_layout = param_layout(cfg, mesh)
  shapes = {path: shape for path, (shape, _) in params_layout.items()}
  shardings = {path: sharding for path, (_, sharding) in params_layout.items()}
  sources = layer_sources(cfg)
  unknown = sorted(set(sources) - set(shapes))
  if unknown:
    raise RuntimeError(f"layout rules name params the model lacks: {unknown}")
  flat: dict[Path, jax.Array] = {}
  with CheckpointReader(folder) as reader:
    _check_tensors(reader, cfg, sources)
    for path, (rule, first) in sources.items():
      shape = shapes[path]
      read = _reader_for(reader, rule, first, shape, target)
      flat[path] = assemble(shape, shardings[path], target, read)
  missing = sorted(set(shapes) - set(flat))
  if missing:
    if init_seed is None:
      raise CheckpointMismatchError(
          f"the checkpoint has no values for params {['/'.join(p) for p in missing]}; "
          "pass init_seed to initialise them")
    flat.update(_init_params(cfg, missing, shardings, init_seed, target))
  return _unflatten(flat)


def _init_params(cfg: ModelConfig, paths: list[Path], shardings, seed: int,
                 dtype) -> dict[Path, jax.Array]:
  """Fresh values of only ``paths`` (XLA drops the other initialisers)."""
  model = Decoder(dataclasses.replace(cfg, param_dtype=np.dtype(dtype).name))

  def init():
    params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))
    params = params["params"]
    out = {}
    for p in paths:
      x = params
      for k in p:
        x = x[k]
      out["/".join(p)] = x
    return out
  out = jax.jit(init, out_shardings={"/".join(p): shardings[p] for p in paths})()
  return {p: out["/".join(p)] for p in paths}


def _unflatten(flat: dict[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree
