"""The cache model of the kernels' schedules (pallas_kernels/cache_model.py)."""
import dataclasses

import pytest

from lcjax.attention import block_mask
from lcjax.attention import patterns as P
from pallas_kernels import cache_model as cm
from pallas_kernels import mosaic_attention as ma

_CFG = dataclasses.replace(ma.DEFAULT_CONFIG, num_sms=32)


def _misses(pattern, direction, order="ascending", kv_heads=8):
  cfg = dataclasses.replace(_CFG, dkv_order=order)
  return cm.tile_misses(pattern, 8192, heads=8, kv_heads=kv_heads,
                        direction=direction, config=cfg, cache_mb=8)


@pytest.mark.parametrize("direction", ["fwd", "dkv"])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_every_list_entry_is_one_read(direction, kv_heads):
  pattern = P.StridedBlockSparse(128, 8, 1)
  reads, misses = _misses(pattern, direction, kv_heads=kv_heads)
  meta = block_mask.block_metadata(pattern, 8192, 8192, 128, 128, num_heads=8)
  assert reads == int(meta.kv_counts.sum()) == int(meta.q_counts.sum())
  distinct = 64 * (kv_heads if direction == "fwd" else 8)  # tiles x heads read
  assert distinct <= misses <= reads


def test_descending_walk_shares_the_strided_columns_reads():
  """Long strided key columns of one head start together; walked upwards they
  read each Q/dO tile 8 steps apart, downwards at the same step."""
  strided = P.StridedBlockSparse(128, 8, 1)
  _, up = _misses(strided, "dkv", "ascending")
  _, down = _misses(strided, "dkv", "descending")
  assert down < 0.7 * up, (up, down)
  _, up = _misses(P.Causal(), "dkv", "ascending")
  _, down = _misses(P.Causal(), "dkv", "descending")
  assert abs(up - down) < 0.05 * up, (up, down)  # causal columns: already in step


def test_rejects_unknown_direction():
  with pytest.raises(ValueError, match="direction='dq'"):
    cm.tile_misses(P.Causal(), 1024, direction="dq")
