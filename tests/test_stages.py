"""The stage table (spaceft/stages.py) is the one place the stage graph is written: the driver, the
stage functions, done / stale / redo, the costs and the report read it, and no module keeps its own copy."""

from __future__ import annotations

import ast
from pathlib import Path

from spaceft import report, runstate, selfplay, stage_fns, stages
from spaceft.config import RunConfig
from spaceft.configfile import config_from_dict
from spaceft.rundir import Manifest, file_hash
from spaceft.stages import STAGES, TABLE, Step
from spaceft.workspace import Workspace

PACKAGE = Path(__file__).resolve().parents[1] / "spaceft"


def _cfg(tmp_path: Path, **selfplay_settings: object) -> RunConfig:
    return config_from_dict({"data": {"train": "x.jsonl", "eval": "y.jsonl"}, "output_dir": str(tmp_path),
                             "generation": {"allow_biased_sampling": True},  # (resample=false)
                             "selfplay": {"iterations": 2, **selfplay_settings}})  # fmt: skip


def test_every_list_of_stages_is_the_table() -> None:
    assert selfplay.STAGES is STAGES and report.TIMED_STAGES is STAGES
    assert tuple(stage_fns.STAGE_FNS) == STAGES == ("generate", "score", "train", "eval")
    assert selfplay.RANKS == {s.name: s.ranks for s in TABLE}


def test_no_other_module_writes_the_stage_order() -> None:
    """A literal tuple or list of exactly the stage names outside stages.py is a second copy of the order."""
    copies = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "stages.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Tuple | ast.List) and node.elts:
                values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                if len(values) == len(node.elts) and tuple(values) == STAGES:
                    copies.append(f"{path.name}:{node.lineno}")
    assert copies == []


def test_the_plan_follows_the_table(tmp_path: Path) -> None:
    """resample=false: only iteration 0 samples; every iteration is scored, trained and evaluated, after
    the start model's evaluation; finished steps are left out."""
    cfg = _cfg(tmp_path, resample=False)
    manifest = Manifest(tmp_path / "manifest.json", {"iterations": {}})
    ws = Workspace(cfg, manifest, "start", None, [], [])
    expected = ["eval base", "generate 0", "score 0", "train 0", "eval 0", "score 1", "train 1", "eval 1"]
    assert [f"{s.stage} {s.iteration}" for s in selfplay.plan(ws)] == expected
    manifest.mark_done(0, "generate")
    assert Step("generate", 0) not in selfplay.plan(ws)
    assert selfplay.plan(ws, "generate", 1) == []  # the table says iteration 1 samples nothing


def test_sources_and_needs(tmp_path: Path) -> None:
    assert stages.sources(_cfg(tmp_path).selfplay, 1) == [1]
    assert stages.sources(_cfg(tmp_path, mix_previous=True).selfplay, 1) == [1, 0]
    assert stages.sources(_cfg(tmp_path, resample=False).selfplay, 1) == [0]
    mixing = _cfg(tmp_path, mix_previous=True)
    score, train = stages.BY_NAME["score"], stages.BY_NAME["train"]
    assert score.needs(mixing, 1) == [(0, "train"), (1, "generate"), (0, "generate")]
    assert train.needs(mixing, 1) == [(0, "train"), (1, "generate"), (0, "generate"), (1, "score")]
    assert stages.BY_NAME["eval"].needs(mixing, 1) == [(1, "train")]


def _finished_iteration_0(cfg: RunConfig) -> tuple[Manifest, Path]:
    samples = cfg.run_dir / "iter_0" / "synthetic.parquet"
    samples.parent.mkdir(parents=True)
    samples.write_bytes(b"rows" * 100)
    m = Manifest.open(cfg.run_dir)
    m.data["fingerprint"] = cfg.training_fingerprint()
    for stage in STAGES:
        m.mark_done(0, stage, **({"hash": file_hash(samples)} if stage == "generate" else {}))
    m.mark_done(1, "generate")
    samples.write_bytes(b"rows" * 50)  # truncated since
    return m, samples


def test_a_damaged_output_is_redone_only_when_a_pending_stage_reads_it(tmp_path: Path) -> None:
    """Iteration 0 is finished and its samples are truncated; iteration 1 is still to score and train.
    With mixing, iteration 1 reads iteration 0's samples (sources [1, 0]): they are redone, and all built
    on them. Without, nothing pending reads them: they are not even hashed, and stay done."""
    mixing = _cfg(tmp_path / "mix", mix_previous=True)
    m, _ = _finished_iteration_0(mixing)
    runstate.verify_pending_inputs(m, mixing)
    assert [r.stage for r in m.records()] == []  # generate 0 and everything after it, iteration 1 too
    plain = _cfg(tmp_path / "plain")
    m, _ = _finished_iteration_0(plain)
    runstate.verify_pending_inputs(m, plain)
    assert all(m.is_done(0, s) for s in STAGES) and m.is_done(1, "generate")


def test_invalidation_removes_the_tables_outputs_from_the_stage_on(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    m = Manifest.open(cfg.run_dir)
    for t in (0, 1):
        for s in TABLE:
            for name in s.outputs:
                (cfg.run_dir / f"iter_{t}" / name).mkdir(parents=True)
            m.mark_done(t, s.name)
    runstate.invalidate_from(m, cfg.run_dir, 0, "score")
    left = sorted(p.name for p in (cfg.run_dir / "iter_0").iterdir())
    assert left == sorted(stages.BY_NAME["generate"].outputs)
    assert not (cfg.run_dir / "iter_1").exists()
    assert [(r.iteration, r.stage) for r in m.records()] == [(0, "generate")]
    runstate.invalidate_from(m, cfg.run_dir, 0, "eval")  # nothing reads an evaluation: nothing else goes
    assert [(r.iteration, r.stage) for r in Manifest.open(cfg.run_dir).records()] == [(0, "generate")]


def test_the_manifests_records(tmp_path: Path) -> None:
    m = Manifest.open(tmp_path)
    m.mark_done(1, "train", hash="h1")
    m.mark_done("base", "eval")
    m.mark_running(0, "train", processes=2)
    assert [(r.iteration, r.stage, r.done) for r in m.records()] == [
        ("base", "eval", True), (0, "train", False), (1, "train", True)
    ]
    assert m.opponent_hash(2, "start") == "h1" and m.opponent_hash(0, "start") == "start"
    m.drop_after(0)
    assert m.iterations() == [0] and Manifest.open(tmp_path).stage(0, "train") == {"status": "running",
                                                                                    "processes": 2}
