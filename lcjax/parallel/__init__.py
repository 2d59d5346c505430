"""Context parallelism: attention over the mesh's ``sequence`` axis.

Ring, all-gather, Ulysses and hybrid strategies behind one call
(:func:`context_attention`), load-balancing layouts applied once in the data
path, and sparse-aware exchange plans. See docs/context_parallel.md.
"""
from lcjax.parallel.context import active_layout, context_attention, model_layout
from lcjax.parallel.layout import SequenceLayout, permute_batch

__all__ = ["active_layout", "context_attention", "model_layout", "SequenceLayout",
           "permute_batch"]
