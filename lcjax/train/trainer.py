"""The training loop: mesh, data, model, sharded state, steps, eval, checkpoints.

``train(cfg, workdir)`` is what the launcher, the notebook and the tests call.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

from lcjax import config as config_lib
from lcjax.config import Config
from lcjax.data import tasks
from lcjax.data.pipeline import make_source
from lcjax.data.tokenizer import ByteTokenizer
from lcjax.eval.retrieval import retrieval_accuracy
from lcjax.model import Decoder, lora, param_count
from lcjax.parallel import context
from lcjax.sharding import make_mesh, maybe_initialize_distributed, put_global_batch
from lcjax.train import step as step_lib
from lcjax.train.checkpoint import Checkpointer, restore_params
from lcjax.train.flops import flops_per_token
from lcjax.train.metrics import MetricsWriter, peak_flops_per_device
from lcjax.train.optimizer import learning_rate_schedule, make_optimizer
from lcjax.train.state import abstract_state, init_state, state_shardings


@dataclasses.dataclass
class TrainResult:
  history: list[dict[str, Any]]
  final_eval: dict[str, Any]
  params: Any
  steps_run: int
  wall_seconds: float


def _host_batch(batch, grad_accum: int) -> dict[str, np.ndarray]:
  """Batch fields ``[B, T]`` -> ``[grad_accum, B // grad_accum, T]``."""
  out = {}
  for key in step_lib.BATCH_KEYS:
    value = np.asarray(getattr(batch, key))
    out[key] = value.reshape(grad_accum, value.shape[0] // grad_accum, *value.shape[1:])
  return out


class _StopFlag:
  """Set by SIGTERM so the loop can write a checkpoint before exiting."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def validate(cfg: Config, vocab_needed: int) -> None:
  t, d, m = cfg.train, cfg.data, cfg.model
  if t.grad_accum < 1 or d.batch_size % t.grad_accum:
    raise ValueError(f"data.batch_size={d.batch_size} must be a positive multiple "
                     f"of train.grad_accum={t.grad_accum}")
  if m.vocab_size < vocab_needed:
    raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary ({vocab_needed})")
  if m.num_heads % m.num_kv_heads:
    raise ValueError(f"model.num_heads={m.num_heads} must be a multiple of "
                     f"model.num_kv_heads={m.num_kv_heads}")


def evaluate(cfg: Config, model: Decoder, params, source, tokenizer, eval_step,
             mesh, with_retrieval: bool) -> dict[str, Any]:
  loss_sum, count = 0.0, 0.0
  for batch in source.eval_batches(cfg.eval.batches):
    arrays = {k: np.asarray(getattr(batch, k)) for k in step_lib.BATCH_KEYS}
    s, c = eval_step(params, put_global_batch(arrays, mesh))
    loss_sum, count = loss_sum + float(s), count + float(c)
  result: dict[str, Any] = {"eval_loss": loss_sum / max(count, 1.0)}
  if with_retrieval and cfg.eval.passkey_samples > 0:
    make_passkey = functools.partial(tasks.make_passkey, digits=cfg.data.answer_digits)
    accuracy = retrieval_accuracy(model, params, tokenizer, make_passkey,
                                  cfg.eval.passkey_lengths, cfg.eval.passkey_depths,
                                  cfg.eval.passkey_samples, seed=cfg.train.seed)
    result["passkey"] = {f"len{l}_depth{d}": a for (l, d), a in accuracy.items()}
    result["passkey_mean"] = float(np.mean(list(accuracy.values())))
  return result


def train(cfg: Config, workdir: str) -> TrainResult:
  """Trains ``cfg`` in ``workdir``, resuming from its latest checkpoint if any."""
  maybe_initialize_distributed()
  if cfg.model.init_from:  # a Hugging Face checkpoint (lcjax.hf)
    from lcjax.hf import start as hf_start
    cfg = hf_start.resolve_config(cfg)
    tokenizer = hf_start.tokenizer_for(cfg)
  else:
    tokenizer = ByteTokenizer()
  validate(cfg, tokenizer.vocab_size)
  mesh = make_mesh(cfg.mesh)
  model = Decoder(cfg.model)
  tx = lora.freeze(make_optimizer(cfg.train), cfg.model)  # LoRA: adapters etc. only
  seq_len, grad_accum = cfg.data.seq_len, cfg.train.grad_accum
  micro_shape = (grad_accum, cfg.data.batch_size // grad_accum, seq_len)
  writer = MetricsWriter(workdir, cfg.train.steps)
  writer.print(f"experiment {cfg.name}\n{config_lib.to_text(cfg)}\n"
               f"mesh {dict(mesh.shape)} on {jax.device_count()} "
               f"{jax.devices()[0].device_kind} device(s)")
  partitioner_note = context.avoid_shardy_crash(mesh)
  if partitioner_note:
    writer.print(partitioner_note)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_lib.flatten(cfg), f, indent=1, default=list)

  with jax.set_mesh(mesh):
    source = make_source(cfg.data, tokenizer)
    writer.print(source.describe())
    shardings = state_shardings(model, tx, mesh, seq_len)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
    latest = checkpointer.latest_step() if cfg.checkpoint.resume else None
    if latest is not None:
      state, _ = checkpointer.restore(latest, abstract_state(model, tx, shardings, seq_len))
      writer.print(f"resumed from step {latest}")
    elif cfg.model.init_from:
      state = hf_start.init_state_from_checkpoint(cfg, tx, shardings, mesh)
      writer.print(f"params from Hugging Face checkpoint {cfg.model.init_from}")
    else:
      state = init_state(model, tx, cfg.train.seed, shardings, seq_len)
      if cfg.checkpoint.init_params_from:
        state = state.replace(params=restore_params(
            cfg.checkpoint.init_params_from, state.params, cfg.model))
        writer.print(f"params from {cfg.checkpoint.init_params_from}")
    writer.print(f"parameters: {param_count(state.params):,}")
    train_step = step_lib.jit_train_step(model, tx, mesh, shardings, micro_shape)
    eval_step = step_lib.jit_eval_step(model, mesh, shardings.params,
                                       (cfg.data.batch_size, seq_len))
    lr_at = learning_rate_schedule(cfg.train)
    flops_per_step = flops_per_token(cfg.model, seq_len) * cfg.data.batch_size * seq_len
    peak = peak_flops_per_device()
    stop = _StopFlag()
    start_step = int(state.step)
    step, t_start, t_last, last_step = start_step, time.time(), time.time(), start_step
    try:
      while step < cfg.train.steps and not stop.requested:
        batch = put_global_batch(_host_batch(source.batch(step), grad_accum), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
          metrics = jax.device_get(metrics)
          now = time.time()
          steps_per_s = (step - last_step) / (now - t_last)
          metrics["learning_rate"] = float(lr_at(step - 1))
          metrics["tokens_per_s"] = steps_per_s * cfg.data.batch_size * seq_len
          if peak:
            metrics["mfu"] = steps_per_s * flops_per_step / (peak * jax.device_count())
          writer.write(step, metrics)
          writer.progress(step, {"loss": f"{metrics['loss']:.3f}",
                                 "tok/s": f"{metrics['tokens_per_s']:,.0f}",
                                 "mfu": f"{metrics['mfu']:.1%}" if peak else "n/a"})
          t_last, last_step = now, step
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
          result = evaluate(cfg, model, state.params, source, tokenizer, eval_step,
                            mesh, with_retrieval=False)
          writer.write(step, result, prefix="eval")
        checkpointer.save(step, state, {"step": step, "experiment": cfg.name})
      if stop.requested:
        writer.print(f"SIGTERM: saving a checkpoint at step {step} and stopping")
      if checkpointer.latest_step() != step:
        checkpointer.save(step, state, {"step": step, "experiment": cfg.name}, force=True)
      checkpointer.wait()
      final = {}
      if not stop.requested:
        final = evaluate(cfg, model, state.params, source, tokenizer, eval_step, mesh,
                         with_retrieval=True)
        writer.write(step, {k: v for k, v in final.items() if not isinstance(v, dict)},
                     prefix="eval")
        writer.print("final eval: " + json.dumps(final))
    finally:
      stop.restore()
      checkpointer.close()
      writer.close()
  wall = time.time() - t_start
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      losses = [r["train/loss"] for r in writer.history if "train/loss" in r]
      json.dump({"steps": step, "wall_seconds": wall, "first_loss": losses[:1],
                 "last_loss": losses[-1:], **final}, f, indent=1)
  return TrainResult(writer.history, final, state.params, step - start_step, wall)
