"""AnchorAttention: anchor rows from the data pipeline + the "anchor" layer kind."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import AttentionConfig, DataConfig, ModelConfig
from lcjax.data import packing
from lcjax.data.pipeline import make_source
from lcjax.data.tokenizer import ByteTokenizer
from lcjax.model import Decoder


def test_anchor_rows_share_bos_at_zero_and_keep_counting_positions():
  docs = [np.array([1, 5, 6, 7, 2]), np.array([1, 8, 9, 2]), np.array([1, 10, 11, 12, 2])]
  rows = packing.pack_documents(docs, seq_len=12, pad_id=0)
  anchored = packing.anchor_rows(rows, bos_id=1)
  np.testing.assert_array_equal(rows.positions[0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0])
  np.testing.assert_array_equal(anchored.positions[0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0])
  np.testing.assert_array_equal(anchored.segment_ids, rows.segment_ids)
  np.testing.assert_array_equal(anchored.targets, rows.targets)
  assert (anchored.tokens[:, 0] == 1).all()
  # A row that starts mid-document gets the anchor in place of its first token.
  window = packing.rows_from_windows(np.array([[40, 41, 2, 1, 50, 51]]),
                                     np.array([[3, 3, 3, 4, 4, 4]]), pad_id=0)
  anchored = packing.anchor_rows(window, bos_id=1)
  np.testing.assert_array_equal(anchored.tokens, [[1, 41, 2, 1, 50]])
  np.testing.assert_array_equal(anchored.positions, [[0, 1, 2, 3, 4]])


def test_pipeline_builds_anchor_rows_when_configured(tmp_path):
  for i in range(6):
    (tmp_path / f"doc{i}.txt").write_text(f"document {i} " + "text " * (10 + i))
  cfg = DataConfig(source="files", paths=str(tmp_path / "*.txt"),
                   store_dir=str(tmp_path / "store"), seq_len=48, batch_size=4)
  plain = make_source(cfg).batch(3)
  anchored = make_source(dataclasses.replace(cfg, anchor=True)).batch(3)
  assert (anchored.tokens[:, 0] == ByteTokenizer().bos_id).all()
  np.testing.assert_array_equal(anchored.tokens[:, 1:], plain.tokens[:, 1:])
  np.testing.assert_array_equal(anchored.positions,
                                np.broadcast_to(np.arange(48), (4, 48)))
  assert (plain.positions != anchored.positions).any()  # documents restart there
  evals = make_source(dataclasses.replace(cfg, anchor=True)).eval_batches(1)[0]
  assert (evals.tokens[:, 0] == ByteTokenizer().bos_id).all()


def test_anchor_kind_lets_every_document_see_the_anchor_only():
  cfg = ModelConfig(vocab_size=32, embed_dim=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8, mlp_dim=16)
  anchor = dataclasses.replace(cfg, attention=AttentionConfig(layer_kinds=("anchor",) * 2))
  tokens = jax.random.randint(jax.random.key(0), (1, 12), 3, 32)
  seg = jnp.array([[1] * 5 + [2] * 4 + [3] * 3])
  pos = jnp.arange(12)[None]
  params = jax.jit(Decoder(cfg).init)(jax.random.key(1), tokens)["params"]
  apply = {c: jax.jit(Decoder(c).apply) for c in (cfg, anchor)}

  def logits(c, toks):
    return np.asarray(apply[c]({"params": params}, toks, pos, seg))

  changed_anchor = tokens.at[0, 0].set(7)
  changed_doc1 = tokens.at[0, 3].set(7)
  base_full, base_anchor = logits(cfg, tokens), logits(anchor, tokens)
  np.testing.assert_allclose(base_anchor[:, :5], base_full[:, :5], atol=1e-6)  # doc 1
  # Documents 2 and 3 see the anchor (token 0) but nothing else of document 1.
  moved = np.abs(logits(anchor, changed_anchor) - base_anchor).max(axis=-1)[0]
  assert moved[5:].min() > 1e-6
  np.testing.assert_allclose(logits(anchor, changed_doc1)[:, 5:], base_anchor[:, 5:],
                             atol=1e-6)
  np.testing.assert_allclose(logits(cfg, changed_anchor)[:, 5:], base_full[:, 5:],
                             atol=1e-6)  # plain document masking: no anchor
