"""The LongGen benchmark's configs and reports (the timing itself runs on the GPU)."""
from lcjax.bench import longgen as bench
from lcjax.model import schedule


def _record():
  cfg = bench.model_config(quick=False, sparse="sink_window", variant="hybrid")
  return {
      "device": "NVIDIA H100", "jax": "0.11.2", "date": "2026-11-25", "repeats": 2,
      "sparse": "sink_window", "quick": False,
      "model": {"num_layers": 16, "embed_dim": 2048, "num_heads": 16, "head_dim": 128,
                "num_kv_heads": 4, "mlp_dim": 8192, "vocab_size": 32000,
                "dtype": "bfloat16", "remat": "full"},
      "attention": {"sink": 64, "window": 1984, "block_size": 128, "stride": 16,
                    "local_blocks": 1},
      "kinds": {"full": ["full"] * 16, "hybrid": list(schedule.layer_kinds(cfg))},
      "train": {"full": {"131072": {"step_s": 10.0, "model_tflops": 400.0}},
                "hybrid": {"131072": {"step_s": 5.0, "model_tflops": 300.0}}},
      "inference": {
          v: {"prompt_len": 131072, "decode_batches": [1, 8], "prefill_s": p,
              "decode": {"1": {"pallas": {"impl": "pallas", "ms_per_step": 1e3 / d,
                                          "tokens_per_s": d},
                               "xla": {"error": "skipped: time budget"}, "best": "pallas"},
                         "8": {"xla": {"impl": "xla", "ms_per_step": 8e3 / d8,
                                       "tokens_per_s": d8}, "best": "xla"}},
              "kv_cache": {"kv_bytes": kv}}
          for v, p, d, d8, kv in (("full", 4.0, 250.0, 1000.0, 2**32),
                                  ("hybrid", 2.0, 400.0, 3000.0, 2**30))},
      "skipped": ["train full 32768: time budget (390s) used up"], "errors": [],
  }


def test_model_configs_are_1b_class_and_longgen_hybrid():
  full = bench.model_config(quick=False, sparse="sink_window", variant="full")
  hybrid = bench.model_config(quick=False, sparse="sink_window", variant="hybrid")
  kinds = schedule.layer_kinds(hybrid)
  assert kinds.count("full") == 5 and kinds[5:10] == ("full",) * 5
  assert set(schedule.layer_kinds(full)) == {"full"}
  D, F, L = full.embed_dim, full.mlp_dim, full.num_layers
  attn = D * full.num_heads * full.head_dim * 2 + 2 * D * full.num_kv_heads * full.head_dim
  params = L * (attn + 3 * D * F) + full.vocab_size * D
  assert 0.9e9 < params < 1.2e9
  # Sparse layers keep sink + window = 1/64 of 128K tokens.
  assert hybrid.attention.sink + hybrid.attention.window == 131072 // 64


def test_report_rows_and_markdown_section(tmp_path):
  record = _record()
  rows = {r[0]: r for r in bench.summary_rows(record)}
  assert rows["train step 128K (s)"][3] == "2.00x faster"
  assert rows["prefill 128K (s)"][3] == "2.00x faster"
  assert rows["decode after 128K, batch 1 (tok/s)"][3] == "1.60x faster"
  assert rows["decode after 128K, batch 8 (tok/s)"][1:] == ("1000.0 [xla]", "3000.0 [xla]",
                                                            "3.00x faster")
  assert rows["KV cache at 128K"][1:] == ("4.00 GiB", "1.00 GiB", "75% smaller")
  path = tmp_path / "longgen.md"
  path.write_text("# LongGen\n\nintro\n")
  bench.write_markdown(record, str(path))
  bench.write_markdown(record, str(path))  # replaces, does not append twice
  text = path.read_text()
  assert text.count(bench.MARK_START) == 1 and text.startswith("# LongGen\n\nintro")
  assert "| train step 128K (s) | 10.000 | 5.000 | 2.00x faster |" in text
  assert "Skipped:" in text
  assert "hybrid batch 8 xla: 2.67 ms/step" in text and "skipped: time budget" in text
