"""Bootstrap intervals: expected values worked out by hand (exact bootstrap distributions) or by a
direct loop over the drawn indices."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import load_experiment

intervals = load_experiment("intervals")
Interval = intervals.Interval
paired_difference = intervals.paired_difference
pooled_interval = intervals.pooled_interval
resample_counts = intervals.resample_counts
seed_interval = intervals.seed_interval


def test_accuracy_interval_matches_the_exact_binomial_bootstrap() -> None:
    """One seed, 5 problems [0, 0, 1, 1, 1]: a replicate's mean is X/5 with X ~ Binomial(5, 0.6).
    P(X=0..5) = .01024, .0768, .2304, .3456, .2592, .07776; CDF = .01024, .08704, .31744, .66304,
    .92224, 1. The 2.5% quantile is X = 1 (CDF(0) = .010 < .025 <= CDF(1) = .087) and the 97.5%
    quantile is X = 5 (CDF(4) = .922 < .975): the interval is [0.2, 1.0] around 0.6."""
    iv = pooled_interval([[0, 0, 1, 1, 1]])
    assert iv == Interval(0.6, 0.2, 1.0, seeds=1, problems=5)


def test_seeds_are_resampled_too() -> None:
    """Two seeds, one problem, values 0 and 1: a replicate draws two seeds, mean 0, 0.5 or 1 with
    probabilities 1/4, 1/2, 1/4, so the 2.5% / 97.5% quantiles are 0 and 1. Resampling problems only
    would give the degenerate [0.5, 0.5]."""
    iv = pooled_interval([[0], [1]])
    assert (iv.estimate, iv.low, iv.high, iv.seeds, iv.problems) == (0.5, 0.0, 1.0, 2, 1)


def test_nll_is_pooled_over_tokens_not_averaged_over_problems() -> None:
    """Problem 1: -log p = 1 over 1 token (NLL 1); problem 2: 9 over 3 tokens (NLL 3). Pooled NLL =
    10/4 = 2.5 (the mean of per-problem NLLs would be 2). Replicates: both draws problem 1 -> 1 (p 1/4),
    both problem 2 -> 3 (p 1/4), one of each -> 2.5 (p 1/2): interval [1, 3]."""
    iv = pooled_interval([[1.0, 9.0]], [[1, 3]])
    assert (iv.estimate, iv.low, iv.high) == (2.5, 1.0, 3.0)


def test_constant_values_give_a_zero_width_interval() -> None:
    iv = pooled_interval(np.full((3, 7), 0.25))
    assert (iv.low, iv.estimate, iv.high) == pytest.approx((0.25, 0.25, 0.25), abs=1e-12)


def test_paired_difference_matches_the_exact_bootstrap() -> None:
    """a = [1, 1, 0, 0], b = [1, 0, 0, 0]: the difference per problem is [0, 1, 0, 0], so a replicate's
    difference is X/4, X ~ Binomial(4, 1/4): P(X=0..4) = .3164, .4219, .2109, .0469, .0039; CDF = .3164,
    .7383, .9492, .9961, 1. Quantiles: 2.5% -> 0, 97.5% -> X = 3 (CDF(2) = .949 < .975): [0, 0.75].
    Unpaired, the two means' spread would add up instead of cancelling on the shared problems."""
    iv = paired_difference([[1, 1, 0, 0]], [[1, 0, 0, 0]])
    assert (iv.estimate, iv.low, iv.high) == (0.25, 0.0, 0.75)
    assert not iv.excludes_zero
    same = paired_difference([[1, 0, 1, 0, 1]], [[1, 0, 1, 0, 1]])
    assert (same.low, same.high) == (0.0, 0.0)


def test_a_clear_difference_excludes_zero() -> None:
    a = np.ones((3, 200))
    b = np.ones((3, 200))
    b[:, :60] = 0  # b misses 30% of the problems a solves, on every seed
    iv = paired_difference(a, b)
    assert iv.excludes_zero and iv.estimate == pytest.approx(0.3)
    assert 0.23 < iv.low < 0.3 < iv.high < 0.37  # sd of a 200-problem binomial share near .3 is ~.032


def test_einsum_sums_equal_a_direct_loop_over_drawn_indices() -> None:
    """The vectorised pooled ratio equals drawing indices and summing them one by one."""
    rng = np.random.default_rng(5)
    num, den = rng.normal(size=(3, 6)), rng.integers(1, 9, size=(3, 6)).astype(float)
    c_seed, c_prob = resample_counts(3, 6, replicates=50, seed=1)
    _pooled = intervals._pooled

    fast = _pooled(num, den, c_seed, c_prob)
    for r in range(50):
        seeds = np.repeat(np.arange(3), c_seed[r].astype(int))
        probs = np.repeat(np.arange(6), c_prob[r].astype(int))
        n = sum(num[s, p] for s in seeds for p in probs)
        d = sum(den[s, p] for s in seeds for p in probs)
        assert fast[r] == pytest.approx(n / d, rel=1e-12)
    assert (c_seed.sum(1) == 3).all() and (c_prob.sum(1) == 6).all()


def test_seed_interval_and_input_checks() -> None:
    iv = seed_interval([0.0, 1.0])
    assert (iv.estimate, iv.low, iv.high, iv.seeds) == (0.5, 0.0, 1.0, 2)
    assert iv.format(".2f") == "0.50 [0.00, 1.00]"
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([[1, 0]], [[1, 0, 1]])
    with pytest.raises(ValueError, match="must be > 0"):
        pooled_interval([[1.0]], [[0.0]])
    with pytest.raises(ValueError, match="non-finite"):
        pooled_interval([[float("nan")]])


def test_holm_adjusts_step_down_in_the_input_order() -> None:
    """p = [0.01, 0.04, 0.03, 0.005], m = 4. Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06,
    0.04·1 = 0.04 → raised to 0.06 (non-decreasing). In input order: [0.03, 0.06, 0.06, 0.02]."""
    assert intervals.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert intervals.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_bootstrap_p_is_zero_when_every_replicate_is_on_one_side() -> None:
    """a beats b on every problem of every seed: every replicate's difference is 1 > 0, so p = 0; a
    table against itself gives differences of exactly 0 on both sides, p = 1."""
    a, b = np.ones((3, 10)), np.zeros((3, 10))
    assert intervals.bootstrap_p(a, b, replicates=200) == 0.0
    assert intervals.bootstrap_p(a, a, replicates=200) == 1.0
