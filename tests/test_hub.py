"""A start model given by hub id is pinned to one commit for the whole run (offline: a cache built here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spaceft.cli import main
from spaceft.hub import small_files, weight_files
from spaceft.models import build_tiny_model
from spaceft.rundir import read_json, read_table

from .conftest import tiny_overrides

SHA1, SHA2 = "1" * 40, "2" * 40


def test_only_what_from_pretrained_reads_is_fetched(tmp_path: Path) -> None:
    # Mistral-style repository: sharded safetensors plus a consolidated copy and an original/ folder
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    small = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json", "model.safetensors.index.json",
             "chat_template.jinja"]  # fmt: skip
    other = ["consolidated.safetensors", "original/params.json", "modeling_x.py", "README.md"]
    files = small + shards + other
    assert small_files(files, trust_remote_code=False) == small
    assert "modeling_x.py" in small_files(files, trust_remote_code=True)
    index = {"weight_map": {"a": shards[0], "b": shards[1], "c": shards[0]}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_files(files, tmp_path) == shards
    single = ["config.json", "model.safetensors", "pytorch_model.bin"]
    assert weight_files(single, tmp_path) == ["model.safetensors"]
    assert weight_files(["config.json", "pytorch_model.bin"], tmp_path) == ["pytorch_model.bin"]
    with pytest.raises(ValueError, match="no weights that transformers loads"):
        weight_files(["config.json", "consolidated.safetensors"], tmp_path)


def _snapshot(cache: Path, sha: str, seed: int) -> None:
    repo = cache / "models--org--tiny"
    build_tiny_model(repo / "snapshots" / sha, seed=seed)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)


@pytest.mark.slow
def test_a_hub_id_is_read_at_one_commit_for_the_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when called (the env var at import)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _snapshot(cache, SHA1, seed=0)
    tiny = tmp_path / "local"
    shutil.copytree(cache / "models--org--tiny" / "snapshots" / SHA1, tiny)

    def run(name: str, iterations: int) -> dict:
        over = {"model.name": "org/tiny", "name": name, "selfplay.iterations": iterations}
        assert main(["run", "tiny", *tiny_overrides(tmp_path, tiny, **over)]) == 0
        return read_json(tmp_path / "runs" / name / "manifest.json")

    first = run("a", 1)
    assert (first["start_model_id"], first["start_model_commit"]) == ("org/tiny", SHA1)
    assert first["start_model"] == str(cache / "models--org--tiny" / "snapshots" / SHA1)
    assert first["start_model_hash"] == SHA1[:16]
    assert first["iterations"]["0"]["generate"]["opponent"] == SHA1[:16]
    samples = read_table(tmp_path / "runs" / "a" / "iter_0" / "synthetic.parquet")

    # the branch moves to other weights; the run, resumed for one more iteration, keeps its commit and
    # its finished work
    _snapshot(cache, SHA2, seed=1)
    resumed = run("a", 2)
    assert resumed["start_model_commit"] == SHA1 and resumed["start_model_hash"] == SHA1[:16]
    assert resumed["iterations"]["0"]["generate"] == first["iterations"]["0"]["generate"]
    assert read_table(tmp_path / "runs" / "a" / "iter_0" / "synthetic.parquet") == samples
    # a new run reads the branch's new commit
    fresh = run("b", 1)
    assert fresh["start_model_commit"] == SHA2
    assert fresh["start_model"].endswith(SHA2)


def test_online_the_branch_is_resolved_once_and_only_what_is_read_is_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The online path with the Hub replaced by a stand-in (no network here): one commit for every call,
    the small files first, then the shards the index names; unreachable, the cached snapshot is used."""
    import huggingface_hub

    from spaceft import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    snapshot = tmp_path / "snapshots" / SHA1
    snapshot.mkdir(parents=True)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"weight_map": {"a": shards[0], "b": shards[1]}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    small = ["config.json", "tokenizer.json", "model.safetensors.index.json"]
    files = [*small, *shards, "consolidated.safetensors"]
    asked: list[str | None] = []
    calls: list[tuple[str | None, tuple[str, ...] | None, bool]] = []

    class Api:
        def model_info(self, repo_id: str, revision: str | None = None) -> object:
            asked.append(revision)
            from types import SimpleNamespace

            return SimpleNamespace(sha=SHA1, siblings=[SimpleNamespace(rfilename=f) for f in files])

    def download(repo_id: str, *, revision=None, allow_patterns=None, local_files_only=False) -> str:
        calls.append((revision, tuple(allow_patterns) if allow_patterns else None, local_files_only))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    path, commit = hub.pin_snapshot("org/m", "main", trust_remote_code=False)
    assert (path, commit, asked) == (snapshot, SHA1, ["main"])
    assert calls == [(SHA1, tuple(small), False), (SHA1, tuple(shards), False)]
    # a recorded commit wins over the branch
    hub.pin_snapshot("org/m", "main", trust_remote_code=False, commit=SHA2)
    assert asked[-1] == SHA2

    def unreachable(self: object, repo_id: str, revision: str | None = None) -> object:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(Api, "model_info", unreachable)
    calls.clear()
    assert hub.pin_snapshot("org/m", None, trust_remote_code=False) == (snapshot, SHA1)
    assert calls == [(None, None, True)]  # the cache only
