"""Shared fixtures: a tiny random Llama with a byte-level tokenizer, built on the spot (no download)."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# evaluations are cached across runs (spaceft.evalcache); tests never read the user's cache, and each test
# starts with an empty one (session-scoped fixtures share this session's)
os.environ["SPACEFT_EVAL_CACHE"] = tempfile.mkdtemp(prefix="spaceft-evals-")
atexit.register(shutil.rmtree, os.environ["SPACEFT_EVAL_CACHE"], ignore_errors=True)


ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    """Import benchmarks/<name>.py, a measuring tool."""
    return _load_script(ROOT / "benchmarks", name)


def load_experiment(name: str) -> ModuleType:
    """Import experiments/<name>.py, an experiment's driver or its analysis."""
    return _load_script(ROOT / "experiments", name)


def _load_script(directory: Path, name: str) -> ModuleType:
    """Import directory/<name>.py (a directory of scripts, not a package); the scripts import each other,
    and dataclasses look their module up in sys.modules, so both are set up first."""
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _own_eval_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "eval-cache"
    monkeypatch.setenv("SPACEFT_EVAL_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spaceft.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from spaceft.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def tiny_overrides(tmp: Path, model_dir: Path, **extra: object) -> list[str]:
    """Overrides that make the shipped `tiny` recipe fast and self-contained under `tmp`."""
    base = {
        "output_dir": str(tmp / "runs"),
        "model.name": str(model_dir),
        "data.train_size": 8,
        "data.eval_size": 4,
        "generation.max_new_tokens": 12,
        "generation.batch_size": 4,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.save_every": 1,
        "eval.max_new_tokens": 8,
        "logging.progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
