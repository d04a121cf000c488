"""The preregistered grid (experiments/PREREGISTRATION.md): self-play against SFT with the first grid's
handicaps removed.

What changes from `replicate.py` (whose bookkeeping, launcher and archive this reuses):
* ≥ 30 optimizer steps per iteration: N = 64 pairs, global batch 8, 4 epochs = 32 steps;
* RMSProp (the paper's optimizer) with an 11-step warm-up (`train.warmup_ratio=0.34` of 32 steps): the
  first grid's 1-step warm-up gave sign steps of 5–7 × lr; here the largest is ~2.9 × lr (see the
  preregistration's arithmetic);
* a start early-stopped on validation NLL: SFT on the N pairs one epoch per iteration for up to 10
  epochs, then the epoch with the lowest validation NLL;
* 5 iterations; every training step logged, so that each iteration's peak loss and gradient norm are
  reported (`divergence`);
* a learning-rate grid of 4 values per method, extended by one value when the winner sits at an edge,
  tuned on tuning seeds that the finals never use, on validation NLL averaged over iterations 1–5;
* bf16 mixed precision and `auto` batches (the fastest correct settings), two tasks (`arithmetic`,
  `worded`), and the arms in tiers run in the preregistered order, so that a grid stopped by its budget
  has answered the primary comparisons first.

    python experiments/preregistered.py --dry-run            # the plan and its estimated cost
    setsid nice -n 19 python experiments/preregistered.py --out runs/prereg --archive experiments/prereg_runs
    python experiments/preregistered.py --report-only --max-tier 2   # every table, from the archive alone
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grid_archive
import replicate as rep

from spaceft.losses import LossType
from spaceft.rundir import read_json, write_json
from spaceft.tasks import write_arithmetic_jsonl

log = logging.getLogger("preregistered")

FAMILIES: dict[str, tuple[str, ...]] = {
    "space": ("train.loss=space", "train.mu=1"),
    "spin-b0.1": ("train.loss=spin", "train.beta=0.1"),
    "spin-b1": ("train.loss=spin", "train.beta=1.0"),
    "sft": ("train.loss=sft",),
    "ipo": ("train.loss=ipo", "train.tau=1.0"),
    "simpo": ("train.loss=simpo", "train.beta=2.0", "train.gamma=0.5"),
    "tspin": ("train.loss=tspin",),
}
"""Tuned families: a loss and its fixed knob; each gets its own learning-rate grid."""


@dataclass(frozen=True)
class Arm:
    """One row of the results: its families' best setting (the lowest mean validation NLL among them),
    plus its own overrides."""

    name: str
    families: tuple[str, ...]
    extra: tuple[str, ...] = ()
    tier: int = 1
    matched: bool = False
    """SFT given SPACE's compute: epochs per iteration from the K = 1 SPACE run's token counts."""
    data_scale: int = 1
    """Training pairs as a multiple of N (SFT on 4N: one epoch of 4N per iteration, SFT on N's steps × 4)."""


ARMS = (
    Arm("space", ("space",)),
    Arm("spin-b0.1", ("spin-b0.1",)),
    Arm("spin-tuned", ("spin-b0.1", "spin-b1")),
    Arm("sft-matched", ("sft",), matched=True),
    Arm("space-k4", ("space",), ("generation.num_samples=4",), tier=2),
    Arm("sft-4N", ("sft",), ("train.epochs=1",), tier=4, data_scale=4),
    Arm("space-reuse", ("space",), ("selfplay.resample=false", "generation.allow_biased_sampling=true"), 4),
    Arm("ipo", ("ipo",), tier=5),
    Arm("simpo", ("simpo",), tier=5),
    Arm("tspin", ("tspin",), tier=5),
)
WORDED_ARMS = ("space", "space-k4", "sft-matched")
"""The worded task runs these, tier 3, with the learning rates tuned on arithmetic."""
TASKS = ("arithmetic", "worded")


@dataclass
class Design:
    """The preregistered settings; the smoke test shrinks them."""

    out: Path = Path("runs/prereg")
    recipe: str = "demo"
    n: int = 64
    global_batch: int = 8
    epochs: int = 4
    iterations: int = 5
    warmup_ratio: float = 0.34
    lrs: tuple[float, ...] = (1e-6, 3e-6, 1e-5, 3e-5)
    max_extensions: int = 1
    spin_b1_lrs: int = 3
    """β = 1 is tried at β = 0.1's best learning rate and its neighbours."""
    tuning_seeds: tuple[int, ...] = (100,)
    final_seeds: tuple[int, ...] = (0, 1, 2)
    start_epochs: int = 10
    start_lr: float = 1e-5
    eval_size: int = 200
    val_size: int = 100
    data_seed: int = 0
    tasks: tuple[str, ...] = TASKS
    max_tier: int = 5
    arms: tuple[str, ...] = tuple(a.name for a in ARMS)
    """Which arms run (all by default; the smoke test picks two)."""
    extra: list[str] = field(default_factory=lambda: ["train.mixed_precision=bf16"])
    archive: Path | None = None

    def steps_per_iteration(self, data_scale: int = 1, epochs: int | None = None) -> int:
        return math.ceil(self.n * data_scale / self.global_batch) * (
            self.epochs if epochs is None else epochs
        )


def neighbours(lr: float) -> tuple[float, float]:
    """The half-decade values either side of `lr` on the 1-3-10 ladder (3e-6 → 1e-6 and 1e-5)."""
    mantissa = float(f"{lr:.0e}".split("e")[0])
    exponent = math.floor(math.log10(lr) + 1e-9)
    if mantissa == 1:
        return 3 * 10 ** (exponent - 1), 3 * 10**exponent
    return 10**exponent, 10 ** (exponent + 1)


def lr_overrides(lr: float) -> list[str]:
    return [f"train.lr={lr:g}", f"train.lr_after={lr / 2:g}"]  # halved from iteration 2, as SPIN's


class Preregistered(rep.Grid):
    """The grid in the preregistered order; `replicate.Grid` keeps state, archive and pruning."""

    def __init__(self, design: Design, launcher: rep.Launcher) -> None:
        spec = rep.GridSpec(out=design.out, recipe=design.recipe, iterations=design.iterations)
        spec.archive = design.archive
        spec.seeds = list(design.final_seeds)
        super().__init__(spec, launcher)
        self.d = design
        self.state.setdefault("starts", {})
        self.state.setdefault("tuned", {})

    # ------------------------------------------------------------------------------- data and settings

    def data_file(self, task: str, split: str, n: int) -> Path:
        path = self.out / "data" / f"{task}_{split}_{n}_seed{self.d.data_seed}.jsonl"
        if not path.exists():
            write_arithmetic_jsonl(path, n, seed=self.d.data_seed, split=split, worded=task == "worded")
        return path

    def base(self, task: str, data_scale: int = 1) -> list[str]:
        n = self.d.n * data_scale
        return [
            f"data.train={self.data_file(task, 'train', n)}",
            f"data.train_size={n}",
            f"train.global_batch_size={self.d.global_batch}",
            f"train.epochs={self.d.epochs}",
            f"train.warmup_ratio={self.d.warmup_ratio}",
            f"selfplay.iterations={self.d.iterations}",
            "logging.log_every=1",
            *self.d.extra,
        ]

    def validation(self, task: str) -> list[str]:
        """Validation NLL only (no decoding): what tuning and the start are chosen on."""
        path = self.data_file(task, "validation", self.d.val_size)
        return [f"data.eval={path}", f"data.eval_size={self.d.val_size}", "eval.task_metric=none"]

    def test(self, task: str) -> list[str]:
        path = self.data_file(task, "test", self.d.eval_size)
        return [f"data.eval={path}", f"data.eval_size={self.d.eval_size}"]

    # ------------------------------------------------------------------------------- stages

    def early_start(self, task: str) -> str:
        """SFT on the N pairs, one epoch per iteration, validation NLL after each; the start is the epoch
        with the lowest. Returns its model override."""
        name = f"{task}-start"
        overrides = [
            *self.base(task),
            "train.loss=sft",
            "train.epochs=1",
            f"selfplay.iterations={self.d.start_epochs}",
            f"train.lr={self.d.start_lr:g}",
            f"train.lr_after={self.d.start_lr:g}",  # no halving: each iteration is one more epoch
            "train.seed=0",
            *self.validation(task),
        ]
        self.ensure(name, overrides, group="start", seed=0, n=self.d.n, iterations=self.d.start_epochs)
        if self.archive:
            # a fresh clone: the retrained start must match the archived one before its runs count
            grid_archive.check_start(self.out, self.archive, name)
            self.restore(None)
            self.save_archive()
        nll = val_nll(self.run_dir(name), self.d.start_epochs)
        best = min(range(self.d.start_epochs), key=lambda t: nll[t])
        self.state["starts"][task] = {"epoch": best + 1, "val_nll": nll}
        self.save()
        return f"model.name={self.run_dir(name) / f'iter_{best}' / 'model'}"

    def tune(self, task: str, start: str, family: str) -> dict[str, Any]:
        """The family's learning-rate grid on every tuning seed, extended past an edge winner; the best
        is the lowest validation NLL averaged over iterations and tuning seeds."""
        key = f"{task}/{family}"
        if family == "spin-b1":
            centre = self.tune(task, start, "spin-b0.1")["lr"]
            low, high = neighbours(centre)
            lrs = [centre, low, high][: self.d.spin_b1_lrs]
        else:
            lrs = list(self.d.lrs)
        scores: dict[float, float] = {}
        extensions = 0
        while True:
            for lr in lrs:
                if lr not in scores:
                    scores[lr] = self.tuning_score(task, start, family, lr)
            best = min(scores, key=lambda lr: scores[lr])
            edge = best in (min(scores), max(scores)) and family != "spin-b1"
            if not edge or extensions >= self.d.max_extensions:
                break
            extensions += 1
            lrs.append(neighbours(best)[0 if best == min(scores) else 1])
        result = {
            "family": family,
            "lr": best,
            "val_nll_mean": scores[best],
            "scores": {f"{k:g}": v for k, v in scores.items()},
        }
        self.state["tuned"][key] = result
        self.save()
        return result

    def tuning_score(self, task: str, start: str, family: str, lr: float) -> float:
        means = []
        for seed in self.d.tuning_seeds:
            name = f"{task}-tune-{family}-lr{lr:g}-s{seed}"
            overrides = [
                *self.base(task), start, *rep.seeded(seed), *FAMILIES[family], *lr_overrides(lr),
                *self.validation(task),
            ]  # fmt: skip
            self.ensure(name, overrides, group=f"tune-{family}", seed=seed, n=self.d.n)
            means.append(sum(val_nll(self.run_dir(name), self.d.iterations)) / self.d.iterations)
        return sum(means) / len(means)

    def arm_setting(self, task: str, arm: Arm) -> list[str]:
        """The arm's best family at its best learning rate (tuned on arithmetic for the worded task)."""
        tuned_on = "arithmetic" if task == "worded" else task
        best = min(
            (self.state["tuned"][f"{tuned_on}/{f}"] for f in arm.families), key=lambda r: r["val_nll_mean"]
        )
        return [*FAMILIES[best["family"]], *lr_overrides(best["lr"])]

    def final(self, task: str, start: str, arm: Arm, seed: int) -> None:
        """One arm on one final seed; an arm whose tuned setting equals an earlier arm's (SPIN tuned when
        β = 0.1 wins) is recorded as an alias of that run, not trained twice."""
        overrides = [*self.base(task, arm.data_scale), start, *rep.seeded(seed), *self.arm_setting(task, arm)]
        if arm.matched:
            overrides.append(f"train.epochs={self.matched_epochs_of(task)}")
        overrides += [*arm.extra, *self.test(task)]
        name = f"{task}-{arm.name}-s{seed}"
        finals = self.state.setdefault("finals", {})
        same = [other for other, o in finals.items() if o == overrides and other != name]
        if same:
            self.state.setdefault("aliases", {})[name] = same[0]
            self.save()
            return
        finals[name] = overrides
        self.ensure(name, overrides, group=f"{task}-{arm.name}", seed=seed, n=self.d.n * arm.data_scale)

    def prune(self) -> None:
        """A finished tuning run keeps no models (nothing adopts it: tuning seeds never run as finals); a
        finished final keeps its last iteration's; the starts keep all (the chosen epoch is one of them)."""
        for name, entry in self.state["runs"].items():
            group = entry.get("group", "")
            if group == "start" or not self.finished(name, self.spec.iterations):
                continue
            models = sorted(self.run_dir(name).glob("iter_*/model"), key=lambda m: int(m.parent.name[5:]))
            for model in models if group.startswith("tune-") else models[:-1]:
                shutil.rmtree(model)

    def matched_epochs_of(self, task: str) -> int:
        """SFT epochs per iteration whose training compute equals a whole SPACE iteration's (generation,
        scoring and training), from the first final seed's K = 1 SPACE run; fixed once computed."""
        if task not in self.state["matched_epochs"]:
            space = self.run_dir(f"{task}-space-s{self.d.final_seeds[0]}")
            self.state["matched_epochs"][task] = rep.compute_matched_epochs(space)
            self.save()
        return int(self.state["matched_epochs"][task])

    def run(self) -> None:
        """Tier by tier (the preregistered order): tune what the tier's arms need, then every final."""
        starts: dict[str, str] = {}
        for tier in range(1, self.d.max_tier + 1):
            for task in self.d.tasks:
                arms = arms_of(task, tier, self.d.arms)
                if not arms:
                    continue
                if task not in starts:
                    starts[task] = self.early_start(task)
                if task == "arithmetic":
                    for family in dict.fromkeys(f for a in arms for f in a.families):
                        self.tune(task, starts[task], family)
                for seed in self.d.final_seeds:
                    for arm in arms:
                        self.final(task, starts[task], arm, seed)
        self.report()

    def report(self) -> None:
        """The per-run divergence diagnostics and the tuning state (the tables come from the archive)."""
        rows = {}
        for name in self.state["runs"]:
            if (self.run_dir(name) / "manifest.json").exists():
                rows[name] = divergence(self.run_dir(name))
        write_json(self.out / "divergence.json", rows)


def arms_of(task: str, tier: int, names: tuple[str, ...] = tuple(a.name for a in ARMS)) -> list[Arm]:
    """The arms of `task` in `tier`; an arm whose loss the project lacks is left out until it exists."""
    available = {t.value for t in LossType}
    chosen = []
    for arm in ARMS:
        if arm.name not in names or not all(
            FAMILIES[f][0].removeprefix("train.loss=") in available for f in arm.families
        ):
            continue
        arm_tier = 3 if task == "worded" else arm.tier
        if arm_tier == tier and (task == "arithmetic" or arm.name in WORDED_ARMS):
            chosen.append(arm)
    return chosen


def val_nll(run_dir: Path, iterations: int) -> list[float]:
    """Validation NLL after each iteration 0…iterations-1."""
    return [float(read_json(run_dir / f"iter_{t}" / "eval.json")["nll"]) for t in range(iterations)]


def divergence(run_dir: Path) -> list[dict[str, float]]:
    """Per iteration: the first step's loss, the peak loss and the peak gradient norm over its steps."""
    out = []
    t = 0
    while (path := run_dir / f"iter_{t}" / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        steps = [r for r in rows if "loss" in r]
        if steps:
            out.append(
                {
                    "iteration": t,
                    "steps": len(steps),
                    "first_loss": float(steps[0]["loss"]),
                    "peak_loss": max(float(r["loss"]) for r in steps),
                    "peak_grad_norm": max(float(r.get("grad_norm", math.nan)) for r in steps),
                }
            )
        t += 1
    return out


# ------------------------------------------------------------------------------- the plan and its cost

COST_S = {
    "gen_per_sample": 0.37,
    "score_per_row": 0.10,
    "train_per_pair": 0.64,
    "train_per_sft_example": 0.46,
    "eval_test": 100.0,
    "eval_val_nll": 10.0,
    "run_overhead": 40.0,
}
"""Seconds on the 2 cores under bf16, from the first grid's archived stage times at N = 64 (fp32, shared
cores: generation 33 s per 64 samples, scoring 23 s per 128 rows, training 1.47 s per pair and 1.06 s
per SFT example, test evaluation 110 s) scaled by docs/PERFORMANCE.md's bf16 speed-ups (training 2.3×,
sampling 1.4×); evaluation decodes in float32. ±30 %: the first grid's runs shared the cores."""


def estimate_s(
    design: Design, *, k: int, epochs: int, data_scale: int = 1, tuning: bool, reuse: bool = False
) -> float:
    """One run's estimated seconds: K samples per prompt (0 for SFT), `epochs` per iteration."""
    n = design.n * data_scale
    per_example = COST_S["train_per_pair"] * (1 + k) / 2 if k else COST_S["train_per_sft_example"]
    train = n * epochs * per_example
    gen = n * k * COST_S["gen_per_sample"]
    score = n * (1 + k) * COST_S["score_per_row"] if k else 0.0
    evaluate = COST_S["eval_val_nll"] if tuning else COST_S["eval_test"]
    total = design.iterations * (train + score + evaluate) + (gen if reuse else design.iterations * gen)
    return total + COST_S["run_overhead"]


def plan(design: Design) -> list[dict[str, Any]]:
    """Every run the grid launches, in order, with its tier and estimated seconds (tuning extensions and
    SPIN β = 1's grid counted at their maximum)."""
    rows: list[dict[str, Any]] = []
    tuned: set[str] = set()
    started: set[str] = set()
    matched_epochs = 10  # ~SPACE's compute per iteration / SFT's per epoch at 4 epochs (the first grid: 2.5×)
    for tier in range(1, design.max_tier + 1):
        for task in design.tasks:
            arms = arms_of(task, tier, design.arms)
            if not arms:
                continue
            if task not in started:
                started.add(task)
                cost = design.start_epochs * (
                    design.n * COST_S["train_per_sft_example"] + COST_S["eval_val_nll"]
                )
                rows.append({"name": f"{task}-start", "tier": tier, "kind": "start", "est_s": cost + 40})
            for family in dict.fromkeys(f for a in arms for f in a.families) if task == "arithmetic" else ():
                if family in tuned:
                    continue
                tuned.add(family)
                k = 0 if family == "sft" else 1
                count = design.spin_b1_lrs if family == "spin-b1" else len(design.lrs) + design.max_extensions
                for i in range(count):
                    for seed in design.tuning_seeds:
                        rows.append(
                            {
                                "name": f"{task}-tune-{family}-{i}-s{seed}",
                                "tier": tier,
                                "kind": "tune",
                                "est_s": estimate_s(design, k=k, epochs=design.epochs, tuning=True),
                            }
                        )
            for seed in design.final_seeds:
                for arm in arms:
                    sft = arm.families == ("sft",)
                    k = 0 if sft else (4 if "generation.num_samples=4" in arm.extra else 1)
                    epochs = matched_epochs if arm.matched else (1 if arm.data_scale > 1 else design.epochs)
                    est = estimate_s(
                        design, k=k, epochs=epochs, data_scale=arm.data_scale, tuning=False,
                        reuse=arm.name == "space-reuse",
                    )  # fmt: skip
                    rows.append(
                        {"name": f"{task}-{arm.name}-s{seed}", "tier": tier, "kind": "final", "est_s": est}
                    )
    return rows


def parse_args(argv: list[str] | None = None) -> tuple[Design, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/prereg"))
    p.add_argument(
        "--archive", type=Path, default=None, help="committed directory of finished runs' small files"
    )
    p.add_argument(
        "--max-tier", type=int, default=5, help="run the tiers up to this one (1: the primary arms)"
    )
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument(
        "--extra", nargs="*", default=["train.mixed_precision=bf16"], help="overrides for every run"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and its estimated cost; run nothing"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild every table from the archive alone (default experiments/prereg_runs) into --out",
    )
    a = p.parse_args(argv)
    design = Design(
        out=a.out, archive=a.archive, max_tier=a.max_tier, tasks=tuple(a.tasks), extra=list(a.extra)
    )
    return design, a


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    design, a = parse_args(argv)
    if a.dry_run:
        rows = plan(design)
        for r in rows:
            print(f"tier {r['tier']}  {r['kind']:5}  {r['est_s'] / 60:6.1f} min  {r['name']}")
        cumulative = 0.0
        for tier in sorted({r["tier"] for r in rows}):
            tier_s = sum(r["est_s"] for r in rows if r["tier"] == tier)
            cumulative += tier_s
            print(f"tier {tier}: {tier_s / 3600:5.1f} h   cumulative {cumulative / 3600:5.1f} h")
        print(f"steps per iteration: {design.steps_per_iteration()} (batch {design.global_batch})")
        return 0
    if a.report_only:
        import prereg_tables  # the analysis: matplotlib and the bootstrap, which running the grid needs not

        archive = design.archive or Path(__file__).resolve().parent / "prereg_runs"
        summary = prereg_tables.write_report(archive, design.out, design)
        print(prereg_tables.summary_text(summary))
        log.info("tables: %s", design.out / "results.md")
        return 0
    Preregistered(design, rep.subprocess_launcher(design.recipe)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
