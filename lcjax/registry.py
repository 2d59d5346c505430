"""Finds experiment config functions by name.

Any function in a module of the ``experiments`` package that is decorated with
:func:`register` becomes an experiment named after the function.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from lcjax.config import Config

_EXPERIMENTS: dict[str, Callable[[], Config]] = {}


def register(fn: Callable[[], Config]) -> Callable[[], Config]:
  if fn.__name__ in _EXPERIMENTS and _EXPERIMENTS[fn.__name__] is not fn:
    raise ValueError(f"experiment {fn.__name__!r} is defined twice "
                     f"({_EXPERIMENTS[fn.__name__].__module__} and {fn.__module__})")
  _EXPERIMENTS[fn.__name__] = fn
  return fn


def _import_all() -> None:
  import experiments
  for module in pkgutil.iter_modules(experiments.__path__):
    importlib.import_module(f"experiments.{module.name}")


def names() -> list[str]:
  _import_all()
  return sorted(_EXPERIMENTS)


def get(name: str) -> Config:
  """The config returned by experiment ``name``."""
  _import_all()
  if name not in _EXPERIMENTS:
    raise KeyError(f"unknown experiment {name!r}; known: {', '.join(names())}")
  cfg = _EXPERIMENTS[name]()
  if not isinstance(cfg, Config):
    raise TypeError(f"experiment {name!r} returned {type(cfg).__name__}, not Config")
  return cfg
