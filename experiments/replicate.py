"""The SPACE paper's claims at small scale: a resumable, fairly tuned, compute-accounted grid.

Every run is an ordinary `spaceft run RECIPE …` (the demo recipe: SmolLM2-135M on the embedded
arithmetic task) with overrides, in its own directory under OUT, so re-running this script skips what
finished and resumes what did not. In order (each step only once the previous one finished):

1. start: one SFT model per training size N (the default model fine-tuned on the N real pairs), the
   shared start of every method at that N (the paper's SPIN/SPACE also start from an SFT model);
2. tune (first N, seed 0, judged on the *validation* split, never on test): each method's learning rate
   and its own knob (SPIN β, S-IPO τ, S-SimPO β/γ), a small set each; the best setting is the highest
   validation accuracy after the last iteration (lower validation NLL breaks ties);
3. final: every method at its best setting for every seed, judged on the held-out test split (steps 2
   and 3 go first for SPACE, SPIN and SFT; S-IPO and S-SimPO come last, after step 4, so that a partial
   grid already answers the paper's main claims). The seed-0 run trains exactly what the tuning run
   trained (evaluation is not part of the training fingerprint), so it is a copy of that run (weights
   hard-linked) re-evaluated on test, not a second training;
4. questions, every seed: SFT given SPACE's compute (more epochs per iteration, from the measured token
   counts), SFT on 4N (the paper's data-efficiency reference), SPACE with μ = K = 3, SPACE reusing
   iteration 0's samples; and at every further N: SPACE, SFT and SFT on 4N at the tuned settings.

Per run it records wall time, CPU time and peak RSS (OUT/grid_state.json; a resumed run sums its
invocations and says so) and, from the artefacts, the tokens forwarded and back-propagated
(`spaceft.costs`). The tables (one per question, every number with its 95% bootstrap interval over
problems and seeds and its seed count) and the plots are rebuilt after every run: OUT/results.md,
OUT/results.json, OUT/results.png.

    nice -n 19 python experiments/replicate.py --out runs/grid --archive experiments/grid_runs --sizes 16 64
    python experiments/replicate.py --out runs/grid --archive experiments/grid_runs --report-only

With --archive the finished runs' small files are kept in a directory that is committed
(`grid_archive`): a fresh clone restores them and goes on with what is left, and --report-only rebuilds
every table from the archive alone.

A finished run keeps its last iteration's model only (`--keep-models` keeps all): the demo model's
weights are 0.5 GB per iteration, and a full grid keeping all of them fills 70 GB. Start models stay, and
a tuning run keeps its models until the seed-0 run that adopts them has finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grid_archive
from intervals import pooled_interval
from replicate_tables import costs_of, diagnostics_of, write_results

from spaceft.configfile import load_config
from spaceft.costs import TRAIN_FACTOR, run_costs
from spaceft.rundir import read_json, write_json
from spaceft.tasks import write_arithmetic_jsonl

log = logging.getLogger("replicate")


@dataclass(frozen=True)
class Method:
    """A loss and the knob (besides the learning rate) tuned for it."""

    name: str
    overrides: tuple[str, ...]
    knobs: tuple[tuple[str, tuple[str, ...]], ...] = (("", ()),)
    """(label, overrides) candidates of the method's own hyper-parameter."""


METHODS = {
    "sft": Method("sft", ("train.loss=sft",)),
    "spin": Method(
        "spin", ("train.loss=spin",), (("beta0.1", ("train.beta=0.1",)), ("beta1", ("train.beta=1.0",)))
    ),
    "ipo": Method("ipo", ("train.loss=ipo",), (("tau0.1", ("train.tau=0.1",)), ("tau1", ("train.tau=1.0",)))),
    "simpo": Method(
        "simpo",
        ("train.loss=simpo",),
        (("b2g1", ("train.beta=2.0", "train.gamma=1.0")), ("b2g0.5", ("train.beta=2.0", "train.gamma=0.5"))),
    ),
    "space": Method("space", ("train.loss=space", "train.mu=1")),
}
QUESTIONS = ("sft-matched", "sft-4N", "space-mu3", "space-reuse")
DATA_SEED = 0
"""The task's data seed (the recipe's `data.seed`): training, validation and test problems all use it."""
PRIORITY = ("space", "spin", "sft")
"""Tuned and run first (the comparison the paper is about); the other methods follow."""


