"""Smoke run of the attention benchmark on CPU (interpret mode, tiny sizes)."""
from __future__ import annotations

import json

from lcjax.bench import attention as bench


def test_quick_benchmark_runs_and_writes(tmp_path):
  out_json, out_md = tmp_path / "bench.json", tmp_path / "performance.md"
  out_md.write_text("# Performance\n\nother sections stay.\n")
  records = bench.main(["--quick", "--patterns", "packed_docs",
                        "--impls", "triton,cudnn,xla", "--json", str(out_json),
                        "--markdown", str(out_md)])
  timed = [r for r in records if "ms" in r]
  assert {r["impl"] for r in timed} == {"triton", "xla", "chunked"}
  assert all(r["ms"] > 0 and r["tflops"] > 0 for r in timed)
  assert any("cuDNN" in r.get("skipped", "") for r in records)
  data = json.loads(out_json.read_text())
  assert len(data["records"]) == len(records)
  text = out_md.read_text()
  assert "other sections stay." in text and "| packed_docs | 128 | fwd |" in text
  # Re-rendering replaces the section instead of appending a second one.
  bench.main(["--render", str(out_json), "--markdown", str(out_md)])
  assert out_md.read_text().count(bench.MARK_START) == 1


def test_visible_pairs_of_packed_documents():
  case = bench.Case("docs", bench.P.Causal(), packed_doc_len=40)
  seg = bench.packed_segments(128, 40)
  want = sum(int((seg == d).sum()) * (int((seg == d).sum()) + 1) // 2
             for d in set(seg.tolist()))
  assert bench.visible_pairs(case, 128, 3) == 3 * want
