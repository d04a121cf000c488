"""The SPACE paper's claims at small scale: SmolLM2-135M on the embedded arithmetic task.

From one SFT start (the default model fine-tuned on the N real pairs), runs T self-play iterations of
SFT, SPIN, S-IPO, S-SimPO and SPACE (mu = 1) for several seeds, plus three ablations:
  * data efficiency: SFT on 4N real pairs vs SPACE on N
  * mu: SPACE with mu = K = 3 (and its cost)
  * resampling: SPACE that reuses iteration 0's synthetic data (more epochs on fixed data)
Each run is an ordinary `spaceft run` of the demo recipe with overrides (so it resumes: re-running this
script skips finished work). Writes OUT/results.md (tables: mean ± std over seeds, per iteration),
OUT/results.json and OUT/results.png.

    python benchmarks/replicate.py --out runs/replicate --seeds 0 1 --iterations 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = {
    "sft": ["train.loss=sft"],
    "spin": ["train.loss=spin", "train.beta=0.1"],
    "ipo": ["train.loss=ipo"],
    "simpo": ["train.loss=simpo"],
    "space": ["train.loss=space", "train.mu=1"],
}


def run(name: str, overrides: list[str], out: Path, timings: dict[str, float]) -> Path:
    """`spaceft run demo` with overrides, in a subprocess; returns the run directory."""
    run_dir = out / name
    cmd = [
        sys.executable,
        "-m",
        "spaceft",
        "-q",
        "run",
        "demo",
        f"name={name}",
        f"output_dir={out}",
        *overrides,
    ]
    print(f"[replicate] {name}: {' '.join(cmd[3:])}", flush=True)
    tic = time.perf_counter()
    subprocess.run(cmd, check=True)
    if name not in timings:  # the first (uninterrupted) run's wall time is the one to report
        timings[name] = time.perf_counter() - tic
    return run_dir


def evals(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads((run_dir / "base" / "eval.json").read_text())] if (run_dir / "base").exists() else []
    t = 0
    while (run_dir / f"iter_{t}" / "eval.json").exists():
        rows.append(json.loads((run_dir / f"iter_{t}" / "eval.json").read_text()))
        t += 1
    return rows


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(groups: dict[str, list[Path]], metric: str, iterations: int) -> str:
    head = "| method | start | " + " | ".join(f"iter {t + 1}" for t in range(iterations)) + " |"
    lines = [head, "|" + "---|" * (iterations + 2)]
    for label, dirs in groups.items():
        per_run = [evals(d) for d in dirs]
        cells = []
        for i in range(iterations + 1):
            vals = [r[i][metric] for r in per_run if len(r) > i and metric in r[i]]
            cells.append(mean_std(vals))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups: dict[str, list[Path]], out: Path, iterations: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, dirs in groups.items():
        per_run = [evals(d) for d in dirs]
        for ax, metric in zip(axes, ("accuracy", "nll"), strict=True):
            xs, mu, sd = [], [], []
            for i in range(iterations + 1):
                vals = [r[i][metric] for r in per_run if len(r) > i and metric in r[i]]
                if vals:
                    xs.append(i)
                    mu.append(statistics.mean(vals))
                    sd.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            line = ax.plot(xs, mu, "o-", label=label)[0]
            ax.fill_between(
                xs,
                [m - s for m, s in zip(mu, sd, strict=True)],
                [m + s for m, s in zip(mu, sd, strict=True)],
                color=line.get_color(),
                alpha=0.15,
            )
    axes[0].set(title="held-out exact match", xlabel="self-play iteration (0 = SFT start)", ylabel="accuracy")
    axes[1].set(title="held-out NLL per token", xlabel="self-play iteration (0 = SFT start)", ylabel="NLL")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/replicate"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--train-size", type=int, default=32, help="N real pairs")
    p.add_argument("--eval-size", type=int, default=48)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--extra", nargs="*", default=[], help="overrides applied to every run")
    args = p.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    common = [f"data.train_size={args.train_size}", f"data.eval_size={args.eval_size}", *args.extra]

    def save_timings() -> None:
        timings_path.write_text(json.dumps(timings, indent=2))

    # step 1: the SFT start, shared by every method
    start = run(
        "sft-start", [*common, "train.loss=sft", "selfplay.iterations=1", "eval.enabled=false"], out, timings
    )
    save_timings()
    start_model = f"model.name={start / 'iter_0' / 'model'}"
    # step 2: T self-play iterations of every method, every seed
    groups: dict[str, list[Path]] = {}
    for seed in args.seeds:
        seeded = [*common, start_model, f"selfplay.iterations={args.iterations}",
                  f"train.seed={seed}", f"generation.seed={seed}"]  # fmt: skip
        for method in args.methods:
            d = run(f"{method}-s{seed}", [*seeded, *METHODS[method]], out, timings)
            groups.setdefault(method, []).append(d)
            save_timings()
        if args.no_ablations or seed != args.seeds[0]:
            continue  # ablations on the first seed only: they cost as much as the main grid
        # step 3: ablations
        ablations = {
            "sft-4N": [*seeded, "train.loss=sft", f"data.train_size={4 * args.train_size}"],
            "space-mu3": [*seeded, "train.loss=space", "train.mu=3", "generation.num_samples=3"],
            "space-fixed-data": [*seeded, "train.loss=space", "selfplay.resample=false"],
        }
        for label, overrides in ablations.items():
            groups.setdefault(label, []).append(run(f"{label}-s{seed}", overrides, out, timings))
            save_timings()
    # step 4: tables and plot
    results = {label: [evals(d) for d in dirs] for label, dirs in groups.items()}
    (out / "results.json").write_text(json.dumps({"results": results, "timings_s": timings}, indent=2))
    md = [
        f"N = {args.train_size} real pairs, {args.eval_size} held-out, seeds {args.seeds}, "
        f"{args.iterations} iterations from one SFT start. Mean ± std over seeds.",
        "",
        "### Held-out exact match",
        "",
        table(groups, "accuracy", args.iterations),
        "",
        "### Held-out NLL per token",
        "",
        table(groups, "nll", args.iterations),
        "",
        "### Wall time per run (s)",
        "",
        "| run | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in timings.items()],
    ]
    (out / "results.md").write_text("\n".join(md) + "\n")
    plot(groups, out, args.iterations)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
