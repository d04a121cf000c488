"""Tables and plots of the replication grid (`replicate.py`), one table per question of the paper.

Every accuracy and NLL is pooled over seeds × held-out problems with its 95% crossed-bootstrap interval
(`intervals.py`); differences are paired on the same problems and seeds. Training-side numbers
(rewards, log-likelihoods, sample statistics) are one number per run, so their interval is over seeds
only. Compute is in forward-token equivalents (`spaceft.costs`): tokens forwarded + 3 × tokens trained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from grid_archive import DIAGNOSTICS
from intervals import Interval, paired_difference, pooled_interval

from spaceft.costs import run_costs
from spaceft.report import collect_diagnostics
from spaceft.rundir import read_json, write_json

log = logging.getLogger("replicate")

Table = dict[str, np.ndarray]
"""Per-problem arrays of one evaluation, [seeds, problems]: correct, logp, tokens."""


def _finished(run_dir: Path, iterations: int) -> bool:
    m = run_dir / "manifest.json"
    if not m.exists():
        return False
    done = json.loads(m.read_text()).get("iterations", {})
    return all(done.get(str(t), {}).get("eval", {}).get("status") == "done" for t in range(iterations))


def groups(out: Path, state: dict[str, Any], iterations: int) -> dict[str, dict[int, Path]]:
    """group -> {seed: run directory} of the runs that finished."""
    found: dict[str, dict[int, Path]] = {}
    for name, entry in state["runs"].items():
        if entry.get("group") and entry["group"] != "start" and _finished(out / name, iterations):
            found.setdefault(entry["group"], {})[entry["seed"]] = out / name
    return found


def eval_table(runs: dict[int, Path], key: str) -> Table | None:
    """The per-problem results of evaluation `key` ('base' or 'iter_T') across the seeds that have it."""
    rows = []
    for seed in sorted(runs):
        path = runs[seed] / key / "eval_samples.jsonl"
        if path.exists():
            rows.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        return None
    return {
        k: np.array([[x[k] for x in r] for r in rows], dtype=float) for k in ("correct", "logp", "tokens")
    }


def accuracy(t: Table) -> Interval:
    return pooled_interval(t["correct"])


def nll(t: Table) -> Interval:
    return pooled_interval(-t["logp"], t["tokens"])


def differences(a: Table, b: Table) -> tuple[Interval, Interval]:
    """(accuracy a - b, NLL a - b), paired; a and b must share problems and seed count."""
    s = min(len(a["correct"]), len(b["correct"]))
    a, b = {k: v[:s] for k, v in a.items()}, {k: v[:s] for k, v in b.items()}
    return (
        paired_difference(a["correct"], b["correct"]),
        paired_difference(-a["logp"], -b["logp"], a["tokens"], b["tokens"]),
    )


def _cell(iv: Interval | None, spec: str = ".3f") -> str:
    return iv.format(spec) if iv is not None else ""


def _diff(iv: Interval, spec: str = "+.3f") -> str:
    return iv.format(spec) + (" *" if iv.excludes_zero else "")


def diagnostics_of(run_dir: Path) -> list[dict[str, Any]]:
    """A finished run's per-iteration diagnostics, computed once and kept beside it (DIAGNOSTICS), so that
    an archived run (no parquet tables, `grid_archive`) still has them."""
    path = run_dir / DIAGNOSTICS
    if path.exists():
        return list(read_json(path))
    rows = collect_diagnostics(run_dir)
    write_json(path, rows)
    return rows


def costs_of(out: Path, state: dict[str, Any], name: str) -> list[dict[str, int]]:
    """Per-iteration token counts of a finished run, computed once and kept in the grid state."""
    entry = state["runs"][name]
    if "costs" not in entry:
        entry["costs"] = [c.as_dict() for c in run_costs(out / name)]
    return entry["costs"]


def group_cost(out: Path, state: dict[str, Any], runs: dict[int, Path]) -> dict[str, float]:
    """Mean tokens and wall time over a group's runs, and their largest peak memory."""
    names = [p.name for p in runs.values()]
    per_run = [costs_of(out, state, n) for n in names]
    entries = [state["runs"][n] for n in names]
    rss = [e["peak_rss_mb"] for e in entries if e.get("peak_rss_mb")]
    return {
        "forwarded": float(np.mean([sum(c["forwarded"] for c in r) for r in per_run])),
        "trained": float(np.mean([sum(c["trained"] for c in r) for r in per_run])),
        "compute": float(np.mean([sum(c["compute"] for c in r) for r in per_run])),
        "cumulative": [float(x) for x in np.mean([np.cumsum([c["compute"] for c in r]) for r in per_run], 0)],
        "wall_s": float(np.mean([e["wall_s"] for e in entries])),
        "cpu_s": float(np.mean([e["cpu_s"] for e in entries]))
        if all("cpu_s" in e for e in entries)
        else float("nan"),
        "peak_rss_mb": max(rss) if rss else float("nan"),
        "resumed": sum(e["invocations"] > 1 for e in entries),
    }


