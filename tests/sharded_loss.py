"""Loss and gradients of a model on a mesh with the trainer's shardings, for
tests that compare a sharded run with an unsharded one."""
import jax

from lcjax.config import ModelConfig, TrainConfig
from lcjax.model import Decoder
from lcjax.sharding import put_global_batch
from lcjax.train import step as step_lib
from lcjax.train.loss import mean_loss
from lcjax.train.optimizer import make_optimizer
from lcjax.train.state import state_shardings


def loss_and_grads(cfg: ModelConfig, mesh, params_host, batch_host):
  """``(loss, grads on the host, params on the mesh)`` of ``mean_loss`` on a
  ``[B, T]`` host batch, jitted with the train step's in/out shardings."""
  B, T = batch_host["tokens"].shape
  model, tx = Decoder(cfg), make_optimizer(TrainConfig())
  with jax.set_mesh(mesh):
    shardings = state_shardings(model, tx, mesh, T)
    params = jax.device_put(params_host, shardings.params)
    batch = put_global_batch(batch_host, mesh)
    fn = jax.jit(jax.value_and_grad(lambda p, b: mean_loss(model, p, b)),
                 in_shardings=(shardings.params, step_lib.batch_shardings(mesh, (B, T))),
                 out_shardings=(None, shardings.params))
    loss, grads = fn(params, batch)
    return float(loss), jax.device_get(grads), params
