"""spaceft's losses against TRL's implementation on the same log-probs (skipped when TRL is absent).

TRL (`pip install -e '.[bench]'`) is a second, independent implementation: its DPOTrainer computes the
policy log-probs itself and applies its loss code; spaceft's SPIN, SPIN-hinge, S-IPO and SPACE(μ=1) at
β = 1 must give its sigmoid, hinge, ipo and bco_pair losses on one batch with given reference log-probs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("trl")

from .conftest import load_benchmark


def _bench():
    return load_benchmark("vs_trl")


def test_losses_equal_trl_on_the_same_log_probs(tiny_model_dir: Path) -> None:
    checks = _bench().trl_loss_check(str(tiny_model_dir))
    assert set(checks) == {"spin~sigmoid", "spin_hinge~hinge", "ipo~ipo", "space(mu=1)~bco_pair"}
    for name, (ours, theirs) in checks.items():
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5), name
    # the four objectives differ on this batch, so a check that compared a loss with itself would fail
    assert len({round(theirs, 4) for _, theirs in checks.values()}) == 4


def test_k_rejected_responses_become_k_trl_pairs_split_where_trl_splits(tiny_tokenizer) -> None:
    bench = _bench()
    rows = bench.make_rows(tiny_tokenizer, 3, 10, 6, seed=1, k=2)
    pairs = bench.trl_rows(rows)
    assert len(pairs) == 6 and pairs[0]["prompt"] == pairs[1]["prompt"] == rows[0]["prompt"]
    assert pairs[0]["rejected"] != pairs[1]["rejected"]
    for (prompt, chosen, rejected), row in zip(bench.token_items(tiny_tokenizer, rows), rows, strict=True):
        assert len(rejected) == 2
        for text, ids in zip([row["chosen"], *row["rejected"]], [chosen, *rejected], strict=True):
            assert prompt + ids == tiny_tokenizer(row["prompt"] + text)["input_ids"]


def test_the_goals_table_reads_shared_against_trl(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()

    def run(step_s: list[float], total_s: float, peak: float, imports: float) -> dict:
        return {"step_s": step_s, "total_s": total_s, "steps": len(step_s), "precompute_s": 1.0,
                "n_params": 10, "peak_rss_mb": peak, "import_mb": imports}  # fmt: skip

    trl = [run([2.0, 2.0], 8.0, 1500, 500), run([3.0, 3.0], 8.0, 1500, 500)]
    shared = [run([1.0, 1.0], 4.0, 900, 400), run([1.0, 1.5], 5.0, 1000, 400)]
    setting = {"precision": "fp32", "checkpointing": False, "k": 1, "prompt_tokens": 75, "tokens": 100,
               "matmul_peak_flops": [1e9, 2e9], "runs": {"trl": trl, "shared": shared}}  # fmt: skip
    s = bench.summarize(setting)
    assert s["systems"]["trl"]["train_s"] == 5.0  # median of 4 and 6
    assert s["systems"]["shared"]["train_s"] == 2.25
    assert s["systems"]["shared"]["net_rss_mb"] == 550.0
    assert s["systems"]["shared"]["mfu"] == pytest.approx(6 * 10 * 100 / 2.25 / 2e9)
    bench.goals([s], 75)
    out = capsys.readouterr().out
    assert "| training steps | fp32 | off | ≥ 1.6× | 2.22× | yes |" in out  # 5 / 2.25
    assert "| score + train end to end | fp32 | off | ≥ 1.5× | 1.80× | yes |" in out  # 0.45 / 0.25 steps/s


def test_a_failed_measurement_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    ok = {"step_s": [1.0], "total_s": 2.0, "steps": 1, "precompute_s": 1.0, "n_params": 10,
          "peak_rss_mb": 900, "import_mb": 400}  # fmt: skip
    setting = {"precision": "amp", "checkpointing": False, "k": 4, "prompt_tokens": 300, "tokens": 100,
               "matmul_peak_flops": [1e9], "runs": {"trl": [{"failed": "rc -9 (killed: out of memory?)"}],
                                                     "spaceft": [ok], "shared": [ok]}}  # fmt: skip
    bench.tables([setting], 75)
    out = capsys.readouterr().out
    assert "| amp | off | 4 | 300 | trl | failed: rc -9 (killed: out of memory?) |" in out
    assert "| amp | off | 4 | 300 | shared | 1.0 | 0.5000 |" in out and "1.00× |" in out  # × unshared


def test_the_step_profiler_runs_on_shared_rows(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """benchmarks/profile_train.py reads vs_trl's data helpers: a rename there must not break it."""
    profile_train = load_benchmark("profile_train")
    argv = ["profile_train.py", "--model", "tiny", "--steps", "2", "--shared-prompt", "--top", "100",
            "--vocab-share"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    assert profile_train.main() == 0
    out = capsys.readouterr().out
    assert "1 profiled steps, fp32" in out and "aten::mm" in out
    share = re.search(r"\(the vocabulary head\): [0-9.]+ s, ([0-9.]+) % of all matrix products", out)
    assert share is not None and 0 < float(share.group(1)) < 100, out[-500:]
