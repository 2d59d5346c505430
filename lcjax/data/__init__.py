"""Data: tokenizer, corpora, token store, packing, batches, synthetic tasks.

The trainer's entry point is :func:`make_source`; see ``docs/data.md``.
"""
from lcjax.data.packing import Batch, frame, pack_documents, rows_from_windows
from lcjax.data.pipeline import BatchSource, WindowSource, default_store_dir, make_source
from lcjax.data.tasks import (Example, eval_examples, make_multikey_niah, make_passkey,
                              multikey_training_row, passkey_training_row, score)
from lcjax.data.token_store import TokenStore, open_or_write, write_store
from lcjax.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "Batch", "BatchSource", "ByteTokenizer", "Example", "TokenStore", "Tokenizer",
    "WindowSource", "default_store_dir", "eval_examples", "frame", "make_multikey_niah",
    "make_passkey", "make_source", "multikey_training_row", "open_or_write", "pack_documents",
    "passkey_training_row",
    "rows_from_windows", "score", "write_store",
]