# ------------------------------------------------------------------------------------------ tables


def trajectory_tables(
    g: dict[str, dict[int, Path]], methods: list[str], n: int, iterations: int
) -> list[str]:
    keys = ["base", *(f"iter_{t}" for t in range(iterations))]
    head = "| method | seeds | start | " + " | ".join(f"iter {t + 1}" for t in range(iterations)) + " |"
    rule = "|" + "---|" * (iterations + 3)
    lines: list[str] = []
    for title, fn in (("Held-out exact match", accuracy), ("Held-out NLL per token", nll)):
        lines += [f"#### {title} (N = {n})", "", head, rule]
        for m in methods:
            runs = g.get(f"{m}-N{n}")
            if not runs:
                continue
            tables = [eval_table(runs, k) for k in keys]
            lines.append(
                f"| {m} | {len(runs)} | " + " | ".join(_cell(fn(t)) if t else "" for t in tables) + " |"
            )
        lines.append("")
    lines += [
        f"#### Change from the start to the last iteration, paired (N = {n}; * = interval excludes 0)",
        "",
        "| method | seeds | Δ accuracy | Δ NLL | best iteration (accuracy) |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        runs = g.get(f"{m}-N{n}")
        if not runs:
            continue
        start, last = eval_table(runs, "base"), eval_table(runs, keys[-1])
        if start is None or last is None:
            continue
        d_acc, d_nll = differences(last, start)
        accs = [accuracy(t).estimate if (t := eval_table(runs, k)) else -1 for k in keys]
        best = int(np.argmax(accs))
        lines.append(
            f"| {m} | {len(runs)} | {_diff(d_acc)} | {_diff(d_nll)} | "
            f"{'start' if best == 0 else best} ({accs[best]:.3f}) |"
        )
    return [*lines, ""]


def comparison_table(
    out: Path,
    state: dict[str, Any],
    g: dict[str, dict[int, Path]],
    rows: list[str],
    reference: str,
    iterations: int,
) -> list[str]:
    """Final-iteration accuracy and NLL of each group, its paired difference from `reference`, its cost."""
    key = f"iter_{iterations - 1}"
    ref = g.get(reference)
    ref_t = eval_table(ref, key) if ref else None
    lines = [
        f"| run | seeds | accuracy | NLL | Δ acc vs {reference} | Δ NLL vs {reference} "
        "| compute (fwd-token eq.) | trained tokens | wall s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in rows:
        runs = g.get(label)
        t = eval_table(runs, key) if runs else None
        if t is None or runs is None:
            lines.append(f"| {label} | 0 | not run yet |  |  |  |  |  |  |  |")
            continue
        d = differences(t, ref_t) if ref_t is not None and label != reference else None
        c = group_cost(out, state, runs)
        lines.append(
            f"| {label} | {len(runs)} | {_cell(accuracy(t))} | {_cell(nll(t))} | "
            f"{_diff(d[0]) if d else ''} | {_diff(d[1]) if d else ''} | {c['compute']:.3g} | "
            f"{c['trained']:.3g} | {c['wall_s']:.0f} | {c['peak_rss_mb'] / 1024:.2f} |"
        )
    return [*lines, ""]


METHOD_ORDER = ("sft", "spin", "ipo", "simpo", "space")


def _order(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def tuning_table(out: Path, state: dict[str, Any], iterations: int) -> list[str]:
    lines = ["| method | setting | validation accuracy | validation NLL | chosen |", "|---|---|---|---|---|"]
    tuned = [(n, e) for n, e in state["runs"].items() if str(e.get("group", "")).startswith("tune-")]
    # in a fixed order, not the state's (a restored state has another): by method, then by setting
    tuned.sort(key=lambda r: (_order(r[1]["group"].removeprefix("tune-")), r[0]))
    for name, entry in tuned:
        if not _finished(out / name, iterations):
            continue
        method = entry["group"].removeprefix("tune-")
        t = eval_table({0: out / name}, f"iter_{iterations - 1}")
        if t is None:
            continue
        chosen = state["best"].get(method, {}).get("run") == name
        label = name.removeprefix(f"tune-{method}-").rsplit("-N", 1)[0]
        lines.append(
            f"| {method} | {label} | {_cell(accuracy(t))} | {_cell(nll(t))} | {'**yes**' if chosen else ''} |"
        )
    return [*lines, ""]


DIAG = (
    ("logp_real_opponent", "log p real (opponent θt)", ".1f"),
    ("logp_real", "log p real (player)", ".1f"),
    ("reward_real", "reward real", "+.2f"),
    ("reward_synthetic", "reward synthetic", "+.2f"),
    ("identical", "synthetic = real", ".2f"),
    ("syn_length", "synthetic length", ".1f"),
    ("syn_capped", "capped", ".2f"),
)


def diagnostics_tables(g: dict[str, dict[int, Path]], labels: list[str], iterations: int) -> list[str]:
    """Per group and iteration: each diagnostic's mean over seeds [lowest, highest seed]."""
    lines = [
        "| run | iter | seeds | " + " | ".join(d[1] for d in DIAG) + " |",
        "|" + "---|" * (len(DIAG) + 3),
    ]
    for label in labels:
        runs = g.get(label)
        if not runs:
            continue
        per_seed = [diagnostics_of(p) for p in runs.values()]
        for t in range(iterations):
            cells = []
            for key, _, spec in DIAG:
                vals = [rows[t][key] for rows in per_seed if len(rows) > t and key in rows[t]]
                if not vals:
                    cells.append("")
                elif len(vals) == 1:
                    cells.append(f"{vals[0]:{spec}}")
                else:  # with 3 seeds a bootstrap over seeds gives back min and max: say so
                    mean = sum(vals) / len(vals)
                    cells.append(f"{mean:{spec}} [{min(vals):{spec}}, {max(vals):{spec}}]")
            lines.append(f"| {label} | {t + 1} | {len(runs)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def cost_table(out: Path, state: dict[str, Any], g: dict[str, dict[int, Path]]) -> list[str]:
    lines = [
        "| run | seeds | tokens forwarded only | tokens trained | compute (fwd-token eq.) | wall s (mean) "
        "| CPU s (mean) | peak RSS GB (max) | resumed runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in sorted(g):
        if label.startswith("tune-"):
            continue
        c = group_cost(out, state, g[label])
        lines.append(
            f"| {label} | {len(g[label])} | {c['forwarded']:.3g} | {c['trained']:.3g} | {c['compute']:.3g} "
            f"| {c['wall_s']:.0f} | {c['cpu_s']:.0f} | {c['peak_rss_mb'] / 1024:.2f} | {c['resumed']} |"
        )
    return [*lines, ""]


# ------------------------------------------------------------------------------------------ plots


def plot(
    out: Path, state: dict[str, Any], g: dict[str, dict[int, Path]], labels: list[str], iterations: int
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    keys = ["base", *(f"iter_{t}" for t in range(iterations))]
    colors = plt.get_cmap("tab20").colors  # the default cycle repeats after 10 rows; the grid has more
    for number, label in enumerate(labels):
        runs = g.get(label)
        if not runs:
            continue
        tables = [eval_table(runs, k) for k in keys]
        cumulative = [0.0, *group_cost(out, state, runs)["cumulative"]]
        for row, fn in enumerate((accuracy, nll)):
            ivs = [(i, fn(t)) for i, t in enumerate(tables) if t is not None]
            xs = [i for i, _ in ivs]
            est = [iv.estimate for _, iv in ivs]
            lo = [iv.low for _, iv in ivs]
            hi = [iv.high for _, iv in ivs]
            color = colors[(2 * number + number // 10) % len(colors)]  # the dark shades first
            line = axes[row, 0].plot(xs, est, "o-", color=color, label=f"{label} ({len(runs)} seeds)")[0]
            axes[row, 0].fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
            cx = [cumulative[i] for i in xs]
            err = [np.subtract(est, lo), np.subtract(hi, est)]
            axes[row, 1].errorbar(cx, est, yerr=err, fmt="o-", color=line.get_color(), capsize=2)
    axes[0, 0].set(title="held-out exact match (95% CI)", ylabel="accuracy")
    axes[1, 0].set(title="held-out NLL per token (95% CI)", ylabel="NLL", xlabel="iteration (0 = SFT start)")
    axes[0, 1].set(title="accuracy against training compute", ylabel="accuracy")
    axes[1, 1].set(
        title="NLL against training compute",
        ylabel="NLL",
        xlabel="cumulative compute (forward-token equivalents)",
    )
    for ax in axes[:, 1]:  # runs at N = 16 cost 10-100x less than at N = 64: log beyond 10^4, linear to 0
        ax.set_xscale("symlog", linthresh=1e4)
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(out: Path, state: dict[str, Any], iterations: int) -> None:
    """OUT/results.md (every table), OUT/results.json (every interval) and OUT/results.png."""
    g = groups(out, state, iterations)
    sizes = sorted({e["n"] for e in state["runs"].values() if "n" in e})
    if not sizes:
        return
    n0 = sizes[0]
    methods = [m for m in METHOD_ORDER if f"{m}-N{n0}" in g]
    md = [
        "### Tuning on the validation split (seed 0, one run per setting)",
        "",
        *tuning_table(out, state, iterations),
    ]
    md += ["### Q1: does SPACE improve steadily while the margin methods peak and degrade?", ""]
    md += trajectory_tables(g, methods, n0, iterations)
    # the further sizes run SPACE, SFT and SFT on 4N: their own trajectories and diagnostics
    later = {n: [m for m in ("sft", "sft-4N", "space") if f"{m}-N{n}" in g] for n in sizes[1:]}
    for n, ran in later.items():
        md += trajectory_tables(g, ran, n, iterations)
    for n in sizes:  # (the first size's table lists every row, finished or not; the others what ran)
        named = {f"sft-N{n}": "SFT on N", f"sft-matched-N{n}": "on N with SPACE's compute"}
        named[f"sft-4N-N{n}"] = "on 4N"
        rows = [f"space-N{n}", *(r for r in named if r in g or n == n0)]
        parts = [named[r] for r in rows[1:]] or ["SFT"]
        title = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
        md += [f"### Q2: SPACE on N = {n} against {title}", ""]
        md += comparison_table(out, state, g, rows, f"space-N{n}", iterations)
    md += ["### Q3: μ = K = 3 against μ = 1 (gain and cost)", ""]
    md += comparison_table(out, state, g, [f"space-N{n0}", f"space-mu3-N{n0}"], f"space-N{n0}", iterations)
    md += ["### Q4: fresh samples every iteration against reusing iteration 0's", ""]
    md += comparison_table(out, state, g, [f"space-N{n0}", f"space-reuse-N{n0}"], f"space-N{n0}", iterations)
    labels = [f"{m}-N{n0}" for m in methods] + [
        f"{q}-N{n0}" for q in ("sft-matched", "sft-4N", "space-mu3", "space-reuse")
    ]
    labels += [f"{m}-N{n}" for n, ran in later.items() for m in ran]
    md += ["### Diagnostics per iteration (mean over seeds [lowest seed, highest seed])", ""]
    md += diagnostics_tables(g, labels, iterations)
    md += ["### Cost per run", "", *cost_table(out, state, g)]
    (out / "results.md").write_text("\n".join(md) + "\n")
    cells: dict[str, Any] = {}
    for label, runs in g.items():
        for key in ["base", *(f"iter_{t}" for t in range(iterations))]:
            t = eval_table(runs, key)
            if t is not None:
                cells.setdefault(label, {})[key] = {"accuracy": accuracy(t).__dict__, "nll": nll(t).__dict__}
    (out / "results.json").write_text(json.dumps({"cells": cells, "best": state["best"]}, indent=1))
    if g:
        plot(out, state, g, labels, iterations)
