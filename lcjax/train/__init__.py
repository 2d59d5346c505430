"""Training: optimizer, loss, sharded train step, checkpoints, metrics, loop."""
