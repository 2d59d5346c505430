import dataclasses

import pytest

from lcjax import config as C
from lcjax import registry


def test_override_parses_by_field_type():
  cfg = C.override(C.Config(), [
      "model.num_layers=6", "train.learning_rate=2e-4", "model.tie_embeddings=false",
      "model.attention.layer_kinds=full,full,full,full,full,full",
      "eval.passkey_depths=0.25,0.75", "name=x"])
  assert cfg.model.num_layers == 6 and isinstance(cfg.model.num_layers, int)
  assert cfg.train.learning_rate == pytest.approx(2e-4)
  assert cfg.model.tie_embeddings is False
  assert cfg.model.attention.layer_kinds == ("full",) * 6
  assert cfg.eval.passkey_depths == (0.25, 0.75)
  assert cfg.name == "x"
  assert C.Config().model.num_layers != 6  # the original is untouched (frozen)


@pytest.mark.parametrize("assignment, message", [
    ("model.num_layer=3", "valid keys here: model.attention"),
    ("modle.num_layers=3", "valid keys here: checkpoint, data"),
    ("model=3", "'model' is a section"),
    ("model.num_layers=3.5", "model.num_layers expects an int"),
    ("model.tie_embeddings=maybe", "expects a bool"),
    ("train.steps", "must look like key=value"),
])
def test_bad_overrides_name_the_problem(assignment, message):
  with pytest.raises(C.ConfigError, match=message):
    C.override(C.Config(), [assignment])


def test_configs_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    C.Config().model.num_layers = 3


def test_registry_finds_and_composes_experiments():
  assert {"base", "quickstart"} <= set(registry.names())
  quick = registry.get("quickstart")
  assert quick.name == "quickstart"
  assert quick.model.embed_dim != registry.get("base").model.embed_dim
  with pytest.raises(KeyError, match="known: .*quickstart"):
    registry.get("quickstrat")


def test_flatten_lists_every_leaf():
  flat = C.flatten(C.Config())
  assert flat["model.attention.window"] == C.AttentionConfig().window
  assert all(not dataclasses.is_dataclass(v) for v in flat.values())
