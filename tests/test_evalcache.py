"""The evaluation cache: the same weights evaluated the same way are evaluated once, across runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from spaceft import evaluate, stage_fns
from spaceft.cli import main
from spaceft.rundir import InjectedFault, read_json

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow


def _run(tmp: Path, model_dir: Path, name: str, **overrides: object) -> dict:
    over = {"name": name, "selfplay.iterations": 1, **overrides}
    assert main(["run", "tiny", *tiny_overrides(tmp, model_dir, **over)]) == 0
    return read_json(tmp / "runs" / name / "manifest.json")["iterations"]


class _Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = evaluate.write_eval_parts

        def counted(*args: object, **kwargs: object) -> None:
            self.calls += 1
            real(*args, **kwargs)

        monkeypatch.setattr(stage_fns, "write_eval_parts", counted)


def test_a_second_run_reuses_the_evaluations_of_the_same_weights(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, _own_eval_cache: Path
) -> None:
    counter = _Counter(monkeypatch)
    first = _run(tmp_path, tiny_model_dir, "a")
    assert counter.calls == 2  # the start model and iteration 0's model
    assert "cached" not in first["base"]["eval"] and "cached" not in first["0"]["eval"]
    assert len(list(_own_eval_cache.iterdir())) == 2

    # another run name, same start model and training config: the start model's evaluation and (training
    # is deterministic) iteration 0's are read back, not computed
    second = _run(tmp_path, tiny_model_dir, "b")
    assert counter.calls == 2
    for key in ("base", "0"):
        assert second[key]["eval"]["cached"]
        assert second[key]["eval"]["nll"] == first[key]["eval"]["nll"]
        assert second[key]["eval"].get("accuracy") == first[key]["eval"].get("accuracy")
        a, b = (tmp_path / "runs" / n / ("base" if key == "base" else "iter_0") for n in ("a", "b"))
        assert (a / "eval_samples.jsonl").read_bytes() == (b / "eval_samples.jsonl").read_bytes()
    assert "## Where the time goes" in (tmp_path / "runs" / "b" / "report.md").read_text()


def test_other_settings_or_weights_or_no_cache_evaluate_again(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, _own_eval_cache: Path
) -> None:
    counter = _Counter(monkeypatch)
    _run(tmp_path, tiny_model_dir, "a")
    assert counter.calls == 2
    # other eval settings: both evaluations again
    other = _run(tmp_path, tiny_model_dir, "b", **{"eval.max_new_tokens": 5})
    assert counter.calls == 4 and "cached" not in other["base"]["eval"]
    # other training (other weights at iteration 0): the start model's evaluation is reused, not iteration 0's
    trained = _run(tmp_path, tiny_model_dir, "c", **{"train.lr": 0.01})
    assert counter.calls == 5
    assert trained["base"]["eval"]["cached"] and "cached" not in trained["0"]["eval"]
    # turned off: computed, and nothing new kept
    kept = sorted(p.name for p in _own_eval_cache.iterdir())
    off = _run(tmp_path, tiny_model_dir, "d", **{"eval.cache": "false"})
    assert counter.calls == 7 and "cached" not in off["base"]["eval"]
    assert sorted(p.name for p in _own_eval_cache.iterdir()) == kept


def test_the_timings_of_every_stage_are_recorded(tmp_path: Path, tiny_model_dir: Path) -> None:
    stages = _run(tmp_path, tiny_model_dir, "a")["0"]
    for stage in ("generate", "score", "train", "eval"):
        assert stages[stage]["wall_s"] > 0, stage
    gen = stages["generate"]
    assert gen["tokens_per_s"] == pytest.approx(gen["rows"] * gen["mean_length"] / gen["wall_s"], rel=0.01)


def test_the_weights_hash_leaves_out_the_run_config_and_nothing_else(tmp_path: Path) -> None:
    from spaceft.rundir import file_hash, file_hashes

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "spaceft_config.yaml").write_text("name: a\n")
    full, weights = file_hashes(model, without="spaceft_config.yaml")
    assert full == file_hash(model) != weights
    (model / "spaceft_config.yaml").write_text("name: b\n")
    assert file_hashes(model, without="spaceft_config.yaml") == (file_hash(model), weights)
    assert file_hash(model) != full
    (model / "model.safetensors").write_bytes(b"weightz")
    assert file_hashes(model, without="spaceft_config.yaml")[1] != weights


def test_only_spaceft_bench_tasks_are_cacheable() -> None:
    from spaceft.evalcache import cacheable

    assert cacheable({"lm_eval_tasks": []}) and cacheable({"lm_eval_tasks": ["arc_easy", "ifeval"]})
    assert not cacheable({"lm_eval_tasks": ["arc_easy", "tasks/mine.yaml"]})  # its file may change
    assert not cacheable({"lm_eval_tasks": ["truthfulqa_mc2"]})  # read from the datasets cache


def _evaluated(tmp_path: Path, outputs: bytes = b"parts") -> Path:
    """An iteration directory as an evaluation leaves it: eval.json and eval_outputs.parquet."""
    out = tmp_path / "iter"
    out.mkdir(exist_ok=True)
    (out / "eval.json").write_text('{"nll": 1}')
    (out / "eval_outputs.parquet").write_bytes(outputs)
    return out


def test_an_entry_holds_what_the_evaluation_wrote_and_the_first_one_stays(
    _own_eval_cache: Path, tmp_path: Path
) -> None:
    from spaceft import evalcache

    out = _evaluated(tmp_path)
    (out / "eval_samples.jsonl").write_text("stale, from an older evaluation\n")
    evalcache.store("k", out, ["eval.json", "eval_outputs.parquet"])
    entry = evalcache.lookup("k")
    assert entry is not None
    assert sorted(p.name for p in entry.iterdir()) == ["eval.json", "eval_outputs.parquet", "files.json"]
    (out / "eval.json").write_text('{"nll": 2}')
    evalcache.store("k", out, ["eval.json", "eval_outputs.parquet"])
    assert (entry / "eval.json").read_text() == '{"nll": 1}'
    # restoring replaces the stale file beside it with the entry's (which has none)
    evalcache.restore(entry, out)
    assert not (out / "eval_samples.jsonl").exists() and (out / "eval.json").read_text() == '{"nll": 1}'


def test_a_resumed_stage_says_so_and_claims_no_tokens_per_second(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"name": "a", "selfplay.iterations": 1}
    monkeypatch.setenv("SPACEFT_FAULT", "generate:1")  # stop after the first of two generation batches
    with pytest.raises(InjectedFault):
        main(["run", "tiny", *tiny_overrides(tmp_path, tiny_model_dir, **over)])
    monkeypatch.delenv("SPACEFT_FAULT")
    stages = _run(tmp_path, tiny_model_dir, "a")["0"]
    assert stages["generate"]["resumed"] is True and "tokens_per_s" not in stages["generate"]
    assert "resumed" not in stages["score"] and stages["score"]["wall_s"] > 0
    report = (tmp_path / "runs" / "a" / "report.md").read_text()
    assert " resumed |" in report


def test_two_runs_storing_one_key_at_once_never_swap_the_entry(
    _own_eval_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both runs missed the lookup; the second one's store finds the first one's entry in place when it
    renames, keeps it and drops its own copy (a reader restoring it meanwhile never finds it missing)."""
    from spaceft import evalcache

    out = _evaluated(tmp_path, b"first")
    evalcache.store("k", out, ["eval.json", "eval_outputs.parquet"])
    entry = evalcache.lookup("k")
    assert entry is not None
    inode = entry.stat().st_ino
    (out / "eval_outputs.parquet").write_bytes(b"second")
    real_lookup = evalcache.lookup
    monkeypatch.setattr(evalcache, "lookup", lambda key: None)  # it missed before the first one stored
    evalcache.store("k", out, ["eval.json", "eval_outputs.parquet"])
    monkeypatch.setattr(evalcache, "lookup", real_lookup)
    assert entry.stat().st_ino == inode and (entry / "eval_outputs.parquet").read_bytes() == b"first"
    assert [p.name for p in _own_eval_cache.iterdir()] == ["k"]  # no temporary copy left behind


