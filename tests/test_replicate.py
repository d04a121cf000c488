"""The replication grid runner (experiments/replicate.py) on the tiny random model, in-process: order,
validation-only tuning, adoption of the tuned seed-0 run, compute matching, resume, tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spaceft.configfile import load_config
from spaceft.rundir import read_json
from spaceft.selfplay import run
from spaceft.tasks import make_arithmetic

from .conftest import load_experiment

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_experiment("replicate")


rep = _module()


def _spec(tmp: Path, model_dir: Path):
    return rep.GridSpec(
        out=tmp / "grid",
        recipe="tiny",  # a shipped recipe by name, as the grid passes `demo`
        sizes=[4],
        seeds=[0],
        iterations=1,
        eval_size=4,
        val_size=4,
        lrs=[3e-4],
        methods=["sft", "space"],
        questions=["sft-matched"],
        extra=[
            f"model.name={model_dir}",
            "generation.max_new_tokens=8",
            "generation.batch_size=4",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.save_every=0",
            "eval.max_new_tokens=6",
            "eval.batch_size=4",
            "logging.progress=false",
        ],
    )


def test_settings_cross_learning_rates_with_the_method_knob() -> None:
    spec = rep.GridSpec(out=Path("x"), lrs=[1e-5, 3e-6])
    spin = spec.settings("spin")
    assert [label for label, _ in spin] == [
        "lr1e-05-beta0.1",
        "lr1e-05-beta1",
        "lr3e-06-beta0.1",
        "lr3e-06-beta1",
    ]
    assert spin[1][1] == ("train.lr=1e-05", "train.lr_after=5e-06", "train.beta=1.0")
    assert [label for label, _ in spec.settings("space")] == ["lr1e-05", "lr3e-06"]


def test_grid_runs_in_order_adopts_the_tuned_run_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = _spec(tmp_path, tiny_model_dir)
    calls: list[tuple[str, bool]] = []

    def launch(name: str, overrides: list[str], force: bool):
        calls.append((name, force))
        run(load_config(spec.recipe, overrides), force=force)
        return rep.Launch(1.5, None, 0.5)

    grid = rep.Grid(spec, launch)
    grid.run()
    assert calls == [
        ("start-N4", False),
        ("tune-space-lr0.0003-N4", False),
        ("tune-sft-lr0.0003-N4", False),
        ("space-N4-s0", True),  # adopted: only its evaluations run (hence --force)
        ("sft-N4-s0", True),
        ("sft-matched-N4-s0", False),
    ]
    out = spec.out
    # tuning evaluated on the validation split, the final runs on test
    tune = read_json(out / "tune-space-lr0.0003-N4" / "manifest.json")
    assert tune["config"]["data"]["eval"].endswith("arithmetic_validation_4_seed0.jsonl")
    final = read_json(out / "space-N4-s0" / "manifest.json")
    assert final["config"]["data"]["eval"] == "builtin:arithmetic"
    test_prompts = {r["messages"][0]["content"] for r in make_arithmetic(4, seed=0, split="test")}
    used = [json.loads(x) for x in (out / "space-N4-s0" / "data" / "arithmetic_test_4_seed0.jsonl").open()]
    assert {r["messages"][0]["content"] for r in used} == test_prompts
    # the adopted run shares the tuned run's model files (not retrained) and has its own evaluations
    a = out / "tune-space-lr0.0003-N4" / "iter_0" / "model" / "model.safetensors"
    b = out / "space-N4-s0" / "iter_0" / "model" / "model.safetensors"
    assert a.stat().st_ino == b.stat().st_ino
    assert final["iterations"]["0"]["train"]["hash"] == tune["iterations"]["0"]["train"]["hash"]
    assert (out / "space-N4-s0" / "iter_0" / "eval_samples.jsonl").exists()
    assert (out / "tune-space-lr0.0003-N4" / "iter_0" / "eval.json").exists()  # the tuning run kept its own
    # tuning chose per method, from validation numbers
    assert grid.state["best"]["space"]["run"] == "tune-space-lr0.0003-N4"
    assert 0 <= grid.state["best"]["space"]["val_accuracy"] <= 1
    # SFT got SPACE's compute: epochs = round(SPACE's per-iteration compute / one SFT epoch's)
    matched = read_json(out / "sft-matched-N4-s0" / "manifest.json")["config"]["train"]["epochs"]
    assert matched == grid.state["matched_epochs"]["4"] > 1
    # wall time and invocations recorded; the tables exist
    assert grid.state["runs"]["space-N4-s0"]["wall_s"] == 1.5
    assert grid.state["runs"]["space-N4-s0"]["invocations"] == 1
    assert grid.state["runs"]["space-N4-s0"]["cpu_s"] == 0.5
    md = (out / "results.md").read_text()
    assert "### Q2: SPACE on N = 4 against SFT on N, on N with SPACE's compute and on 4N\n" in md
    assert "| space-N4 | 1 |" in md and "sft-matched-N4" in md
    assert (out / "results.png").stat().st_size > 0
    assert "| space-N4 | 1 |" in md.split("### Cost per run")[1]
    assert "## Diagnostics per iteration" in (out / "space-N4-s0" / "report.md").read_text()
    # a second invocation finds everything finished and launches nothing
    calls.clear()
    again = rep.Grid(spec, launch)
    again.run()
    assert calls == [] and again.launched == 0
    # a further size gets its own trajectories and diagnostics (N = 8 here: the N = 4 runs once more)
    state = json.loads(json.dumps(grid.state))
    for name in ("space-N4-s0", "sft-N4-s0"):
        alias = name.replace("-N4-", "-N8-")
        (out / alias).symlink_to(out / name)
        group = state["runs"][name]["group"].replace("-N4", "-N8")
        state["runs"][alias] = {**state["runs"][name], "group": group, "n": 8}
    rep.write_results(out, state, spec.iterations)
    md = (out / "results.md").read_text()
    q1 = md.split("### Q1")[1].split("### Q2")[0]
    assert "#### Held-out exact match (N = 8)" in q1 and "| space | 1 |" in q1.split("(N = 8)")[1]
    assert "### Q2: SPACE on N = 8 against SFT on N\n" in md
    assert "| space-N8 | 1 |" in md.split("### Diagnostics per iteration")[1].split("### Cost")[0]


def test_selection_prefers_accuracy_then_nll(tmp_path: Path) -> None:
    for name, correct, logp in (
        ("a", [1, 0, 0, 0], -1.0),
        ("b", [1, 1, 0, 0], -9.0),
        ("c", [1, 1, 0, 0], -2.0),
    ):
        d = tmp_path / name / "iter_0"
        d.mkdir(parents=True)
        d.joinpath("eval_samples.jsonl").write_text(
            "".join(json.dumps({"correct": bool(c), "logp": logp, "tokens": 2}) + "\n" for c in correct)
        )
    best = rep.select(tmp_path, [(n, n, (f"train.lr={i}",)) for i, n in enumerate("abc")], iterations=1)
    assert best["run"] == "c" and best["val_accuracy"] == 0.5 and best["val_nll"] == 1.0
    assert best["overrides"] == ["train.lr=2"]


def _fake_run(root: Path, name: str, correct: list[list[int]]) -> dict[int, Path]:
    """Finished one-iteration runs, one per seed, with the given per-problem correctness."""
    runs = {}
    for seed, row in enumerate(correct):
        d = root / f"{name}-s{seed}"
        (d / "iter_0").mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"iterations": {"0": {"eval": {"status": "done"}}}}))
        lines = [json.dumps({"correct": bool(c), "logp": -2.0, "tokens": 2}) for c in row]
        (d / "iter_0" / "eval_samples.jsonl").write_text("\n".join(lines) + "\n")
        runs[seed] = d
    return runs


def test_comparison_table_pairs_on_problems_and_marks_clear_differences(tmp_path: Path) -> None:
    """a solves all 200 problems on both seeds, b the first 100 on both: Δ accuracy = -0.5. Paired,
    b - a is -1 on the last 100 problems and 0 elsewhere, so a replicate's Δ is -X/200 with
    X ~ Binomial(200, 1/2) (the two seeds are identical): the interval is about -0.5 ± 1.96·√(.25/200) =
    [-0.569, -0.431], clear of 0 (marked *). NLL is 1.0 everywhere (logp -2 over 2 tokens): Δ NLL [0, 0]."""
    tables = rep.sys.modules["replicate_tables"]
    a = _fake_run(tmp_path, "a", [[1] * 200, [1] * 200])
    b = _fake_run(tmp_path, "b", [[1] * 100 + [0] * 100, [1] * 100 + [0] * 100])
    state = {"runs": {}}
    for label, runs in (("a", a), ("b", b)):
        for seed, d in runs.items():
            costs = [{"forwarded": 10, "trained": 20, "compute": 70}]
            state["runs"][d.name] = {"group": label, "seed": seed, "n": 4, "wall_s": 3.0, "invocations": 1,
                                     "peak_rss_mb": 2048.0, "costs": costs}  # fmt: skip
    g = tables.groups(tmp_path, state, iterations=1)
    assert set(g) == {"a", "b"} and len(g["a"]) == 2
    lines = tables.comparison_table(tmp_path, state, g, ["a", "b", "c"], "a", iterations=1)
    assert lines[2].startswith(
        "| a | 2 | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |  |  | 70 | 20 | 3 | 2.00 |"
    )
    assert "| b | 2 | 0.500 [" in lines[3]
    cells = [c.strip() for c in lines[3].split("|")]
    d_acc = [
        float(x) for x in cells[5].rstrip(" *").replace("[", "").replace("]", "").replace(",", "").split()
    ]
    assert cells[5].endswith("*") and d_acc[0] == -0.5
    assert -0.585 < d_acc[1] < -0.55 and -0.45 < d_acc[2] < -0.415
    assert cells[6] == "+0.000 [+0.000, +0.000]"
    assert lines[4] == "| c | 0 | not run yet |  |  |  |  |  |  |  |"


def test_archive_keeps_finished_runs_across_machines(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A grid run with --archive, then three fresh output directories fed the same archive, as a new
    machine with a clone of the repository would be: the whole archive (only the start is retrained, and
    the tables come out identical), an archive missing two runs (only they run, the seed-0 final without
    the tuned run's models is trained anew, to the same weights), and an archive whose start model was
    other weights (refused)."""
    import shutil

    first = _spec(tmp_path / "a", tiny_model_dir)
    first.archive = tmp_path / "archive"
    calls: list[tuple[str, bool]] = []

    def launch(name: str, overrides: list[str], force: bool):
        calls.append((name, force))
        run(load_config(first.recipe, overrides), force=force)
        return rep.Launch(1.5, None, 0.5)

    rep.Grid(first, launch).run()
    archive = first.archive
    runs = sorted(p.name for p in archive.iterdir() if p.is_dir())
    assert runs == ["sft-N4-s0", "sft-matched-N4-s0", "space-N4-s0", "start-N4", "tune-sft-lr0.0003-N4",
                    "tune-space-lr0.0003-N4"]  # fmt: skip
    assert [p.name for p in (archive / "start-N4").iterdir()] == ["manifest.json"]  # no weights
    assert not list(archive.rglob("*.safetensors")) and not list(archive.rglob("*.parquet"))
    assert (archive / "space-N4-s0" / "iter_0" / "eval_samples.jsonl.gz").exists()

    # 1. everything archived: only the start model is trained again; the same tables
    calls.clear()
    whole = _spec(tmp_path / "b", tiny_model_dir)
    whole.archive = archive
    rep.Grid(whole, launch).run()
    assert calls == [("start-N4", False)]
    assert (whole.out / "results.md").read_text() == (first.out / "results.md").read_text()
    # ... and --report-only needs nothing but the archive (the grid that made it is gone)
    expected = (first.out / "results.md").read_text()
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    only = tmp_path / "e" / "grid"
    argv = ["--out", str(only), "--archive", str(archive), "--sizes", "4", "--seeds", "0",
            "--iterations", "1", "--methods", "sft", "space", "--report-only"]  # fmt: skip
    assert rep.main(argv) == 0
    assert (only / "results.md").read_text() == expected

    # 2. two runs missing from the archive: they run, and only they
    part = tmp_path / "part"
    shutil.copytree(archive, part)
    shutil.rmtree(part / "space-N4-s0")
    shutil.rmtree(part / "sft-matched-N4-s0")
    calls.clear()
    partial = _spec(tmp_path / "c", tiny_model_dir)
    partial.archive = part
    rep.Grid(partial, launch).run()
    assert calls == [("start-N4", False), ("space-N4-s0", False), ("sft-matched-N4-s0", False)]
    trained = read_json(partial.out / "space-N4-s0" / "manifest.json")["iterations"]["0"]["train"]["weights"]
    archived = read_json(archive / "space-N4-s0" / "manifest.json")["iterations"]["0"]["train"]["weights"]
    assert trained == archived
    assert (part / "space-N4-s0" / "manifest.json").exists()  # archived again once finished

    # 3. an archive made from another start model: refused before anything else runs
    other = tmp_path / "other"
    shutil.copytree(archive, other)
    manifest = read_json(other / "start-N4" / "manifest.json")
    manifest["iterations"]["0"]["train"]["weights"] = "0" * 64
    (other / "start-N4" / "manifest.json").write_text(json.dumps(manifest))
    calls.clear()
    wrong = _spec(tmp_path / "d", tiny_model_dir)
    wrong.archive = other
    with pytest.raises(RuntimeError, match="not the one the archived runs"):
        rep.Grid(wrong, launch).run()
    assert calls == [("start-N4", False)]
    assert sorted(p.name for p in wrong.out.iterdir() if p.is_dir()) == ["start-N4"]  # nothing restored


