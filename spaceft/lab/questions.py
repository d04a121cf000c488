"""Two questions the evidence grid raised, asked of the lab with 20 paired seeds.

* ``variance``: does SPACE with K = 4 samples per real response at μ = 1 beat K = 1 when most samples
  are the real response verbatim? A pair whose sample is its real response has the gradient
  (2σ(r) − 1)·∇r, r = log p_θ/p_θt of that one sequence: zero at the iteration's start and afterwards
  a pull of r back to 0, no information about p_data. At K = 1 that is the pair's whole contribution;
  K = 4 averages four draws, so fewer pairs are wasted and the estimator's variance falls. The world
  is the default one with a sharper teacher (logit std 5 instead of 1.5), so that a model trained on 16
  samples per prompt reproduces the real response in about half of its samples (the first grid: 51–76 %;
  the lab saturates near 55 % with 3-letter responses).
* ``shared``: the shared-parameter (factored rank-2, rank-2 teacher) world, the only lab setting in
  which SPACE's best KL beat early-stopped SFT's (2 of 3 seeds): SPACE μ = 1 against SFT.

Each question runs sampled mode twice per seed: with the lab's schedule (8 optimiser steps per
iteration, 10 iterations) and with the redesigned grid's (32 steps per iteration, 5 iterations). All
methods of a seed share the real set and the SFT start, so differences are paired by seed. The
endpoints mirror the grid's: KL(p_data‖p_θ) after the last iteration, averaged over iterations 1…T,
and at the best iteration (early stopping with an oracle, the most SFT could get).

    python -m spaceft.lab.questions --question variance shared --seeds 20 --out lab_out/questions
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from spaceft.lab.methods import Method
from spaceft.lab.sampled import SampledConfig, run_sampled_seed
from spaceft.lab.world import World, WorldConfig
from spaceft.losses import LossType

logger = logging.getLogger(__name__)

ENDPOINTS = ("final", "mean", "best")
"""KL after the last iteration, averaged over iterations 1…T, and the lowest over 0…T."""


@dataclass(frozen=True)
class Question:
    """A paired comparison: ``contender`` against ``baseline`` (method keys), in one world."""

    name: str
    world: WorldConfig
    sampled: SampledConfig
    methods: tuple[Method, ...]
    baseline: str
    contender: str


SPACE_K1 = Method("space_k1", "SPACE K=1 μ=1", LossType.SPACE, 1, mu=1.0, beta=1.0)
SPACE_K4 = Method("space_k4", "SPACE K=4 μ=1", LossType.SPACE, 4, mu=1.0, beta=1.0)
SFT = Method("sft", "SFT", LossType.SFT, 0)

QUESTIONS = {
    "variance": Question(
        "variance",
        WorldConfig(teacher_scale=5.0),
        SampledConfig(),
        (SFT, SPACE_K1, SPACE_K4),
        baseline="space_k1",
        contender="space_k4",
    ),
    "shared": Question(
        "shared",
        WorldConfig(teacher_rank=2),
        SampledConfig(policy="factored", rank=2),
        (SFT, SPACE_K1),
        baseline="sft",
        contender="space_k1",
    ),
}

SCHEDULES = {"lab": {"epochs": 2, "iterations": 10}, "grid": {"epochs": 8, "iterations": 5}}
"""The lab's default (2 epochs of 4 steps: 8 steps per iteration, like the first grid) and the
redesigned grid's (32 steps per iteration, 5 iterations)."""


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (p > 0.5), by bisection on its CDF;
    the CDF is 1 − I_x(df/2, 1/2)/2 with x = df/(df + t²), the incomplete beta by Simpson's rule on
    the substitution u = s^a; within 2e-5 of scipy's for df = 1…60 (enough for an interval's ends)."""

    def upper_tail(t: float) -> float:  # P(T > t) = I_x(a, b) / 2
        a, b = df / 2, 0.5
        x = df / (df + t * t)
        n = 2000
        # B(a, b)·I_x(a, b) = ∫_0^x s^(a-1) (1-s)^(b-1) ds = ∫_0^{x^a} (1 - u^(1/a))^(b-1) du / a  (u = s^a)
        top = x**a
        h = top / n
        total = 0.0
        for i in range(n + 1):
            u = i * h
            f = (1 - u ** (1 / a)) ** (b - 1) if u < 1 else 0.0
            total += f * (1 if i in (0, n) else 4 if i % 2 else 2)
        integral = total * h / 3 / a
        log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
        return 0.5 * integral / math.exp(log_beta)

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if upper_tail(mid) > 1 - p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean and two-sided t interval of ``values`` (one per seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def endpoints(records: list[dict]) -> dict[str, float]:
    """A method's KL endpoints from its records (iteration 0 is the start)."""
    kls = [float(r["kl"]) for r in records]
    eq = [r["frac_synthetic_equals_real"] for r in records[1:] if r["frac_synthetic_equals_real"] is not None]
    return {
        "final": kls[-1],
        "mean": sum(kls[1:]) / (len(kls) - 1),
        "best": min(kls),
        "best_iteration": float(kls.index(min(kls))),
        "verbatim": sum(eq) / len(eq) if eq else math.nan,
    }


