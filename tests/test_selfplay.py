"""End to end: `spaceft run` on a tiny random model — artefacts, log lines, resume, stale config, report."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spaceft.cli import main
from spaceft.rundir import InjectedFault, read_json, read_table

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow
RUN = "tiny-space"


def _run(tmp: Path, model_dir: Path, *extra: str, command: str = "run", **overrides: object) -> int:
    return main([command, "tiny", *tiny_overrides(tmp, model_dir, **overrides), *extra])


def _weights(run_dir: Path, t: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"iter_{t}" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One uninterrupted 2-iteration SPACE run."""
    tmp = tmp_path_factory.mktemp("ref")
    assert _run(tmp, tiny_model_dir) == 0
    return tmp / "runs" / RUN


def test_run_writes_every_artefact(reference: Path) -> None:
    manifest = read_json(reference / "manifest.json")
    for t in ("0", "1"):
        assert set(manifest["iterations"][t]) == {"generate", "score", "train", "eval"}
        assert all(v["status"] == "done" for v in manifest["iterations"][t].values())
    assert manifest["iterations"]["base"]["eval"]["status"] == "done"
    assert manifest["config"]["train"]["loss"] == "space"
    assert {"torch", "transformers", "accelerate"} <= set(manifest["versions"])
    for t in (0, 1):
        d = reference / f"iter_{t}"
        syn = read_table(d / "synthetic.parquet")
        assert sorted(r["prompt_index"] for r in syn) == list(range(8))  # K = 1, no duplicates
        opp = read_table(d / "opponent_logps.parquet")
        assert len(opp) == 16 and all(math.isfinite(r["logp"]) and r["logp"] < 0 for r in opp)
        assert {"nll", "accuracy", "n"} <= set(read_json(d / "eval.json"))
        AutoModelForCausalLM.from_pretrained(d / "model")  # a normal HF model directory
        assert "loss: space" in (d / "model" / "spaceft_config.yaml").read_text()
        assert not (d / "train_state").exists()
    for name in ("report.md", "rewards.png", "eval.png"):
        assert (reference / name).stat().st_size > 0


def test_rewards_start_at_zero_and_loss_falls(reference: Path) -> None:
    for t in (0, 1):
        lines = [json.loads(x) for x in (reference / f"iter_{t}" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines] == [1, 2, 3, 4]
        # step 1 sees policy == opponent: r = 0, so L = softplus(0) + softplus(0) = 2 ln 2 (mu = 1)
        assert lines[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)
        assert abs(lines[0]["rewards/real"]) < 1e-5 and abs(lines[0]["rewards/synthetic"]) < 1e-5
        second_epoch = lines[2:]
        assert max(m["loss"] for m in second_epoch) < lines[0]["loss"]
        assert all(m["rewards/real"] > m["rewards/synthetic"] for m in second_epoch)


@pytest.mark.parametrize("fault", ["generate:1", "score:1", "train:3"])
def test_resume_after_a_crash_is_bit_identical(
    fault: str, reference: Path, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPACEFT_FAULT", fault)
    with pytest.raises(InjectedFault):
        _run(tmp_path, tiny_model_dir)
    monkeypatch.delenv("SPACEFT_FAULT")
    assert _run(tmp_path, tiny_model_dir) == 0
    run_dir = tmp_path / "runs" / RUN
    for t in (0, 1):
        ref, got = _weights(reference, t), _weights(run_dir, t)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), f"iteration {t} weights differ after {fault}"
        assert read_table(run_dir / f"iter_{t}" / "synthetic.parquet") == read_table(
            reference / f"iter_{t}" / "synthetic.parquet"
        )
        steps = [
            json.loads(x)["step"] for x in (run_dir / f"iter_{t}" / "metrics.jsonl").read_text().splitlines()
        ]
        assert steps == [1, 2, 3, 4]  # a resumed epoch logs no step twice


def test_stale_config_is_refused_unless_forced(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1}) == 0
    mtime = (tmp_path / "runs" / RUN / "iter_0" / "model" / "model.safetensors").stat().st_mtime_ns
    # same config again: everything is reused
    assert _run(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1}) == 0
    assert (tmp_path / "runs" / RUN / "iter_0" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert _run(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1, "train.lr": 0.01}) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "train.lr: 0.0003 -> 0.01" in err and "--force" in err
    assert _run(tmp_path, tiny_model_dir, "--force", **{"selfplay.iterations": 1, "train.lr": 0.01}) == 0
    manifest_path = tmp_path / "runs" / RUN / "manifest.json"
    assert read_json(manifest_path)["config"]["train"]["lr"] == 0.01
    # a run made by an older spaceft that lacked a field (here train.gamma) is not stale
    manifest = read_json(manifest_path)
    del manifest["config"]["train"]["gamma"]
    manifest_path.write_text(json.dumps(manifest))
    model_file = tmp_path / "runs" / RUN / "iter_0" / "model" / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns
    assert _run(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1, "train.lr": 0.01}) == 0
    assert model_file.stat().st_mtime_ns == mtime


def test_sft_skips_generation_and_scoring(tmp_path: Path, tiny_model_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    assert (
        _run(tmp_path, tiny_model_dir, **{"train.loss": "sft", "selfplay.iterations": 1, "name": "sft"}) == 0
    )
    d = tmp_path / "runs" / "sft" / "iter_0"
    assert (d / "model" / "model.safetensors").exists()
    assert not (d / "synthetic.parquet").exists() and not (d / "opponent_logps.parquet").exists()
    assert "run sft: sft, 1 iteration(s), 8 training pairs, 4 held-out" in caplog.text


def test_report_command(reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "| iter | held-out acc | held-out NLL |" in out
    assert "| base |" in out and "| 1 |" in out
    assert main(["report", str(reference / "nope")]) == 2


def test_rerunning_a_stage_invalidates_what_was_built_on_it(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    over = {"selfplay.iterations": 2, "eval.enabled": False}
    assert _run(tmp_path, tiny_model_dir, **over) == 0
    manifest = tmp_path / "runs" / RUN / "manifest.json"
    assert set(read_json(manifest)["iterations"]) == {"0", "1"}
    assert _run(tmp_path, tiny_model_dir, "--iteration", "0", command="generate", **over) == 0
    its = read_json(manifest)["iterations"]
    assert set(its) == {"0"} and set(its["0"]) == {"generate"}  # score, train and iteration 1 are stale
    capsys.readouterr()
    assert _run(tmp_path, tiny_model_dir, "--iteration", "0", command="train", **over) == 2
    assert "train of iteration 0 needs score of iteration 0" in capsys.readouterr().err


def test_demo_recipe_smoke_run_on_a_tiny_model(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`spaceft demo` (the recipe `make demo` runs) end to end, with the tiny model in place of SmolLM2."""
    over = tiny_overrides(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1, "data.train_size": 4,
                                                        "data.max_prompt_tokens": 512})  # fmt: skip
    assert main(["demo", *over, "-v"]) == 0  # global flags may follow the overrides
    out = capsys.readouterr().out
    assert "# spaceft demo" in out and "name: demo-space" in out  # -v prints the resolved config
    assert "| base |" in out and "| 0 |" in out
    run_dir = tmp_path / "runs" / "demo-space"
    assert read_json(run_dir / "manifest.json")["config"]["train"]["loss"] == "space"
    assert (run_dir / "report.md").exists() and (run_dir / "iter_0" / "eval.json").exists()
