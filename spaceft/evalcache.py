"""Evaluations kept across runs: the same weights, evaluated the same way, are evaluated once.

Runs that share a start model (every method and seed of a grid, or a recipe re-run under another name)
would otherwise each spend the start model's evaluation again, a quarter of a three-iteration run's
evaluation time. An evaluation's result is a function of:

* the model's weights and tokenizer (the content hash of its directory; a hub id is not a content
  hash, so a model named by id is never cached),
* the eval settings (`eval.*`, batch size included: batch shapes change logits in the last bits) and
  the model settings (dtype, attention implementation, …),
* the held-out token ids and reference answers,
* the code that computes it: spaceft's own source files, torch / transformers / lm-eval versions, and
  the device type.

The key hashes all of them; the entry is `<cache>/evals/<key>/` (`SPACEFT_EVAL_CACHE` moves it),
holding the stage's output files (eval.json, eval_samples.jsonl, eval_outputs.parquet,
lm_eval_tasks/), written atomically. A hit
copies them into the iteration's directory; the manifest entry says `cached: <key>`. `eval.cache=false`
turns it off. A custom `eval.task_metric` ('module:function') is keyed by its name only: its code is
not hashed, so change its name (or turn the cache off) when you change it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spaceft.config import EVAL_WHERE_KEYS
from spaceft.rundir import atomic_dir, content_hash, library_versions

log = logging.getLogger(__name__)

CACHED_FILES = ("eval.json", "eval_samples.jsonl", "eval_outputs.parquet", "lm_eval_tasks")
"""The evaluation's outputs that a hit restores (the per-process parts are not kept)."""


@functools.cache
def code_fingerprint() -> str:
    """Hash of spaceft's source files (and shipped task YAMLs): any change of the code invalidates."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(
    model_hash: str,
    eval_settings: dict[str, Any],
    model_settings: dict[str, Any],
    heldout: Sequence[Any],
    device_type: str,
) -> str:
    """The key of one evaluation (see the module docstring for what it covers)."""
    settings = {k: v for k, v in eval_settings.items() if k not in EVAL_WHERE_KEYS}
    versions = {k: v for k, v in library_versions().items() if k in ("torch", "transformers", "python")}
    if settings.get("lm_eval_tasks"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            versions["lm_eval"] = version("lm_eval")
        except PackageNotFoundError:
            pass
    return content_hash(model_hash, settings, model_settings, list(heldout), versions, device_type,
                        code_fingerprint())  # fmt: skip


def is_content_hash(model_hash: str) -> bool:
    """Whether a recorded model hash is a content hash (16 hex digits), not a hub id or a path."""
    return len(model_hash) == 16 and all(c in "0123456789abcdef" for c in model_hash)


CACHE_ENV = "SPACEFT_EVAL_CACHE"
"""Environment variable naming the cache directory (default: `<SPACEFT_CACHE>/evals`)."""


def cache_dir() -> Path:
    """Where evaluations are kept: $SPACEFT_EVAL_CACHE, else `evals` in spaceft's cache directory."""
    from spaceft.default_model import default_cache_dir

    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else default_cache_dir() / "evals"


def lookup(key: str) -> Path | None:
    """The entry of `key`, or None."""
    entry = cache_dir() / key
    return entry if (entry / "eval.json").is_file() else None


def store(key: str, out_dir: Path) -> None:
    """Keep the evaluation written in `out_dir` under `key` (a failure to write only warns)."""
    try:
        with atomic_dir(cache_dir() / key) as tmp:
            for name in CACHED_FILES:
                _copy(out_dir / name, tmp / name)
    except OSError as e:
        log.warning("could not keep the evaluation in %s (%s); it is not cached", cache_dir(), e)


def restore(entry: Path, out_dir: Path) -> None:
    """Copy a cached evaluation's files into `out_dir`, replacing what is there."""
    for name in CACHED_FILES:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        _copy(entry / name, target)


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    elif src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
