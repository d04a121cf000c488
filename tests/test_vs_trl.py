"""spaceft's losses against TRL's implementation on the same log-probs (skipped when TRL is absent).

TRL (`pip install -e '.[bench]'`) is a second, independent implementation: its DPOTrainer computes the
policy log-probs itself and applies its loss code; spaceft's SPIN, SPIN-hinge, S-IPO and SPACE(μ=1) at
β = 1 must give its sigmoid, hinge, ipo and bco_pair losses on one batch with given reference log-probs.
"""

from __future__ import annotations

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
