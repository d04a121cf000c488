"""Rewards start at exactly 0 on real-length responses, in every precision, on one process and two.

The opponent's scores are computed in training's own micro-batches (`spaceft.microbatch`); scored in
other batches, the same model gives the same sequences other last bits, which bf16 turns into rewards
of thousandths to tenths of a nat; the control below shows it, so the check can fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.exact_start import (
    SETTINGS,
    VOCAB,
    first_step_abs_reward,
    logits_positions,
    other_batches_abs_reward,
)

BIN = Path(sys.executable).parent
TOLERANCE = 1e-6


@pytest.mark.parametrize(("precision", "micro", "grouping", "shared"), SETTINGS)
def test_first_step_rewards_are_exactly_zero_on_one_process(
    precision: str, micro: int, grouping: bool, shared: bool, tmp_path: Path
) -> None:
    assert first_step_abs_reward(precision, micro, grouping, shared, tmp_path) <= TOLERANCE


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16"])
def test_scores_from_other_batches_are_off_by_thousandths_of_a_nat(precision: str) -> None:
    """The control: the arrangement before micro-batch scoring (length-sorted batches of its own) gives
    0.004-0.01 nats on this small model (0.17-0.42 on SmolLM2-135M, docs/PERFORMANCE.md)."""
    assert other_batches_abs_reward(precision, 2) > 1e-3


@pytest.mark.slow
def test_first_step_rewards_are_exactly_zero_on_two_processes(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).with_name("exact_start.py")), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [tuple(x["setting"]) for x in lines] == SETTINGS
    assert {x["processes"] for x in lines} == {2}
    assert max(x["abs_mean"] for x in lines) <= TOLERANCE, lines


def test_auto_takes_both_paths_in_one_run_and_still_starts_at_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train.logps_path=auto` with `LOGITS_PATH_MAX_BYTES` between the float32 micro-batches' sizes: the
    smaller ones take the logits path, the larger the chunked one, and the score stage and training
    decide alike for each, so the first step's rewards are still 0. On this model the two float32 paths
    happen to agree to the bit, so the decisions themselves are compared too: a decision that depended
    on anything the passes do not share (grad mode, free memory) would differ between them."""
    from spaceft import token_logps

    sizes = logits_positions(2, True)
    threshold = sorted(sizes)[len(sizes) // 2 - 1]  # half the micro-batches at or below it
    monkeypatch.setattr(token_logps, "LOGITS_PATH_MAX_BYTES", 2 * 4 * VOCAB * threshold)
    picks: list[tuple[int, str]] = []
    choose = token_logps.choose_path

    def recorded(vocab: int, positions: int, device: str) -> str:
        picks.append((positions, choose(vocab, positions, device)))
        return picks[-1][1]

    monkeypatch.setattr(token_logps, "choose_path", recorded)
    assert first_step_abs_reward("float32", 2, True, False, tmp_path) <= TOLERANCE
    score, train = picks[: len(sizes)], picks[len(sizes) :]
    assert [n for n, _ in score] == sizes
    assert [p for _, p in score].count("logits") == len(sizes) // 2  # both paths taken
    assert sorted(score) == sorted(train)  # each micro-batch took the same path in both passes
