"""Layer schedules: placements, named schedules, pattern sizes, clear errors."""
import dataclasses

import pytest

from lcjax import config as C
from lcjax.attention.patterns import SinkWindow, StridedBlockSparse
from lcjax.config import AttentionConfig, ModelConfig
from lcjax.model import schedule
from lcjax.train.flops import flops_per_token

F, S, X = "full", "sink_window", "strided"


def _cfg(num_layers=6, **attention):
  return ModelConfig(num_layers=num_layers, attention=AttentionConfig(**attention))


def test_placements():
  assert schedule.middle_full(6) == (S, S, F, F, S, S)
  assert schedule.middle_full(24).count(F) == 8
  assert schedule.middle_full(24).index(F) == 8  # layers 8..15: the middle third
  assert schedule.bottom_full(6, X) == (F, F, X, X, X, X)
  assert schedule.top_full(6, X, num_full=1) == (X,) * 5 + (F,)
  assert schedule.every_nth_full(7) == (S, F, S, S, F, S, S)
  assert schedule.every_nth_full(6, n=3, offset=2) == (S, S, F, S, S, F)
  assert schedule.all_sparse(3, X) == (X, X, X)
  assert schedule.full_at(4, [0, 3]) == (F, S, S, F)


def test_named_schedule_in_config_groups_layers():
  cfg = _cfg(num_layers=9, schedule="middle_third:strided")
  assert schedule.layer_kinds(cfg) == (X,) * 3 + (F,) * 3 + (X,) * 3
  assert schedule.layer_groups(cfg) == [(X, 3), (F, 3), (X, 3)]
  parsed = C.override(C.Config(), ["model.attention.schedule=every_third:sink_window",
                                   "model.num_layers=6"])
  assert schedule.layer_kinds(parsed.model) == (S, F, S, S, F, S)


def test_kinds_build_patterns_from_sizes():
  att = AttentionConfig(sink=4, window=100, block_size=32, stride=8, local_blocks=2,
                        strided_head_offsets=False)
  assert schedule.pattern_for(S, att) == SinkWindow(4, 100)
  assert schedule.pattern_for(X, att) == StridedBlockSparse(32, 8, 2, head_offsets=False)


def test_sparse_layers_count_fewer_flops():
  dense = _cfg(num_layers=6)
  hybrid = _cfg(num_layers=6, schedule="middle_third:sink_window", window=64, sink=4)
  assert flops_per_token(hybrid, 4096) < flops_per_token(dense, 4096)


@pytest.mark.parametrize("call, message", [
    (lambda: schedule.full_at(6, [2, 6]),
     "layer index 6 is out of range: a model with num_layers=6 has layers 0..5"),
    (lambda: schedule.full_at(6, [-1]), "layer index -1 is out of range"),
    (lambda: schedule.full_at(6, [1, 1]), "layer index 1 is given twice"),
    (lambda: schedule.full_at(6, [1.5]), "layer index 1.5 is out of range"),
    (lambda: schedule.middle_full(6, num_full=7), "num_full=7 is not allowed"),
    (lambda: schedule.every_nth_full(6, n=3, offset=3), "offset=3 is not allowed"),
    (lambda: schedule.middle_full(6, "sliding"), "unknown sparse kind 'sliding'"),
    (lambda: schedule.named_schedule("middle:sink_window", 6),
     "attention.schedule='middle:sink_window' is not allowed"),
    (lambda: schedule.named_schedule("middle_third", 6), "'<placement>:<sparse kind>'"),
])
def test_bad_helpers_give_clear_errors(call, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    call()


@pytest.mark.parametrize("attention, message", [
    (dict(layer_kinds=(F, S), window=0), "attention.window=0 is not allowed; it must be an "
     "int >= 1"),
    (dict(layer_kinds=(F, S), sink=-1), "attention.sink=-1 is not allowed"),
    (dict(layer_kinds=(X, F), stride=0), "attention.stride=0 is not allowed"),
    (dict(layer_kinds=(X, X), block_size=0), "attention.block_size=0 is not allowed"),
    (dict(layer_kinds=(X, F), local_blocks=0), "attention.local_blocks=0 is not allowed"),
    (dict(layer_kinds=(F, F, F)), "has 3 entries but num_layers=2"),
    (dict(layer_kinds=(F, "fulll")), r"unknown attention kinds \['fulll'\]"),
    (dict(layer_kinds=(F, F), schedule="all:strided"), "not both"),
])
def test_bad_schedules_give_clear_errors(attention, message):
  with pytest.raises(ValueError, match=message):
    schedule.layer_kinds(_cfg(num_layers=2, **attention))


def test_unused_sizes_are_not_checked():
  """A dense model does not care about an odd window."""
  assert schedule.layer_kinds(_cfg(num_layers=2, window=0)) == (F, F)


def test_with_layer_kinds_replaces_named_schedule():
  cfg = schedule.with_layer_kinds(_cfg(num_layers=3, schedule="all:strided"), (F, S, F))
  assert cfg.attention.schedule == "" and schedule.layer_kinds(cfg) == (F, S, F)
  with pytest.raises(ValueError, match="has 2 entries"):
    schedule.with_layer_kinds(cfg, (F, S))
  assert dataclasses.replace(cfg).attention.layer_kinds == (F, S, F)
