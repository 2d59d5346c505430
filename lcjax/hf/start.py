"""Starting an experiment from a Hugging Face checkpoint (``model.init_from``).

:func:`resolve_config` takes the architecture from the checkpoint's
``config.json``; the trainer then loads the weights straight into the sharded
train state (:func:`init_state_from_checkpoint`) and tokenizes with the
checkpoint's ``tokenizer.json`` (:func:`tokenizer_for`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lcjax.config import Config, ConfigError, RopeConfig
from lcjax.data.tokenizer import ByteTokenizer, Tokenizer
from lcjax.hf.config_map import model_config_from_hf, read_config
from lcjax.hf.loader import load_params
from lcjax.hf.tokenizer import load_tokenizer
from lcjax.train.state import TrainState


def resolve_config(cfg: Config) -> Config:
  """``cfg`` with the model architecture of ``cfg.model.init_from``.

  From the checkpoint: every shape (vocab, widths, heads, layers), biases, tied
  embeddings, norm epsilon, and, unless the experiment sets them, RoPE and the
  attention schedule (e.g. Mistral's sliding windows). The experiment keeps
  its dtypes, remat policy and attention implementation, and may override:

  * ``model.rope`` (anything but the default ``RopeConfig()``), e.g. a larger
    base or YaRN for context extension;
  * ``model.attention.schedule`` (e.g. "middle_third:sink_window", sized to
    the checkpoint's depth) or ``model.attention.layer_kinds`` (one kind per
    checkpoint layer): the LongGen hybrid schedule on a dense checkpoint.

  Idempotent; returns ``cfg`` unchanged without ``init_from``.
  """
  folder = cfg.model.init_from
  if not folder:
    return cfg
  if cfg.checkpoint.init_params_from:
    raise ConfigError(f"model.init_from={folder!r} and checkpoint.init_params_from="
                      f"{cfg.checkpoint.init_params_from!r}: set only one")
  model = model_config_from_hf(read_config(folder), base=cfg.model)
  if cfg.model.rope != RopeConfig():
    model = dataclasses.replace(model, rope=cfg.model.rope)
  attention = cfg.model.attention
  if attention.layer_kinds and len(attention.layer_kinds) != model.num_layers:
    raise ConfigError(
        f"model.attention.layer_kinds has {len(attention.layer_kinds)} entries but "
        f"the checkpoint {folder!r} has {model.num_layers} layers: give one kind "
        "per layer, or a named model.attention.schedule")
  if attention.layer_kinds or attention.schedule:
    model = dataclasses.replace(model, attention=attention)
  return dataclasses.replace(cfg, model=model)


def tokenizer_for(cfg: Config) -> Tokenizer:
  """The checkpoint's tokenizer (``tokenizer.json``) if any, else bytes."""
  if cfg.model.init_from:
    tokenizer = load_tokenizer(cfg.model.init_from)
    if tokenizer is not None:
      return tokenizer
  return ByteTokenizer()


def init_state_from_checkpoint(cfg: Config, tx: optax.GradientTransformation,
                               shardings: TrainState, mesh) -> TrainState:
  """A fresh train state whose params are the checkpoint's, already sharded.

  Params the checkpoint lacks (adapters) are initialised from
  ``cfg.train.seed``; the optimizer state is initialised on device.
  """
  params = load_params(cfg.model.init_from, cfg.model, mesh, init_seed=cfg.train.seed)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state)