def test_diagnostics_cells_are_the_mean_and_the_range_of_the_seeds(tmp_path: Path) -> None:
    """With 3 seeds a percentile bootstrap over seeds returns the lowest and highest seed anyway; the
    table says so rather than call that a 95% interval."""
    import json

    tables = load_experiment("replicate_tables")
    runs = {}
    for seed, reward in enumerate([0.5, -1.0, 2.0]):
        run = tmp_path / f"space-s{seed}"
        run.mkdir()
        (run / tables.DIAGNOSTICS).write_text(json.dumps([{"reward_real": reward, "identical": 0.25}]))
        runs[seed] = run
    lines = tables.diagnostics_tables({"space-N16": runs}, ["space-N16"], 1)
    row = lines[2].split(" | ")
    assert row[:3] == ["| space-N16", "1", "3"]
    assert row[5] == "+0.50 [-1.00, +2.00]" and row[7] == "0.25 [0.25, 0.25]"


def test_prune_keeps_start_models_last_iterations_and_models_still_to_be_adopted(tmp_path: Path) -> None:
    spec = rep.GridSpec(out=tmp_path / "grid", seeds=[0, 1], iterations=2)
    grid = rep.Grid(spec, lambda *a: rep.Launch(0.0, None))

    def make(name: str, group: str, iterations: int = 2, done: bool = True) -> None:
        stages = {"train": {"status": "done"}, "eval": {"status": "done"}}
        its = {str(t): stages for t in range(iterations)}
        its["base"] = {"eval": {"status": "done"}}
        if not done:
            its[str(iterations - 1)] = {"train": {"status": "running"}}
        (grid.run_dir(name)).mkdir(parents=True)
        (grid.run_dir(name) / "manifest.json").write_text(json.dumps({"iterations": its}))
        for t in range(iterations):
            (grid.run_dir(name) / f"iter_{t}" / "model").mkdir(parents=True)
        grid.state["runs"][name] = {"group": group}

    make("start-N16", "start", iterations=1)
    make("tune-space-lr1e-05-N16", "tune-space")  # the best: space-N16-s0 adopts it, not yet finished
    make("tune-space-lr3e-06-N16", "tune-space")
    make("tune-spin-lr1e-05-N16", "tune-spin")  # spin's best not chosen yet
    make("space-N16-s0", "space-N16", done=False)
    make("sft-N16-s1", "sft-N16")
    grid.state["best"]["space"] = {"run": "tune-space-lr1e-05-N16"}

    def models() -> set[str]:
        return {str(p.parent.relative_to(grid.out)) for p in grid.out.glob("*/iter_*/model")}

    grid.prune()
    kept = {
        "start-N16/iter_0",
        "tune-space-lr1e-05-N16/iter_0",
        "tune-space-lr1e-05-N16/iter_1",
        "tune-space-lr3e-06-N16/iter_1",
        "tune-spin-lr1e-05-N16/iter_0",
        "tune-spin-lr1e-05-N16/iter_1",
        "space-N16-s0/iter_0",
        "space-N16-s0/iter_1",
        "sft-N16-s1/iter_1",
    }
    assert models() == kept
    # the adopting run finished: the tuned run's models go too, and the adopting run's earlier ones
    shutil.rmtree(grid.run_dir("space-N16-s0"))
    make("space-N16-s0", "space-N16")
    grid.prune()
    assert models() == kept - {"tune-space-lr1e-05-N16/iter_0", "space-N16-s0/iter_0"}
    # a run with more iterations than the grid's keeps its own last model
    make("sft-N16-s3", "sft-N16", iterations=3)
    grid.prune()
    assert {m for m in models() if m.startswith("sft-N16-s3")} == {"sft-N16-s3/iter_2"}
    # --keep-models prunes nothing
    keep = rep.Grid(rep.GridSpec(out=tmp_path / "grid2", iterations=2, keep_models=True), grid.launch)
    keep.state = grid.state
    keep.out = grid.out
    make("sft-N16-s2", "sft-N16")
    keep.prune()
    assert "sft-N16-s2/iter_0" in models()
