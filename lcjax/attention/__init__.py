"""Attention engine: declarative patterns, block metadata, reference and kernels.

``attend`` is the one call; patterns say which (query, key) pairs are visible
(see docs/attention.md for the vocabulary and the dispatch rules).
"""
from lcjax.attention.api import attend, attend_backward, choose_implementation
from lcjax.attention.patterns import (
    AShape, BlockMask, Causal, CausalShiftedGroups, DocumentAnchor, Full,
    Intersection, Pattern, PerHead, QueryRange, ShiftedGroups, Sink,
    SinkWindow, SlidingWindow, StridedBlockSparse, StridedBlocks, TriShape,
    Union)

__all__ = [
    "attend", "attend_backward", "choose_implementation", "Pattern", "Full", "Causal",
    "SlidingWindow", "Sink", "SinkWindow", "AShape", "TriShape", "QueryRange",
    "StridedBlockSparse", "StridedBlocks", "ShiftedGroups",
    "CausalShiftedGroups", "DocumentAnchor", "BlockMask", "PerHead", "Union",
    "Intersection",
]
