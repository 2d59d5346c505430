"""Text corpora: which files become documents, in what order, in which split.

Two sources:

* ``"stdlib"`` — the embedded default: the ``.py`` files of the Python
  standard library (``sysconfig.get_paths()["stdlib"]``, without
  ``site-packages``). Long, real, code-like documents present on every machine
  with Python (about 1,800 files / 31 MB on CPython 3.11). Its content differs
  between Python versions, so two machines with different Pythons train on
  different (but each deterministic) data.
* ``"files"`` — a glob (or several, comma-separated; ``**`` recurses) of UTF-8
  text files.

Order is the sorted relative path. The train/eval split is a hash of the
relative path (about 2% eval), so it is stable when files are added or removed.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sysconfig
from typing import Any

SOURCES = ("stdlib", "files")
EVAL_PER_MILLE = 20  # ~2% of documents go to the eval split.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One document on disk; ``size``/``mtime_ns`` key the token-store cache."""
  relpath: str
  path: str
  size: int
  mtime_ns: int


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The files of a source, split into train and eval, each in sorted order."""
  kind: str
  root: str
  train: tuple[SourceFile, ...]
  eval: tuple[SourceFile, ...]

  @property
  def strict_utf8(self) -> bool:
    """``files`` sources must be valid UTF-8; stdlib has a few test fixtures
    in other encodings, which are skipped."""
    return self.kind != "stdlib"

  def identity(self) -> dict[str, Any]:
    """What the token store's fingerprint is computed from (cheap: no reads)."""
    def listing(files):
      return [[f.relpath, f.size, f.mtime_ns] for f in files]
    return {"kind": self.kind, "root": self.root, "split_per_mille": EVAL_PER_MILLE,
            "train": listing(self.train), "eval": listing(self.eval)}


def corpus_from_config(source: str, paths: str = "", max_documents: int = 0) -> Corpus:
  """The corpus a ``DataConfig`` names (``source``, ``paths``, ``max_documents``)."""
  if source == "stdlib":
    if paths:
      raise ValueError(f"data.paths={paths!r} is only used with data.source='files'")
    return stdlib_corpus(max_documents)
  if source == "files":
    return files_corpus(paths, max_documents)
  raise ValueError(f"unknown data.source {source!r}; choose one of {SOURCES}")


def stdlib_corpus(max_documents: int = 0) -> Corpus:
  """The standard library's ``.py`` files (see module docstring)."""
  root = os.path.realpath(sysconfig.get_paths()["stdlib"])
  files = []
  for directory, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS]
    files.extend(os.path.join(directory, n) for n in names if n.endswith(".py"))
  if not files:
    raise FileNotFoundError(f"no .py files under the standard library directory {root}")
  return _make_corpus("stdlib", root, files, max_documents)


def files_corpus(pattern: str, max_documents: int = 0) -> Corpus:
  """UTF-8 text files matching ``pattern`` (comma-separated globs, ``**`` ok)."""
  globs = [p.strip() for p in pattern.split(",") if p.strip()]
  if not globs:
    raise ValueError("data.source='files' needs data.paths, a glob of UTF-8 text files "
                     "(e.g. 'corpus/**/*.txt')")
  files = set()
  for g in globs:
    matches = [m for m in glob.glob(os.path.expanduser(g), recursive=True)
               if os.path.isfile(m)]
    if not matches:
      raise FileNotFoundError(f"data.paths glob {g!r} matches no files")
    files.update(os.path.realpath(m) for m in matches)
  root = os.path.commonpath([os.path.dirname(f) for f in files])
  return _make_corpus("files", root, sorted(files), max_documents)


def is_eval(relpath: str) -> bool:
  """Whether a document belongs to the eval split (hash of its relative path)."""
  return _hash(b"split", relpath) % 1000 < EVAL_PER_MILLE


def read_text(f: SourceFile, *, strict_utf8: bool) -> str | None:
  """The document's text, or None if it is skipped.

  Skipped: whitespace-only files, and (unless ``strict_utf8``) files that are
  not valid UTF-8. With ``strict_utf8`` invalid UTF-8 is an error naming the file.
  """
  with open(f.path, "rb") as fh:
    data = fh.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    if strict_utf8:
      raise ValueError(f"{f.path} is not valid UTF-8 ({e}); the 'files' source "
                       "reads UTF-8 text only") from None
    return None
  return text if text.strip() else None


def _make_corpus(kind: str, root: str, paths: list[str], max_documents: int) -> Corpus:
  if max_documents < 0:
    raise ValueError(f"data.max_documents must be >= 0 (0 = all), got {max_documents}")
  files = []
  for p in paths:
    st = os.stat(p)
    if st.st_size == 0:
      continue
    rel = os.path.relpath(p, root).replace(os.sep, "/")
    files.append(SourceFile(rel, p, st.st_size, st.st_mtime_ns))
  if max_documents and len(files) > max_documents:
    # A hash-chosen subset spread over the whole tree (not the first N names).
    files = sorted(files, key=lambda f: _hash(b"select", f.relpath))[:max_documents]
  files.sort(key=lambda f: f.relpath)
  if len(files) < 2:
    raise ValueError(f"the {kind} corpus under {root} has {len(files)} non-empty file(s); "
                     "at least 2 are needed (one goes to the eval split)")
  train = [f for f in files if not is_eval(f.relpath)]
  evals = [f for f in files if is_eval(f.relpath)]
  if not evals:  # Small corpora: keep at least one eval document.
    moved = min(train, key=lambda f: _hash(b"split", f.relpath))
    train.remove(moved)
    evals = [moved]
  return Corpus(kind, root, tuple(train), tuple(evals))


def _hash(salt: bytes, relpath: str) -> int:
  digest = hashlib.blake2b(salt + b":" + relpath.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little")