@dataclass
class GridSpec:
    """What the grid runs (the command-line flags)."""

    out: Path
    recipe: str = "demo"
    sizes: list[int] = field(default_factory=lambda: [16, 64])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    iterations: int = 3
    eval_size: int = 200
    val_size: int = 100
    lrs: list[float] = field(default_factory=lambda: [1e-5, 3e-6])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    questions: list[str] = field(default_factory=lambda: list(QUESTIONS))
    extra: list[str] = field(default_factory=list)
    """Overrides applied to every run (e.g. generation.max_new_tokens=64)."""
    archive: Path | None = None
    """Where finished runs' small files are kept (committed; `grid_archive`): restored into OUT at start,
    updated after every run."""
    keep_models: bool = False
    """Keep every iteration's model of a finished run; by default only the last iteration's is kept (the
    grid's 40-odd runs would otherwise hold every iteration's weights: 1.5 GB per demo run)."""

    def settings(self, method: str) -> list[tuple[str, tuple[str, ...]]]:
        """(label, overrides) of every tuning candidate: learning rates × the method's knob. The lr halves
        from iteration 2 on (SPIN's schedule shape)."""
        out = []
        for lr in self.lrs:
            for label, knob in METHODS[method].knobs:
                name = f"lr{lr:g}" + (f"-{label}" if label else "")
                out.append((name, (f"train.lr={lr:g}", f"train.lr_after={lr / 2:g}", *knob)))
        return out


@dataclass(frozen=True)
class Launch:
    """What one invocation of a run cost."""

    wall_s: float
    peak_rss_mb: float | None
    cpu_s: float | None = None
    """User + system CPU time of the run: on shared cores, the cost that contention does not inflate."""


Launcher = Callable[[str, list[str], bool], Launch]


