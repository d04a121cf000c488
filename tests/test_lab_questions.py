"""The lab's paired questions (spaceft/lab/questions.py): the t quantile against closed forms, the
endpoints of a hand-made trajectory, and the pairing of differences by seed."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from spaceft.lab.questions import QUESTIONS, endpoints, run_question, t_interval, t_quantile
from spaceft.lab.sampled import SampledConfig


def test_t_quantile_matches_the_closed_forms_for_one_and_two_degrees_of_freedom() -> None:
    """df = 1 is Cauchy: t_p = tan(π(p − 1/2)), t_.975 = tan(0.475π) = 12.7062. df = 2 has
    t_p = (2p − 1)/√(2p(1 − p)): t_.975 = 0.95/√0.04875 = 4.30265."""
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), abs=2e-5)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=2e-5)
    assert t_quantile(0.975, 19) == pytest.approx(2.093024, abs=2e-5)  # the printed tables' value


def test_t_interval_of_three_values() -> None:
    """[1, 2, 3]: mean 2, sd 1, half-width t_.975(2)·1/√3 = 4.30265/1.73205 = 2.48414."""
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["n"] == 3
    assert iv["high"] - 2.0 == pytest.approx(2.48414, abs=1e-4)
    assert iv["low"] == pytest.approx(2.0 - 2.48414, abs=1e-4)


def test_endpoints_of_a_hand_made_trajectory() -> None:
    """KL 0.5 (start), 0.3, 0.2, 0.4: final 0.4, mean over iterations 1-3 = 0.3, best 0.2 at 2."""
    recs = [
        {"kl": 0.5, "frac_synthetic_equals_real": None},
        {"kl": 0.3, "frac_synthetic_equals_real": 0.5},
        {"kl": 0.2, "frac_synthetic_equals_real": 0.25},
        {"kl": 0.4, "frac_synthetic_equals_real": 0.75},
    ]
    e = endpoints(recs)
    assert e["final"] == 0.4 and e["best"] == 0.2 and e["best_iteration"] == 2.0
    assert e["mean"] == pytest.approx(0.3) and e["verbatim"] == pytest.approx(0.5)


def test_differences_are_paired_by_seed() -> None:
    """Two seeds, two iterations: each difference is the contender's minus the baseline's on the same
    seed, and the methods share the seed's real set and start (equal KL at iteration 0)."""
    q = replace(QUESTIONS["variance"], sampled=SampledConfig(iterations=2))
    s = run_question(q, [0, 1], "lab")
    k1, k4 = s["methods"]["space_k1"]["per_seed"], s["methods"]["space_k4"]["per_seed"]
    d = [a["final"] - b["final"] for a, b in zip(k4, k1, strict=True)]
    assert s["difference"]["final"]["mean"] == pytest.approx(sum(d) / 2)
    assert s["difference"]["final"]["contender_lower"] == sum(x < 0 for x in d)
    assert 0.3 < s["methods"]["space_k1"]["verbatim"]["mean"] < 0.8  # verbatim-heavy, by design
