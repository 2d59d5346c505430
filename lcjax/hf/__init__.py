"""Hugging Face checkpoints in and out: Llama, Qwen2 and Mistral families.

* :func:`model_config_from_hf` / :func:`hf_config_from_model`: ``config.json``
  <-> :class:`lcjax.config.ModelConfig` (clear errors for unsupported fields).
* :func:`load_params`: safetensors (single or sharded) -> params on the mesh,
  streamed shard by shard in the dtype you ask for.
* :func:`save_pretrained`: params -> a folder transformers loads.
* :class:`HFTokenizer`: ``tokenizer.json`` behind the data ``Tokenizer`` protocol.
* :func:`resolve_config`: the architecture of ``model.init_from`` for an
  experiment (the launcher's ``--init-from``).

See ``docs/huggingface.md``.
"""
from lcjax.hf.config_map import (UnsupportedCheckpointError, hf_config_from_model,
                                 model_config_from_hf, read_config)
from lcjax.hf.exporter import save_pretrained
from lcjax.hf.loader import CheckpointMismatchError, load_params
from lcjax.hf.rope_map import UnsupportedRopeError
from lcjax.hf.start import resolve_config
from lcjax.hf.tokenizer import HFTokenizer, load_tokenizer

__all__ = [
    "CheckpointMismatchError", "HFTokenizer", "UnsupportedCheckpointError",
    "UnsupportedRopeError", "hf_config_from_model", "load_params", "load_tokenizer",
    "model_config_from_hf", "read_config", "resolve_config", "save_pretrained",
]