def subprocess_launcher(recipe: str) -> Launcher:
    """`python -m spaceft -q run RECIPE overrides…` in a child process; its peak RSS from wait4."""

    def launch(name: str, overrides: list[str], force: bool) -> Launch:
        # To stop the grid, stop its process group (`kill -- -PGID`): the child run is in it.
        cmd = [
            sys.executable,
            "-m",
            "spaceft",
            "-q",
            "run",
            recipe,
            *overrides,
            *(["--force"] if force else []),
        ]
        log.info("%s: %s", name, " ".join(cmd[3:]))
        tic = time.perf_counter()
        proc = subprocess.Popen(cmd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise RuntimeError(f"run {name} failed (exit {proc.returncode}): {' '.join(cmd)}")
        cpu = usage.ru_utime + usage.ru_stime
        return Launch(time.perf_counter() - tic, usage.ru_maxrss / 1024, cpu)  # ru_maxrss in KiB on Linux

    return launch


def compute_matched_epochs(space_run: Path) -> int:
    """SFT epochs per iteration whose training compute equals a whole iteration (generation, scoring and
    training) of the finished self-play run `space_run`, from its token counts."""
    from spaceft.rundata import training_data

    tokenized = training_data(space_run)
    costs = run_costs(space_run, tokenized)
    per_iteration = sum(c.compute for c in costs) / len(costs)
    sft_epoch = TRAIN_FACTOR * sum(len(t.prompt_ids) + len(t.response_ids) for t in tokenized)
    return max(1, round(per_iteration / sft_epoch))


class Grid:
    """Runs the grid in order, skipping finished runs; keeps OUT/grid_state.json."""

    def __init__(self, spec: GridSpec, launcher: Launcher) -> None:
        self.spec = spec
        self.launch = launcher
        self.out = spec.out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = self.out / "grid_state.json"
        self.state: dict[str, Any] = read_json(self.state_path) if self.state_path.exists() else {}
        self.state.setdefault("runs", {})
        self.state.setdefault("best", {})
        self.state.setdefault("matched_epochs", {})
        self.launched = 0
        self.archive = spec.archive.resolve() if spec.archive else None

    # ------------------------------------------------------------------------------- bookkeeping

    def save(self) -> None:
        write_json(self.state_path, self.state)

    def run_dir(self, name: str) -> Path:
        return self.out / name

    def finished(self, name: str, iterations: int, evaluated: bool = True) -> bool:
        """Every iteration trained (and, when `evaluated`, the start and every iteration evaluated)."""
        path = self.run_dir(name) / "manifest.json"
        if not path.exists():
            return False
        done = read_json(path).get("iterations", {})
        ok = all(done.get(str(t), {}).get("train", {}).get("status") == "done" for t in range(iterations))
        if evaluated:
            keys = ["base", *(str(t) for t in range(iterations))]
            ok = ok and all(done.get(k, {}).get("eval", {}).get("status") == "done" for k in keys)
        return ok

    def ensure(
        self,
        name: str,
        overrides: list[str],
        *,
        group: str,
        seed: int,
        n: int,
        iterations: int | None = None,
        evaluated: bool = True,
        force: bool = False,
    ) -> Path:
        """Run `name` unless it finished; record its invocation's wall time and peak memory."""
        t = self.spec.iterations if iterations is None else iterations
        entry = self.state["runs"].setdefault(name, {"wall_s": 0.0, "invocations": 0, "peak_rss_mb": None})
        entry.update(group=group, seed=seed, n=n)
        if not self.finished(name, t, evaluated):
            # counted before it starts: an invocation killed midway marks the run as resumed (its wall
            # time is then a lower bound: the killed part is not recorded)
            entry["invocations"] += 1
            entry.pop("costs", None)  # what the tables cached of an earlier invocation is recomputed
            (self.run_dir(name) / grid_archive.DIAGNOSTICS).unlink(missing_ok=True)
            self.save()
            full = [f"name={name}", f"output_dir={self.out}", *overrides]
            cost = self.launch(name, full, force)
            self.launched += 1
            entry["wall_s"] += cost.wall_s
            if cost.cpu_s is not None:
                entry["cpu_s"] = entry.get("cpu_s", 0.0) + cost.cpu_s
            if cost.peak_rss_mb is not None:
                entry["peak_rss_mb"] = max(entry["peak_rss_mb"] or 0.0, cost.peak_rss_mb)
            self.save()
            self.report()
            self.save_archive()
            self.prune()
        self.save()
        return self.run_dir(name)

    def prune(self) -> None:
        """Delete the models of finished runs that nothing needs any more, keeping each run's last
        iteration's: not the start models (every run starts from one), nor a tuning run's before its
        method's best setting is chosen and, for the best, before the seed-0 run that adopts its models
        finished. Unless `keep_models`."""
        if self.spec.keep_models:
            return
        adopters = {
            b["run"]: f"{m}-N{b['run'].rsplit('-N', 1)[1]}-s{self.spec.seeds[0]}"
            for m, b in self.state["best"].items()
        }
        for name, entry in self.state["runs"].items():
            group = entry.get("group", "")
            if group == "start" or not self.finished(name, self.spec.iterations):
                continue
            if group.startswith("tune-"):
                if group.removeprefix("tune-") not in self.state["best"]:
                    continue
                if name in adopters and not self.finished(adopters[name], self.spec.iterations):
                    continue
            models = sorted(self.run_dir(name).glob("iter_*/model"), key=lambda m: int(m.parent.name[5:]))
            for model in models[:-1]:  # the run's own last one stays (it may have more than --iterations)
                shutil.rmtree(model)

    def report(self) -> None:
        try:
            write_results(self.out, self.state, self.spec.iterations)
        except Exception:  # a table that cannot be built must not stop a grid of many hours
            log.exception("could not rebuild the tables; the grid goes on (rebuild with --report-only)")

    def restore(self, size: int | None = None) -> None:
        """The archived runs of training size `size` (all when None) into OUT, where they count as
        finished. The grid calls it for a size once that size's start model has been checked."""
        if not self.archive:
            return
        restored = grid_archive.restore(self.out, self.state, self.archive, size)
        if restored:
            log.info("restored %d finished runs from %s: %s", len(restored), self.archive, " ".join(restored))
        self.save()

    def save_archive(self) -> None:
        """The finished runs' small files into the archive (after the tables: they compute diagnostics);
        the matched SFT epochs first, while the SPACE run they come from still has its artefacts."""
        if not self.archive:
            return
        runs = self.state["runs"]
        starts = [n for n, e in runs.items() if e.get("group") == "start"]
        done = [n for n, e in runs.items() if n not in starts and self.finished(n, self.spec.iterations)]
        try:
            for n in self.spec.sizes:
                space = f"space-N{n}-s{self.spec.seeds[0]}"
                if space in done and (self.run_dir(space) / "iter_0" / "synthetic.parquet").exists():
                    self.matched_epochs(n)
            for name in done:  # what the tables need of a run that has no artefacts left
                costs_of(self.out, self.state, name)
                diagnostics_of(self.run_dir(name))
            self.save()
            failed = grid_archive.save(self.out, self.state, self.archive, done, starts)
            if failed:
                log.warning("not archived (the next run tries again): %s", " ".join(failed))
        except Exception:  # as for the tables: the runs themselves are safe in OUT
            log.exception("could not update the archive %s; the grid goes on", self.archive)

    # ------------------------------------------------------------------------------- the grid

    def common(self, n: int) -> list[str]:
        return [f"data.train_size={n}", f"selfplay.iterations={self.spec.iterations}", *self.spec.extra]

    def test_eval(self) -> list[str]:
        return ["data.eval=builtin:arithmetic", f"data.eval_size={self.spec.eval_size}"]

    def validation_eval(self) -> list[str]:
        """The validation split of the training data's seed (disjoint from its first 512 problems)."""
        path = self.out / "data" / f"arithmetic_validation_{self.spec.val_size}_seed{DATA_SEED}.jsonl"
        if not path.exists():
            write_arithmetic_jsonl(path, self.spec.val_size, seed=DATA_SEED, split="validation")
        return [f"data.eval={path}", f"data.eval_size={self.spec.val_size}"]

    def start(self, n: int) -> str:
        """The shared SFT start at size n; returns the override that starts from it."""
        name = f"start-N{n}"
        overrides = [
            f"data.train_size={n}",
            "train.loss=sft",
            "selfplay.iterations=1",
            "eval.enabled=false",
            *self.spec.extra,
        ]
        self.ensure(name, overrides, group="start", seed=0, n=n, iterations=1, evaluated=False)
        if self.archive:
            grid_archive.check_start(self.out, self.archive, name)
            self.restore(n)
            self.save_archive()  # anything finished that an interrupted grid did not archive
        return f"model.name={self.run_dir(name) / 'iter_0' / 'model'}"

    def tune(self, n: int, start: str, method: str) -> None:
        """Run every candidate setting of `method` (seed 0, validation split) and keep the best."""
        seed = self.spec.seeds[0]
        candidates = []
        for label, setting in self.spec.settings(method):
            name = f"tune-{method}-{label}-N{n}"
            overrides = [
                *self.common(n),
                start,
                *seeded(seed),
                *METHODS[method].overrides,
                *setting,
                *self.validation_eval(),
            ]
            self.ensure(name, overrides, group=f"tune-{method}", seed=seed, n=n)
            candidates.append((label, name, setting))
        self.state["best"][method] = select(self.out, candidates, self.spec.iterations)
        self.save()

    def setting(self, method: str) -> list[str]:
        return list(self.state["best"][method]["overrides"])

    def final(self, n: int, start: str, seed: int, method: str) -> None:
        name = f"{method}-N{n}-s{seed}"
        overrides = [
            *self.common(n),
            start,
            *seeded(seed),
            *METHODS[method].overrides,
            *self.setting(method),
            *self.test_eval(),
        ]
        tuned = self.state["best"][method]["run"]
        force = False
        has_models = all(
            (self.run_dir(tuned) / f"iter_{t}" / "model").is_dir() for t in range(self.spec.iterations)
        )
        if (
            not self.run_dir(name).exists()
            and tuned.endswith(f"N{n}")
            and seed == self.spec.seeds[0]
            and has_models
        ):
            # (a tuning run restored from the archive has no models: the final run trains them anew)
            force = adopt(self.run_dir(tuned), self.run_dir(name), overrides, self.spec.recipe)
        self.ensure(name, overrides, group=f"{method}-N{n}", seed=seed, n=n, force=force)

    def question(self, n: int, start: str, seed: int, q: str) -> None:
        space = [*METHODS["space"].overrides, *self.setting("space")]
        sft = [*METHODS["sft"].overrides, *self.setting("sft")]
        if q == "sft-matched":
            sft = [*sft, f"train.epochs={self.matched_epochs(n)}"]
        extra = {
            "sft-matched": sft,
            "sft-4N": [*sft, f"data.train_size={4 * n}"],
            "space-mu3": [*space, "train.mu=3", "generation.num_samples=3"],
            # an ablation whose noise is not the opponent's: spaceft asks for the opt-in (config.py)
            "space-reuse": [*space, "selfplay.resample=false", "generation.allow_biased_sampling=true"],
        }[q]
        name = f"{q}-N{n}-s{seed}"
        overrides = [*self.common(n), start, *seeded(seed), *extra, *self.test_eval()]
        self.ensure(name, overrides, group=f"{q}-N{n}", seed=seed, n=n)

    def matched_epochs(self, n: int) -> int:
        """SFT epochs per iteration whose training compute equals SPACE's whole iteration (generation,
        scoring and training), from the seed-0 SPACE run's token counts; fixed once computed."""
        key = str(n)
        if key not in self.state["matched_epochs"]:
            self.state["matched_epochs"][key] = compute_matched_epochs(
                self.run_dir(f"space-N{n}-s{self.spec.seeds[0]}")
            )
            self.save()
        return int(self.state["matched_epochs"][key])

    def run(self) -> None:
        """The whole grid, in the order of the module docstring."""
        first = self.spec.sizes[0]
        start = self.start(first)
        core = [m for m in PRIORITY if m in self.spec.methods]
        rest = [m for m in self.spec.methods if m not in PRIORITY]
        self.methods(first, start, core)
        for seed in self.spec.seeds:
            for q in self.spec.questions:
                self.question(first, start, seed, q)
        for n in self.spec.sizes[1:]:
            start_n = self.start(n)
            for seed in self.spec.seeds:
                for method in ("space", "sft"):
                    self.final(n, start_n, seed, method)
                self.question(n, start_n, seed, "sft-4N")
        self.methods(first, start, rest)
        self.report()
        self.prune()

    def methods(self, n: int, start: str, methods: list[str]) -> None:
        """Tune `methods` at size n, then run each at its best setting for every seed."""
        for method in methods:
            self.tune(n, start, method)
        for seed in self.spec.seeds:
            for method in methods:
                self.final(n, start, seed, method)


def seeded(seed: int) -> list[str]:
    """Training order and sampling seeds (the start model and the data are shared by all seeds)."""
    return [f"train.seed={seed}", f"generation.seed={seed}"]


def select(out: Path, candidates: list[tuple[str, str, tuple[str, ...]]], iterations: int) -> dict[str, Any]:
    """The candidate with the highest validation accuracy after the last iteration (ties: lower NLL)."""
    scored = []
    for label, name, setting in candidates:
        rows = [json.loads(x) for x in (out / name / f"iter_{iterations - 1}" / "eval_samples.jsonl").open()]
        acc = pooled_interval([[r["correct"] for r in rows]]).estimate
        nll = -sum(r["logp"] for r in rows) / sum(r["tokens"] for r in rows)
        scored.append(
            (
                (-acc, nll),
                {
                    "label": label,
                    "run": name,
                    "overrides": list(setting),
                    "val_accuracy": acc,
                    "val_nll": nll,
                },
            )
        )
    scored.sort(key=lambda s: s[0])
    return scored[0][1]


def adopt(tuned: Path, final: Path, overrides: list[str], recipe: str) -> bool:
    """Make `final` a copy (weights hard-linked) of the finished tuning run `tuned` when both train the same
    models (same training fingerprint); its evaluations are then redone on test (the copy's manifest
    forgets them, and the caller passes --force because the evaluation settings changed). Returns
    whether it adopted."""
    a = load_config(recipe, ["name=x", *overrides])
    stored = read_json(tuned / "manifest.json")
    if stored.get("fingerprint") != a.training_fingerprint():
        log.warning("%s trains something else than %s: training it anew", final.name, tuned.name)
        return False
    tmp = final.with_name(f".{final.name}.adopt")
    shutil.rmtree(tmp, ignore_errors=True)
    skip = shutil.ignore_patterns("eval*", "report.md", "*.png", "*.lock", grid_archive.DIAGNOSTICS)
    shutil.copytree(tuned, tmp, copy_function=_link_or_copy, ignore=skip)
    manifest = read_json(tmp / "manifest.json")
    for stages in manifest["iterations"].values():
        stages.pop("eval", None)
    write_json(tmp / "manifest.json", manifest)  # a new file (atomic rename): the tuning run keeps its own
    tmp.rename(final)
    log.info("%s: adopted the models of %s; re-evaluating on the test split", final.name, tuned.name)
    return True


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link weights and tables (written once, by rename, never in place); copy the small files,
    some of which are appended to or rewritten in place (metrics.jsonl; the lock is not copied)."""
    if src.endswith((".safetensors", ".parquet", ".bin")):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def parse_args(argv: list[str] | None = None) -> tuple[GridSpec, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/grid"))
    p.add_argument("--recipe", default="demo")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64], help="N real pairs; tuning at the first")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--eval-size", type=int, default=200, help="held-out test problems")
    p.add_argument("--val-size", type=int, default=100, help="validation problems (tuning only)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-6])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--questions", nargs="*", default=list(QUESTIONS), choices=list(QUESTIONS))
    p.add_argument("--extra", nargs="*", default=[], help="overrides applied to every run")
    p.add_argument(
        "--archive",
        type=Path,
        default=None,
        help="directory (committed) that keeps finished runs' small files: restored at start, "
        "updated after every run, enough for --report-only on a fresh clone",
    )
    p.add_argument(
        "--keep-models",
        action="store_true",
        help="keep every iteration's model of finished runs (default: only the last iteration's)",
    )
    p.add_argument("--report-only", action="store_true", help="rebuild the tables from finished runs")
    a = p.parse_args(argv)
    if "sft" not in a.methods or "space" not in a.methods:
        p.error("--methods must include sft and space (the questions compare against them)")
    spec = GridSpec(
        a.out,
        a.recipe,
        a.sizes,
        a.seeds,
        a.iterations,
        a.eval_size,
        a.val_size,
        a.lrs,
        a.methods,
        a.questions,
        a.extra,
        a.archive,
        a.keep_models,
    )
    return spec, a.report_only


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    spec, report_only = parse_args(argv)
    grid = Grid(spec, subprocess_launcher(spec.recipe))
    if report_only:
        grid.restore()  # the archive is only read here: the grid that runs writes it
        grid.report()
        grid.save()  # costs computed for the tables are kept
    else:
        grid.run()
    log.info("tables: %s", grid.out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
