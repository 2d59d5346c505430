"""The Llama-style decoder and its parts."""
from lcjax.model.transformer import Decoder, param_count

__all__ = ["Decoder", "param_count"]