def run_question(question: Question, seeds: list[int], schedule: str) -> dict:
    """Every method of ``question`` on every seed; per-seed endpoints and the paired differences."""
    sampled = replace(question.sampled, **SCHEDULES[schedule])
    world = World(question.world)
    per_seed: dict[str, list[dict[str, float]]] = {m.key: [] for m in question.methods}
    for seed in seeds:
        result = run_sampled_seed(world, list(question.methods), sampled, seed)
        for key, records in result["methods"].items():
            per_seed[key].append(endpoints(records))
    summary: dict = {"question": question.name, "schedule": schedule, "seeds": seeds, "methods": {}}
    for key, rows in per_seed.items():
        summary["methods"][key] = {e: t_interval([r[e] for r in rows]) for e in (*ENDPOINTS, "verbatim")}
        summary["methods"][key]["per_seed"] = rows
    diffs = {}
    for e in ENDPOINTS:
        pairs = zip(per_seed[question.contender], per_seed[question.baseline], strict=True)
        d = [c[e] - b[e] for c, b in pairs]
        diffs[e] = {**t_interval(d), "contender_lower": sum(x < 0 for x in d)}
    summary["difference"] = {"contender": question.contender, "baseline": question.baseline, **diffs}
    return summary


def markdown(summaries: list[dict]) -> str:
    """One table per question: each method's KL endpoints, then contender − baseline with its t interval."""
    lines = []
    for s in summaries:
        d = s["difference"]
        n = len(s["seeds"])
        lines += [
            f"### {s['question']} ({s['schedule']} schedule, {n} seeds)",
            "",
            "| method | final KL | mean KL over iterations | best KL | samples = real |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, m in s["methods"].items():
            cells = " | ".join(f"{m[e]['mean']:.4f}" for e in ENDPOINTS)
            verbatim = m["verbatim"]["mean"]
            lines.append(f"| {key} | {cells} | {'—' if math.isnan(verbatim) else f'{verbatim:.2f}'} |")
        row = " | ".join(
            f"{d[e]['mean']:+.4f} [{d[e]['low']:+.4f}, {d[e]['high']:+.4f}], "
            f"lower on {d[e]['contender_lower']}/{n}"
            for e in ENDPOINTS
        )
        lines += [f"| {d['contender']} − {d['baseline']} | {row} | |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--question", nargs="+", choices=list(QUESTIONS), default=list(QUESTIONS))
    p.add_argument("--schedule", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES))
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("lab_out/questions"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    tic = time.perf_counter()
    summaries = [
        run_question(QUESTIONS[q], list(range(a.seeds)), schedule)
        for q in a.question
        for schedule in a.schedule
    ]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "questions.json").write_text(json.dumps(summaries, indent=1))
    report = markdown(summaries)
    (a.out / "questions.md").write_text(report)
    print(report)  # the command's product
    print(f"{time.perf_counter() - tic:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
