"""A cache model of the Mosaic kernels' schedules: how often a tile read misses L2.

    python -m pallas_kernels.cache_model            # strided / causal / sink+window, 32K

Replays the block lists and CTA runs of ``mosaic_attention`` as the kernels
walk them, under the idealisation that every CTA takes one step per list entry
and all CTAs step together, and counts the misses of an LRU cache of
``cache_mb`` (the H100's L2 is 50 MB) over the tiles read per step: K/V of one
128-key block of one kv head (forward and dQ) or Q/dO of one 128-row block of
one head (dK/dV), 64 KiB each at d=128 in bf16. A model, not a measurement:
it shows which schedules read the same tiles at the same time (e.g. the long
key columns of a strided pattern, which walk their query blocks 16 steps
apart in ascending order: ``dkv_order="descending"``).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses

import numpy as np

from lcjax.attention import block_mask
from lcjax.attention import patterns as P
from pallas_kernels import mosaic_attention as ma

TILE_BYTES = 64 * 1024  # two 128 x 128 bf16 tiles (K and V, or Q and dO)


def _replay(per_cta_reads: list[list[tuple[int, int]]], cache_mb: float) -> tuple[int, int]:
  """(reads, misses) of CTAs stepping together through their read lists."""
  capacity = int(cache_mb * 2**20) // TILE_BYTES
  lru: collections.OrderedDict = collections.OrderedDict()
  reads = misses = 0
  for t in range(max(map(len, per_cta_reads), default=0)):
    for cta_reads in per_cta_reads:
      if t >= len(cta_reads):
        continue
      key = cta_reads[t]
      reads += 1
      if key in lru:
        lru.move_to_end(key)
      else:
        misses += 1
        lru[key] = None
        if len(lru) > capacity:
          lru.popitem(last=False)
  return reads, misses


def tile_misses(pattern, length: int, heads: int = 16, kv_heads: int = 16,
                direction: str = "dkv", config: ma.Config = ma.DEFAULT_CONFIG,
                cache_mb: float = 50.0) -> tuple[int, int]:
  """(reads, misses) of the tiles a kernel streams, for one batch row.

  ``direction``: "fwd" (forward and dQ: K/V per key block of each query
  tile's list) or "dkv" (Q/dO per query block of each key tile's lists).
  Host-built lists only (static pattern, no segment ids).
  """
  meta = block_mask.block_metadata(pattern, length, length, 128, 128,
                                   num_heads=heads)
  fwd_lists, bwd_lists = ma._lists(meta, config)  # pylint: disable=protected-access
  group = heads // kv_heads
  reads = []
  if direction == "fwd":
    lists = fwd_lists
    work = ma._row_schedule(np.asarray(lists.count), 1, heads, config)  # pylint: disable=protected-access
    blocks, counts = np.asarray(lists.blocks), np.asarray(lists.count)
    for c in range(len(work.bounds) - 1):
      cta = []
      for _, h, qt in work.items[work.bounds[c]:work.bounds[c + 1]]:
        hm = h if blocks.shape[1] > 1 else 0
        cta += [(h // group, int(k)) for k in blocks[0, hm, qt, :counts[0, hm, qt]]]
      reads.append(cta)
  elif direction == "dkv":
    lists = bwd_lists
    sched = ma._kv_schedule(np.asarray(lists.count), 1, heads, kv_heads, config)  # pylint: disable=protected-access
    blocks, counts = np.asarray(lists.blocks), np.asarray(lists.count)
    for c in range(len(sched.bounds) - 1):
      cta = []
      for _, kvh, kt, start, end, _ in sched.items[sched.bounds[c]:sched.bounds[c + 1]]:
        concat = []  # the GQA group's lists, one after the other (as the kernel)
        for g in range(group):
          h = kvh * group + g
          hm = h if blocks.shape[1] > 1 else 0
          concat += [(h, int(q)) for q in blocks[0, hm, kt, :counts[0, hm, kt]]]
        cta += concat[start:end]
      reads.append(cta)
  else:
    raise ValueError(f"direction={direction!r}; allowed: 'fwd', 'dkv'")
  return _replay(reads, cache_mb)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--cache-mb", type=float, default=50.0)
  args = parser.parse_args()
  cases = {"strided_1/16": P.StridedBlockSparse(128, 16, 1),
           "causal": P.Causal(),
           "sink64+window4096": P.SinkWindow(64, 4095)}
  print("| pattern | kernel | order | tile reads | misses | miss % | MB from HBM |")
  print("|---|---|---|---|---|---|---|")
  for name, pattern in cases.items():
    runs = [("fwd/dQ", "fwd", ma.DEFAULT_CONFIG)] + [
        ("dK/dV", "dkv", dataclasses.replace(ma.DEFAULT_CONFIG, dkv_order=o))
        for o in ("ascending", "descending")]
    for kernel, direction, cfg in runs:
      reads, misses = tile_misses(pattern, args.length, direction=direction,
                                  config=cfg, cache_mb=args.cache_mb)
      order = cfg.dkv_order if direction == "dkv" else "-"
      print(f"| {name} | {kernel} | {order} | {reads} | {misses} | "
            f"{100 * misses / reads:.1f} | {misses * TILE_BYTES / 2**20:.0f} |",
            flush=True)


if __name__ == "__main__":
  main()
