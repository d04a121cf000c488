"""Bootstrap 95% confidence intervals over problems and seeds, for held-out accuracy and NLL.

A grid cell (one method, one iteration) is a [S, P] table: S training seeds, each evaluated on the same
P held-out problems. Its number is a pooled ratio, sum(numerator) / sum(denominator) over all S·P
cells: accuracy has numerator = correct (0/1) and denominator = 1; the per-token NLL has numerator =
-log p(response) and denominator = response tokens (the same pooling as `evaluate.py`).

Both the seeds and the problems are samples (of training randomness and of the task), so the interval
resamples both: each replicate draws S seeds and P problems with replacement (a crossed, two-way
bootstrap) and recomputes the pooled ratio; the interval is the replicates' 2.5% and 97.5% quantiles
(the percentile method). With one seed only the problems are resampled, and the interval says nothing
about seed-to-seed spread: tables print the seed count next to every interval for that reason.

Differences between two methods (or two iterations) evaluated on the same problems are *paired*: one
replicate draws one set of indices and applies it to both tables, so the problem-to-problem variation
they share cancels. That is what lets 200 problems separate methods a few points apart.

A replicate's sums are computed from resampling *counts* (how often each seed and problem was drawn):
sum over drawn cells = c_seedᵀ · X · c_problem, one einsum for all replicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
"""Coverage of every interval."""

REPLICATES = 4000
"""Bootstrap replicates: the Monte Carlo error of a 95% quantile is then well under its width."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval and the sample it came from."""

    estimate: float
    low: float
    high: float
    seeds: int
    problems: int

    def format(self, spec: str = ".3f") -> str:
        """`0.412 [0.371, 0.455]`."""
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (a difference told apart from noise)."""
        return self.low > 0 or self.high < 0


def _as_table(x: np.ndarray | list, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty [seeds, problems] table, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values")
    return a


def resample_counts(seeds: int, problems: int, replicates: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each seed and each problem is drawn in each replicate: [R, S] and [R, P] counts."""
    rng = np.random.default_rng(seed)
    c_seed = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=replicates).astype(float)
    c_prob = rng.multinomial(problems, np.full(problems, 1.0 / problems), size=replicates).astype(float)
    return c_seed, c_prob


def _pooled(num: np.ndarray, den: np.ndarray, c_seed: np.ndarray, c_prob: np.ndarray) -> np.ndarray:
    """Each replicate's sum(num) / sum(den) over its drawn cells: [R]."""
    return np.einsum("rs,sp,rp->r", c_seed, num, c_prob) / np.einsum("rs,sp,rp->r", c_seed, den, c_prob)


def _interval(estimate: float, reps: np.ndarray, shape: tuple[int, int]) -> Interval:
    lo, hi = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(float(estimate), float(lo), float(hi), seeds=shape[0], problems=shape[1])


def bootstrap_p(a_num: np.ndarray | list, b_num: np.ndarray | list, **kwargs: object) -> float:
    """Two-sided p-value of a paired difference: twice the smaller share of its bootstrap replicates on
    either side of 0 (the replicates of `paired_difference`, same draws; at most 1)."""
    an, bn = _as_table(a_num, "a"), _as_table(b_num, "b")
    c_seed, c_prob = resample_counts(
        *an.shape, int(kwargs.get("replicates", REPLICATES)), int(kwargs.get("seed", 0))
    )
    ones = np.ones_like(an)
    reps = _pooled(an, ones, c_seed, c_prob) - _pooled(bn, ones, c_seed, c_prob)
    return float(min(1.0, 2 * min(np.mean(reps <= 0), np.mean(reps >= 0))))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the i-th smallest is multiplied by
    (m − i + 1), made non-decreasing, and capped at 1. Reject where adjusted p < α."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def pooled_interval(
    numerator: np.ndarray | list,
    denominator: np.ndarray | list | None = None,
    *,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> Interval:
    """sum(numerator) / sum(denominator) over a [seeds, problems] table, with its crossed-bootstrap
    interval. `denominator` None means 1 per cell (a plain mean, e.g. accuracy)."""
    num = _as_table(numerator, "numerator")
    den = np.ones_like(num) if denominator is None else _as_table(denominator, "denominator")
    if den.shape != num.shape:
        raise ValueError(f"numerator {num.shape} and denominator {den.shape} differ in shape")
    if (den <= 0).any():
        raise ValueError("every denominator (e.g. a response's token count) must be > 0")
    c_seed, c_prob = resample_counts(*num.shape, replicates, seed)
    return _interval(num.sum() / den.sum(), _pooled(num, den, c_seed, c_prob), num.shape)


def paired_difference(
    a_num: np.ndarray | list,
    b_num: np.ndarray | list,
    a_den: np.ndarray | list | None = None,
    b_den: np.ndarray | list | None = None,
    *,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> Interval:
    """(pooled a) - (pooled b) for two [seeds, problems] tables on the same problems, with a paired
    interval: every replicate applies the same seed and problem draws to both."""
    an, bn = _as_table(a_num, "a"), _as_table(b_num, "b")
    ad = np.ones_like(an) if a_den is None else _as_table(a_den, "a denominator")
    bd = np.ones_like(bn) if b_den is None else _as_table(b_den, "b denominator")
    if an.shape[1] != bn.shape[1] or ad.shape != an.shape or bd.shape != bn.shape:
        raise ValueError(f"paired tables need the same problems: shapes {an.shape} and {bn.shape}")
    if an.shape[0] != bn.shape[0]:
        raise ValueError(f"paired tables need the same number of seeds: {an.shape[0]} and {bn.shape[0]}")
    c_seed, c_prob = resample_counts(*an.shape, replicates, seed)
    reps = _pooled(an, ad, c_seed, c_prob) - _pooled(bn, bd, c_seed, c_prob)
    return _interval(an.sum() / ad.sum() - bn.sum() / bd.sum(), reps, an.shape)


def seed_interval(values: np.ndarray | list, *, replicates: int = REPLICATES, seed: int = 0) -> Interval:
    """Mean of one number per seed (e.g. a training reward) with a bootstrap interval over seeds."""
    v = _as_table(values, "values").reshape(-1, 1)
    return pooled_interval(v, replicates=replicates, seed=seed)
