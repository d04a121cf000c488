"""experiments/real_pairs.py without models: its benchmark plan, its archive (a fresh clone goes on with
what another machine finished) and its table (paired changes on the items both models answered)."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import load_experiment

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_experiment("real_pairs")


rp = _module()


def _args(out: Path, archive: Path | None):
    argv = ["--out", str(out), "--seeds", "0", "--methods", "space", "--iterations", "1",
            "--limit", "4", "--ifeval-limit", "2", "--eval-pairs", "2"]  # fmt: skip
    return rp.parse_args(argv + (["--archive", str(archive)] if archive else []))


def _fake_bench(part: Path, scores: dict[str, list[float]]) -> None:
    """What `spaceft bench --log-samples` leaves: bench.json and per-task per-item samples."""
    (part / "samples").mkdir(parents=True)
    (part / "bench.json").write_text("{}")
    for bench, values in scores.items():
        task, metric = rp.BENCH[bench]
        rows = [json.dumps({"doc_id": i, metric: v}) for i, v in enumerate(values)]
        (part / "samples" / f"{task}.jsonl").write_text("\n".join(rows) + "\n")


def test_trained_models_take_fewer_ifeval_items_in_their_own_call(tmp_path: Path) -> None:
    a = _args(tmp_path / "out", None)
    assert [(p.name, lim, bs) for p, lim, bs in rp.bench_parts(a, "start")] == [
        ("start", 4, ["ifeval", "arc_easy", "hellaswag"])
    ]
    assert [(p.name, lim, bs) for p, lim, bs in rp.bench_parts(a, "real-space-s0")] == [
        ("ifeval", 2, ["ifeval"]),
        ("arc_easy+hellaswag", 4, ["arc_easy", "hellaswag"]),
    ]


def test_archive_round_trip_and_paired_table(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    a = _args(tmp_path / "out", archive)
    _fake_bench(a.out / "bench" / "start", {"ifeval": [0, 0, 1, 1], "arc_easy": [0, 1, 0, 1],
                                            "hellaswag": [1, 1, 1, 1]})  # fmt: skip
    space = a.out / "bench" / "real-space-s0"
    _fake_bench(space / "ifeval", {"ifeval": [1, 1]})
    assert not rp.benched(a, "real-space-s0")  # half benchmarked is not finished
    _fake_bench(space / "arc_easy+hellaswag", {"arc_easy": [1, 1, 1, 1], "hellaswag": [1, 1, 1, 1]})
    assert rp.benched(a, "real-space-s0")
    run = a.out / "real-space-s0"
    for key, nll in (("base", 2.0), ("iter_0", 1.5)):
        (run / key).mkdir(parents=True)
        (run / key / "eval.json").write_text(json.dumps({"nll": nll}))
    (run / "manifest.json").write_text("{}")
    rp.save(a, "start")
    rp.save(a, "real-space-s0")
    assert (archive / "bench" / "real-space-s0" / "ifeval" / "samples" / "spaceft_ifeval.jsonl.gz").exists()
    assert not list(archive.rglob("*.jsonl"))  # every sample file compressed

    # a fresh output directory: everything comes back and counts as finished
    b = _args(tmp_path / "fresh", archive)
    rp.restore(b)
    assert rp.benched(b, "start") and rp.benched(b, "real-space-s0")
    for path in (a.out / "bench").rglob("*.jsonl"):
        assert (b.out / path.relative_to(a.out)).read_bytes() == path.read_bytes()
    table = rp.report(b)
    row = next(line for line in table.splitlines() if line.startswith("| space |"))
    # IFEval: items 0 and 1 only (the trained model's two), 0 → 1 on both: +100 points, n = 2;
    # ARC-Easy: 2 of 4 items gained: +50; HellaSwag: no change
    assert "100.0; change +100.0 [+100.0, +100.0] (n = 2)" in row
    assert "100.0; change +50.0" in row and "(n = 4)" in row
    assert "100.0; change +0.0 [+0.0, +0.0] (n = 4)" in row
    assert row.endswith("| 1.500 |")
    assert "start model 2.000" in table
