"""The preregistered grid's tables (experiments/prereg_tables.py) on a synthetic archive of known numbers:
intervals, Holm's adjustment and verdicts worked out by hand, the SPIN-tuned alias re-derived from the
tuning runs, and a partial archive reported row by row instead of failing."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import load_experiment

pre = load_experiment("preregistered")
tables = load_experiment("prereg_tables")
intervals = load_experiment("intervals")

P = 20
"""Test problems per evaluation; every response is 10 tokens."""
NOISE = np.linspace(-0.5, 0.5, P)
"""Per-problem log p offsets, the same in every arm and seed and summing to 0: pooled NLL is exact."""
SPACE_NLL = (0.50, 0.52, 0.54)
SFT_NLL = (0.60, 0.64, 0.65)
"""space − sft-matched per seed: −0.10, −0.12, −0.11 in every iteration."""
SPIN_NLL = (0.60, 0.57, 0.55)
"""space − spin: −0.10, −0.05, −0.01."""
SPACE_CORRECT = (14, 13, 10)
SPIN_CORRECT = (10, 10, 11)
"""After iteration 5, of 20: space − spin accuracy +0.20, +0.15, −0.05; before it both 10 of 20."""


def _write(path: Path, text: str, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())


def write_run(
    root: Path, state: dict[str, Any], name: str, group: str, seed: int, nll: float, correct: list[int]
) -> None:
    """One finished run: base and 5 evaluations (`correct[t]` problems right after iteration t, 10 at
    the start), two logged steps per iteration, diagnostics, costs."""
    d = root / name
    done: dict[str, Any] = {}
    for t, key in enumerate(["base", *(f"iter_{i}" for i in range(5))]):
        right = 10 if key == "base" else correct[t - 1]
        value = 0.70 if key == "base" else nll
        rows = [
            {"index": p, "correct": p < right, "logp": -10 * value + NOISE[p], "tokens": 10} for p in range(P)
        ]
        _write(d / key / "eval_samples.jsonl.gz", "".join(json.dumps(r) + "\n" for r in rows), gz=True)
        _write(d / key / "eval.json", json.dumps({"n": P, "nll": value, "accuracy": right / P}))
        if key != "base":
            steps = [{"loss": 1.0 + t + seed, "grad_norm": 5.0 * t}, {"loss": 0.5, "grad_norm": 1.0}]
            _write(d / key / "metrics.jsonl", "".join(json.dumps(s) + "\n" for s in steps))
        done["base" if key == "base" else str(t - 1)] = {
            "eval": {"status": "done"},
            "train": {"status": "done"},
        }
    _write(d / "manifest.json", json.dumps({"iterations": done}))
    _write(
        d / "diagnostics.json",
        json.dumps([{"iteration": t, "identical": 0.5 + 0.1 * seed} for t in range(5)]),
    )
    costs = [{"iteration": t, "forwarded": 100, "trained": 200, "compute": 700} for t in range(5)]
    state["runs"][name] = {
        "group": group, "seed": seed, "n": 64, "wall_s": 1800.0 * (1 + seed), "cpu_s": 3000.0,
        "peak_rss_mb": 2048.0 * (1 + seed), "invocations": 1, "costs": costs,
    }  # fmt: skip


def write_tuning(root: Path, state: dict[str, Any], family: str, scores: dict[float, float]) -> None:
    for lr, nll in scores.items():
        write_run(
            root, state, f"arithmetic-tune-{family}-lr{lr:g}-s100", f"tune-{family}", 100, nll, [10] * 5
        )


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    state: dict[str, Any] = {"runs": {}, "best": {}, "matched_epochs": {"arithmetic": 9}}
    for s in range(3):
        last = [10, 10, 10, 10]
        for arm, nll, right in (
            ("space", SPACE_NLL, SPACE_CORRECT),
            ("sft-matched", SFT_NLL, SPACE_CORRECT),
            ("spin-b0.1", SPIN_NLL, SPIN_CORRECT),
        ):
            write_run(
                root, state, f"arithmetic-{arm}-s{s}", f"arithmetic-{arm}", s, nll[s], [*last, right[s]]
            )
    # β = 0.1 wins its grid inside (3e-6) and beats β = 1 at 3e-6 and its neighbours: SPIN tuned is its alias
    write_tuning(root, state, "spin-b0.1", {1e-6: 0.40, 3e-6: 0.30, 1e-5: 0.35, 3e-5: 0.50})
    write_tuning(root, state, "spin-b1", {1e-6: 0.45, 3e-6: 0.33, 1e-5: 0.36})
    # SPACE's winner sits at the grid's edge and its extension has not run: not complete
    write_tuning(root, state, "space", {1e-6: 0.40, 3e-6: 0.39, 1e-5: 0.38, 3e-5: 0.37})
    _write(root / "grid_state.json", json.dumps(state))
    return root


def design(tmp_path: Path) -> Any:
    return pre.Design(out=tmp_path / "report", max_tier=1, tasks=("arithmetic",))


def row(summary: dict[str, Any], arm: str, comparator: str, endpoint: str) -> dict[str, Any]:
    return next(
        r for r in summary["comparisons"]
        if (r["arm"], r["comparator"], r["endpoint"]) == (arm, comparator, endpoint)
    )  # fmt: skip


def test_intervals_holm_and_verdicts_by_hand(archive: Path, tmp_path: Path) -> None:
    """space − sft NLL per seed −0.10, −0.12, −0.11: mean −0.11, sd 0.01, t interval −0.11 ± 4.303 ×
    0.01/√3 = [−0.1348, −0.0852]; every bootstrap replicate is a mean of resampled seed differences, all
    negative, so p = 0 → reproduced. space − spin NLL −0.10, −0.05, −0.01: sd 0.0451, half-width 0.1120,
    the t interval includes 0 while the bootstrap p is 0 → not settled. Equal accuracies: p = 1, both
    intervals [0, 0] → not reproduced. Holm over the 8 primary p-values 0, 0, 1, 1 (sft), 0, 0, x, x
    (spin accuracy): x is the 5th smallest, so its adjusted p is (8 − 4)·x."""
    summary = tables.write_report(archive, tmp_path / "report", design(tmp_path))
    r = row(summary, "space", "sft-matched", "nll_last")
    assert r["bootstrap"]["estimate"] == pytest.approx(-0.11)
    assert r["per_seed"] == pytest.approx([-0.10, -0.12, -0.11])
    assert (r["t"]["low"], r["t"]["high"]) == pytest.approx((-0.13484, -0.08516), abs=1e-5)
    assert r["p"] == 0 and r["p_holm"] == 0 and r["verdict"] == "reproduced in this setting"
    assert row(summary, "space", "sft-matched", "nll_mean")["verdict"] == "reproduced in this setting"

    r = row(summary, "space", "spin-tuned", "nll_last")
    assert "alias of spin-b0.1" in r["note"] and r["seeds"] == [0, 1, 2]
    low, high = -0.05333 - 0.11202, -0.05333 + 0.11202
    assert (r["t"]["low"], r["t"]["high"]) == pytest.approx((low, high), abs=1e-4)
    assert r["p"] == 0 and r["verdict"] == "not settled"

    acc = row(summary, "space", "sft-matched", "acc_last")
    assert acc["p"] == 1 and acc["verdict"] == "not reproduced in this setting"

    # the raw p is bootstrap_p on the hand-built tables; its Holm adjustment in a family of 8 is 4x
    r = row(summary, "space", "spin-tuned", "acc_last")
    space = [[float(p < c) for p in range(P)] for c in SPACE_CORRECT]
    spin = [[float(p < c) for p in range(P)] for c in SPIN_CORRECT]
    x = intervals.bootstrap_p(space, spin)
    assert 0 < 4 * x < 1 and r["p"] == x
    assert r["p_holm"] == pytest.approx(4 * x) and r["family_size"] == 8
    assert r["bootstrap"]["estimate"] == pytest.approx(0.1)
    # the mean over iterations: the last iteration's difference / 5, the same signs, the same p
    assert row(summary, "space", "spin-tuned", "acc_mean")["bootstrap"]["estimate"] == pytest.approx(0.02)

    assert summary["tuning"]["spin-b0.1"]["complete"] and summary["tuning"]["spin-b0.1"]["lr"] == 3e-6
    assert not summary["tuning"]["space"]["complete"]  # an edge winner awaits its extension
    assert summary["missing"] == []
    c = summary["costs"]["arithmetic-space"]
    assert c["compute"] == 3500 and c["wall_s"] == 3600 and c["peak_rss_mb"] == 6144
    assert c["hours"] == pytest.approx(3.0)

    md = (tmp_path / "report" / "results.md").read_text()
    # divergence in iteration 1: losses 1 + 1 + seed, gradient norm 5
    assert "| arithmetic | space | 1 | 2 [2, 2] | 3 [2, 4] | 3 [2, 4] | 5 [5, 5] |" in md
    assert "| arithmetic | space | 3 | 0.600 [0.500, 0.700] |" in md  # the verbatim rate per seed 0.5-0.7
    assert "Setting: SmolLM2-135M-Instruct (de-quantised Q4_1 GGUF), N = 64, arithmetic task" in md
    assert (tmp_path / "report" / "nll_vs_compute.png").stat().st_size > 0


def test_a_partial_archive_reports_what_is_missing(archive: Path, tmp_path: Path) -> None:
    """No SFT compute-matched yet and SPIN's seed 2 unfinished: the SFT rows say so and count as p = 1 in
    the family of 8, so the spin accuracy p (now the 3rd smallest) is multiplied by 8 − 2 = 6; the rows
    on 2 of 3 seeds carry no verdict yet."""
    for s in range(3):
        shutil.rmtree(archive / f"arithmetic-sft-matched-s{s}")
    (archive / "arithmetic-spin-b0.1-s2" / "manifest.json").unlink()  # a run archived but unfinished
    summary = tables.write_report(archive, tmp_path / "report", design(tmp_path))
    r = row(summary, "space", "sft-matched", "nll_last")
    assert r["p"] is None and r["missing"] == "not archived yet: sft-matched"
    r = row(summary, "space", "spin-tuned", "acc_last")
    assert r["seeds"] == [0, 1] and r["verdict"] == "pending (2 of 3 seeds)"
    assert 0 < r["p"] and r["p_holm"] == pytest.approx(min(1.0, 6 * r["p"]))
    assert summary["missing"] == [
        *("arithmetic-spin-b0.1-s2", "arithmetic-spin-tuned-s2"),
        *(f"arithmetic-sft-matched-s{s}" for s in range(3)),
    ]
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| arithmetic | sft-matched | 0 | not archived yet |" in md


def test_an_empty_archive_is_a_report_of_missing_rows(tmp_path: Path) -> None:
    summary = tables.write_report(tmp_path / "nothing", tmp_path / "report", design(tmp_path))
    assert summary["runs"] == 0 and len(summary["missing"]) == 12
    assert all(r["p"] is None for r in summary["comparisons"])
    assert "No start archived yet." in (tmp_path / "report" / "results.md").read_text()


def test_the_verdict_rule() -> None:
    """Holm p < 0.05 with a t interval on the claimed side: reproduced; a bootstrap interval on the other
    side: not reproduced whatever the t interval says; both intervals over 0: not reproduced."""
    iv = intervals.Interval
    t_below = {"mean": -0.1, "low": -0.2, "high": -0.05}
    assert tables.verdict(iv(-0.1, -0.2, -0.01, 3, 20), 0.01, t_below, -1) == "reproduced in this setting"
    assert tables.verdict(iv(-0.1, -0.2, -0.01, 3, 20), 0.2, t_below, -1) == "not settled"  # Holm
    assert tables.verdict(iv(0.1, 0.01, 0.2, 3, 20), 0.01, t_below, -1) == "not reproduced in this setting"
    t_zero = {"mean": 0.0, "low": -0.1, "high": 0.1}
    assert tables.verdict(iv(0.0, -0.1, 0.1, 3, 20), 1.0, t_zero, +1) == "not reproduced in this setting"
    assert math.isclose(tables.ALPHA, 0.05)


def test_the_one_command(archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`preregistered.py --report-only` writes every table and prints one line per comparison."""
    argv = ["--report-only", "--archive", str(archive), "--out", str(tmp_path / "r"), "--max-tier", "1"]
    assert pre.main([*argv, "--tasks", "arithmetic"]) == 0
    printed = capsys.readouterr().out
    assert "space - sft-matched  nll_last  -0.110 [-0.120, -0.100]" in printed
    assert "reproduced in this setting" in printed and "finals not archived yet (0)" in printed
    assert {p.name for p in (tmp_path / "r").iterdir()} == {
        "results.md",
        "results.json",
        "nll_vs_compute.png",
    }