def test_an_entry_missing_a_listed_file_is_a_miss_and_is_stored_again(
    _own_eval_cache: Path, tmp_path: Path
) -> None:
    from spaceft import evalcache

    out = _evaluated(tmp_path)
    evalcache.store("k", out, ["eval.json", "eval_outputs.parquet"])
    entry = _own_eval_cache / "k"
    (entry / "eval_outputs.parquet").unlink()
    assert evalcache.lookup("k") is None
    evalcache.store("k", out, ["eval.json", "eval_outputs.parquet"])
    assert evalcache.lookup("k") == entry and (entry / "eval_outputs.parquet").read_bytes() == b"parts"
    (entry / "files.json").unlink()  # an entry written before entries listed their files
    assert evalcache.lookup("k") == entry


def test_the_key_names_the_cpu_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache shared by machines (a home directory on a cluster) must not hand one CPU's greedy outputs
    to another, whose kernels may round otherwise."""
    import torch

    from spaceft import evalcache

    def key() -> str:
        return evalcache.cache_key("0123456789abcdef", {"max_new_tokens": 8}, {"dtype": "float32"}, [[1, 2]],
                                   torch.device("cpu"), 1)  # fmt: skip

    assert evalcache.cpu_model()
    first = key()
    monkeypatch.setattr(evalcache, "cpu_model", lambda: "another CPU")
    assert key() != first


def test_a_store_removes_what_a_killed_store_left_behind(_own_eval_cache: Path, tmp_path: Path) -> None:
    import os
    import time

    from spaceft import evalcache

    _own_eval_cache.mkdir()
    old, fresh = _own_eval_cache / ".k.tmp-dead", _own_eval_cache / ".k.tmp-live"
    old.mkdir(), fresh.mkdir()
    two_hours_ago = time.time() - 2 * evalcache.STALE_S
    os.utime(old, (two_hours_ago, two_hours_ago))
    evalcache.store("k", _evaluated(tmp_path), ["eval.json", "eval_outputs.parquet"])
    assert evalcache.lookup("k") is not None and not old.exists() and fresh.exists()
