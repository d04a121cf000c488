"""Evaluations kept across runs: the same weights, evaluated the same way, are evaluated once.

Runs that share a start model (every method and seed of a grid, or a recipe re-run under another name)
would otherwise each spend the start model's evaluation again, a quarter of a three-iteration run's
evaluation time. An evaluation's result is a function of:

* the model's weights and tokenizer: the content hash of its directory (for a trained model, without
  the run's `spaceft_config.yaml`; for a hub model, the commit it is pinned to),
* the eval settings (`eval.*`, batch size included: batch shapes change logits in the last bits) and
  the model settings that change an evaluation (dtype, attention implementation, remote code),
* the held-out token ids and reference answers,
* the code that computes it: spaceft's own source files, torch / transformers / tokenizers / lm-eval
  versions, the device type (and the CPU model, or the GPU model and CUDA version), and with lm-eval
  tasks the number of processes the harness shards across.

Only evaluations whose lm-eval tasks are `spaceft bench`'s (data pinned by hash) are cached: a local
task YAML or a task from the `datasets` cache can change without the key knowing.

The key hashes all of them; the entry is `<cache>/evals/<key>/` (`SPACEFT_EVAL_CACHE` moves it),
holding the files this evaluation wrote (eval.json, eval_outputs.parquet, and eval_samples.jsonl and
lm_eval_tasks/ when it has them) and their list (files.json). An entry is built under a temporary
name and renamed into place, never replaced: when two runs evaluate the same key at once the first
rename wins, and a run restoring an entry never sees it swapped; one missing a listed file is a miss. A hit
copies them into the iteration's directory; the manifest entry says `cached: <key>`. `eval.cache=false`
turns it off. A custom `eval.task_metric` ('module:function') is keyed by its name only: its code is
not hashed, so change its name (or turn the cache off) when you change it.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spaceft.fingerprint import EVAL_WHERE_KEYS
from spaceft.rundir import content_hash, library_versions, temp_name

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


MODEL_KEYS = ("dtype", "attn_implementation", "trust_remote_code")
"""The model settings that change an evaluation of given weights (LoRA, checkpointing and the name do
not: the weights hash already says which weights these are)."""


def cacheable(eval_settings: dict[str, Any]) -> bool:
    """Whether an evaluation with these settings may be cached: its lm-eval tasks must be `spaceft
    bench`'s, whose data is pinned by hash and whose task files are spaceft's code. A local task YAML or a
    harness task read from the Hub or the `datasets` cache could change without the key noticing. (The
    entries as written, few-shot counts included, are part of the key.)"""
    from spaceft.bench.catalog import parse_task_entry

    return all(parse_task_entry(t).kind == "bench" for t in eval_settings.get("lm_eval_tasks") or [])


def cache_key(
    model_hash: str,
    eval_settings: dict[str, Any],
    model_settings: dict[str, Any],
    heldout: Sequence[Any],
    device: torch.device,
    processes: int,
) -> str:
    """The key of one evaluation (see the module docstring for what it covers)."""
    settings = {k: v for k, v in eval_settings.items() if k not in EVAL_WHERE_KEYS}
    model = {k: model_settings.get(k) for k in MODEL_KEYS}
    names = ("torch", "transformers", "tokenizers", "python")
    versions = {k: v for k, v in library_versions().items() if k in names}
    where: dict[str, Any] = {"device": device.type}
    if device.type == "cuda":
        where["gpu"] = torch.cuda.get_device_name(device)
        where["cuda"] = torch.version.cuda
    else:  # a cache in a home directory shared by machines: another CPU's kernels round otherwise
        where["cpu"] = cpu_model()
    if settings.get("lm_eval_tasks"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            versions["lm_eval"] = version("lm_eval")
        except PackageNotFoundError:
            pass
        where["processes"] = processes  # the harness shards its requests across the processes
    return content_hash(model_hash, settings, model, list(heldout), versions, where, code_fingerprint())


def is_content_hash(model_hash: str) -> bool:
    """Whether a recorded model hash is a content hash (16 hex digits), not a hub id or a path."""
    return len(model_hash) == 16 and all(c in "0123456789abcdef" for c in model_hash)


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CACHE_ENV = "SPACEFT_EVAL_CACHE"
"""Environment variable naming the cache directory (default: `<SPACEFT_CACHE>/evals`)."""


def cache_dir() -> Path:
    """Where evaluations are kept: $SPACEFT_EVAL_CACHE, else `evals` in spaceft's cache directory."""
    from spaceft.default_model import default_cache_dir

    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else default_cache_dir() / "evals"


STALE_S = 3600
"""A temporary entry directory older than this was left by a killed store, and is removed."""
ENTRY_FILES = "files.json"
"""An entry's list of the files it holds (entries written before it have none: `eval.json` then counts)."""


def lookup(key: str) -> Path | None:
    """The entry of `key` if it is complete, else None."""
    entry = cache_dir() / key
    if not (entry / "eval.json").is_file():
        return None
    if not _complete(entry):
        log.warning("%s lacks files its list names; evaluating again", entry)
        return None
    return entry


def _complete(entry: Path) -> bool:
    """Every file the entry's list names is there (an entry without a list: its eval.json is)."""
    listed = entry / ENTRY_FILES
    if not listed.is_file():
        return (entry / "eval.json").is_file()
    return all((entry / name).exists() for name in json.loads(listed.read_text()))


def store(key: str, out_dir: Path, names: Sequence[str]) -> None:
    """Keep the files `names` (what this evaluation wrote) of `out_dir` under `key`, with their list.

    The entry is built under a temporary name and renamed onto a path that does not exist yet; when two
    runs evaluate the same key at once, the first rename wins and the other copy is dropped. An entry is
    never replaced, so a run restoring it never finds it half-gone (the same key means the same result).
    A failure to write only warns."""
    if lookup(key) is not None:
        return
    entry = cache_dir() / key
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        for stale in entry.parent.glob(f".{key}.*"):  # left by a store that was killed (an hour is ample)
            if time.time() - stale.stat().st_mtime > STALE_S:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = temp_name(entry)
        tmp.mkdir()
        try:
            for name in names:
                _copy(out_dir / name, tmp / name)
            (tmp / ENTRY_FILES).write_text(json.dumps(sorted(names)))
            if entry.exists() and not _complete(entry):  # damaged: files deleted by hand
                shutil.rmtree(entry, ignore_errors=True)
            try:
                os.rename(tmp, entry)  # onto a missing (or empty) directory only: never a swap
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                log.info("%s was stored by another run meanwhile; keeping that one", entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
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
