"""The context-extension study (experiments/extension.py) end to end, tiny."""
import numpy as np

from experiments import extension
from lcjax import registry
from lcjax.model import schedule


def test_registered_extension_experiments_are_valid_configs():
  for name in ("extension_base", "extension_pi_ft", "extension_ntk_ft",
               "extension_yarn_ft", "extension_e2llm_ft", "extension_longlora_ft"):
    cfg = registry.get(name)
    schedule.layer_kinds(cfg.model)
    if name != "extension_base":
      assert cfg.checkpoint.init_params_from == extension.BASE_RUN
  assert registry.get("extension_longlora_ft").model.lora.rank == 8
  assert registry.get("extension_e2llm_ft").data.seq_len == extension.FULL.short
  assert registry.get("extension_yarn_ft").data.seq_len == extension.FULL.long


def test_extension_study_smoke(tmp_path):
  """Base run, a training-free method (DCA) and the most involved fine-tune
  (LongLoRA: params from the base run, LoRA + S²-attn, merge, full attention)."""
  s = extension.QUICK
  study = extension.run_study(str(tmp_path), s, methods=("DCA", "LongLoRA"))
  label = f"LongLoRA, {s.finetune_steps} fine-tune steps at {s.long}"
  assert set(study["accuracy"]) == {"DCA, training-free", label}
  for acc in study["accuracy"].values():
    assert sorted(acc) == [s.short, s.long]
    assert all(0.0 <= a <= 1.0 for a in acc.values())
  assert np.isfinite(study["train_seconds"]["extension_longlora_ft"])
  text = extension.table(study)
  assert "| DCA, training-free |" in text and f"| {s.long} tokens |" in text
