"""The preregistered grid driver (experiments/preregistered.py): its plan against the preregistration,
every planned setting against the config schema, and a smoke run on the tiny model (start chosen on
validation NLL, tuning on the mean over iterations, finals on test, divergence diagnostics, pruning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spaceft.configfile import load_config
from spaceft.rundir import read_json
from spaceft.selfplay import run

from .conftest import load_experiment

pre = load_experiment("preregistered")
rep = load_experiment("replicate")


def test_the_plan_is_the_preregistered_design() -> None:
    d = pre.Design()
    assert d.global_batch >= 8 and d.steps_per_iteration() == 32 >= 30
    assert d.iterations == 5 and len(d.lrs) >= 4
    assert not set(d.tuning_seeds) & set(d.final_seeds)
    # the warm-up: ceil(0.34 × 32) = 11 steps >= 10
    assert -(-d.warmup_ratio * d.steps_per_iteration() // 1) == 11
    rows = pre.plan(d)
    tier1 = {r["name"] for r in rows if r["tier"] == 1 and r["kind"] == "final"}
    assert tier1 == {
        f"arithmetic-{a}-s{s}" for a in ("space", "spin-b0.1", "spin-tuned", "sft-matched") for s in (0, 1, 2)
    }
    arms = {r["name"].rsplit("-s", 1)[0] for r in rows if r["kind"] == "final"}
    for arm in ("space-k4", "sft-4N", "space-reuse", "ipo", "simpo", "tspin"):
        assert f"arithmetic-{arm}" in arms
    assert {"worded-space", "worded-space-k4", "worded-sft-matched"} <= arms
    # tier order: the primary arms first
    assert [r["tier"] for r in rows] == sorted(r["tier"] for r in rows)


def test_neighbours_on_the_half_decade_ladder() -> None:
    assert pre.neighbours(3e-6) == pytest.approx((1e-6, 1e-5))
    assert pre.neighbours(1e-5) == pytest.approx((3e-6, 3e-5))
    assert pre.neighbours(3e-5) == pytest.approx((1e-5, 1e-4))


def test_every_planned_setting_loads_under_the_schema(tmp_path: Path) -> None:
    grid = pre.Preregistered(pre.Design(out=tmp_path), lambda *a: rep.Launch(0.0, None))
    for task in pre.TASKS:
        for family, fixed in pre.FAMILIES.items():
            cfg = load_config(
                "demo", [*grid.base(task), *fixed, *pre.lr_overrides(1e-5), *grid.validation(task)]
            )
            assert cfg.train.global_batch_size == 8 and cfg.train.warmup_ratio == 0.34, family
            assert cfg.eval.task_metric == "none" and cfg.train.mixed_precision == "bf16"
        for arm in pre.ARMS:
            overrides = [*grid.base(task, arm.data_scale), *pre.FAMILIES[arm.families[0]], *arm.extra]
            cfg = load_config("demo", [*overrides, *grid.test(task)])
            assert cfg.data.train_size == 64 * arm.data_scale
    k4 = load_config("demo", [*grid.base("arithmetic"), *pre.FAMILIES["space"], "generation.num_samples=4"])
    assert (k4.generation.num_samples, k4.train.mu) == (4, 1.0)


@pytest.mark.slow
def test_smoke_grid_on_the_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    design = pre.Design(
        out=tmp_path / "grid",
        recipe="tiny",
        n=4,
        global_batch=2,
        epochs=1,
        iterations=2,
        lrs=(3e-4, 1e-3),
        max_extensions=0,
        tuning_seeds=(100,),
        final_seeds=(0,),
        start_epochs=2,
        eval_size=4,
        val_size=4,
        tasks=("arithmetic",),
        max_tier=1,
        arms=("space", "sft-matched"),
        extra=[
            f"model.name={tiny_model_dir}",
            "generation.max_new_tokens=8",
            "generation.batch_size=4",
            "train.micro_batch_size=2",
            "train.save_every=0",
            "eval.max_new_tokens=6",
            "eval.batch_size=4",
            "logging.progress=false",
        ],
    )
    calls: list[str] = []

    def launch(name: str, overrides: list[str], force: bool):
        calls.append(name)
        run(load_config("tiny", overrides), force=force)
        return rep.Launch(1.0, None, 0.5)

    grid = pre.Preregistered(design, launch)
    grid.run()
    assert calls == [
        "arithmetic-start",
        "arithmetic-tune-space-lr0.0003-s100",
        "arithmetic-tune-space-lr0.001-s100",
        "arithmetic-tune-sft-lr0.0003-s100",
        "arithmetic-tune-sft-lr0.001-s100",
        "arithmetic-space-s0",
        "arithmetic-sft-matched-s0",
    ]
    out = design.out
    # the start is the epoch with the lowest validation NLL
    nll = [read_json(out / "arithmetic-start" / f"iter_{t}" / "eval.json")["nll"] for t in range(2)]
    assert grid.state["starts"]["arithmetic"]["epoch"] == 1 + nll.index(min(nll))
    space = read_json(out / "arithmetic-space-s0" / "manifest.json")["config"]
    assert space["model"]["name"].endswith(f"arithmetic-start/iter_{nll.index(min(nll))}/model")
    # tuning: validation NLL only, chosen on the mean over iterations
    tune = read_json(out / "arithmetic-tune-space-lr0.001-s100" / "manifest.json")["config"]
    assert tune["eval"]["task_metric"] == "none" and "validation" in tune["data"]["eval"]
    means = {
        lr: sum(
            read_json(out / f"arithmetic-tune-space-lr{lr}-s100" / f"iter_{t}" / "eval.json")["nll"]
            for t in range(2)
        )
        / 2
        for lr in ("0.0003", "0.001")
    }
    assert f"{grid.state['tuned']['arithmetic/space']['lr']:g}" == min(means, key=means.get)
    assert space["train"]["lr"] == grid.state["tuned"]["arithmetic/space"]["lr"]
    assert "test" in space["data"]["eval"] and space["train"]["seed"] == 0
    # SFT given SPACE's compute, from SPACE's token counts
    matched = read_json(out / "arithmetic-sft-matched-s0" / "manifest.json")["config"]["train"]["epochs"]
    assert matched == grid.state["matched_epochs"]["arithmetic"] >= 1
    # divergence diagnostics: every step of every iteration logged
    div = json.loads((out / "divergence.json").read_text())["arithmetic-space-s0"]
    assert [row["steps"] for row in div] == [2, 2]  # 4 pairs / batch 2, 1 epoch
    assert all(row["peak_loss"] >= row["first_loss"] and row["peak_grad_norm"] > 0 for row in div)
    # tuning runs keep no models; finals keep their last iteration's; the start keeps all
    assert not list((out / "arithmetic-tune-space-lr0.001-s100").glob("iter_*/model"))
    assert [m.parent.name for m in (out / "arithmetic-space-s0").glob("iter_*/model")] == ["iter_1"]
    assert len(list((out / "arithmetic-start").glob("iter_*/model"))) == 2
    # resumable: a second invocation launches nothing
    calls.clear()
    pre.Preregistered(design, launch).run()
    assert calls == []
