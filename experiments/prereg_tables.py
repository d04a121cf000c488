"""Tables of the preregistered grid (experiments/PREREGISTRATION.md), rebuilt from its archive alone.

    python experiments/preregistered.py --report-only [--archive experiments/prereg_runs] [--out DIR]

reads ARCHIVE (`grid_archive`'s layout: grid_state.json, each finished run's manifest, per-problem test
results, per-step metrics and diagnostics) and writes DIR/results.md, DIR/results.json and
DIR/nll_vs_compute.png, exactly as the preregistration's analysis section says:

* each comparison × endpoint, a paired difference (first arm − second arm) over the seeds both arms
  finished × the 200 test problems: its crossed-bootstrap 95 % interval and two-sided p
  (`intervals.paired_difference`, `intervals.bootstrap_p`, the same 4,000 draws), the seed-level
  t interval beside it (`spaceft.lab.questions.t_interval` over the per-seed differences), and Holm's
  adjustment within its family (the 8 primary hypotheses; one family per secondary question);
* the verdict rule, worded "reproduced / not reproduced in this setting" (or "not settled" when the two
  analyses disagree), the setting named with it.

A grid of ~13 hours is read while it runs: an arm not archived yet is a row that says so, never an error.
A hypothesis without data enters its Holm family as p = 1 (a family's size is what the preregistration
planned, not what has finished): the adjusted p-values can only fall as rows arrive, so an early
"reproduced" is never withdrawn by a later row. A comparison on fewer seeds than planned is printed but
its verdict is "pending".

SPIN tuned is trained only when β = 1 beats β = 0.1 on validation; otherwise the driver records it as an
alias of SPIN β = 0.1, in a state key the archive does not keep. The alias is therefore re-derived here
from the archived tuning runs, by the driver's own rule (lowest validation NLL averaged over iterations).
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import preregistered as pre
from grid_archive import DIAGNOSTICS, STATE
from intervals import Interval, bootstrap_p, holm, paired_difference, pooled_interval

from spaceft.lab.questions import t_interval
from spaceft.rundir import read_json

ALPHA = 0.05
SETTING = "SmolLM2-135M-Instruct (de-quantised Q4_1 GGUF), N = 64, {task} task, 2 CPU cores"


@dataclass(frozen=True)
class Comparison:
    """`arm` − `comparator` on `task`; the claim is that `arm` is the better one."""

    family: str
    task: str
    arm: str
    comparator: str


COMPARISONS = (
    Comparison("primary", "arithmetic", "space", "sft-matched"),
    Comparison("primary", "arithmetic", "space", "spin-tuned"),
    Comparison("Q2", "arithmetic", "space-k4", "space"),
    Comparison("Q3", "arithmetic", "space", "spin-b0.1"),
    Comparison("Q3", "worded", "space", "sft-matched"),
    Comparison("Q3", "worded", "space-k4", "space"),
    Comparison("Q3", "arithmetic", "space", "sft-4N"),
    Comparison("Q3", "arithmetic", "space", "space-reuse"),
    Comparison("Q3", "arithmetic", "space", "ipo"),
    Comparison("Q3", "arithmetic", "space", "simpo"),
    Comparison("Q3", "arithmetic", "space", "tspin"),
)
FAMILY_TITLES = {
    "primary": "Primary (Q1): SPACE against SFT compute-matched and SPIN tuned, one Holm family",
    "Q2": "Secondary (Q2, exploratory): the variance hypothesis, K = 4 against K = 1 at μ = 1",
    "Q3": "Secondary (Q3, exploratory): SFT on 4N, reuse, the other self-play losses, the worded task",
}


@dataclass(frozen=True)
class Endpoint:
    key: str
    title: str
    better: int
    """+1 when higher is better (accuracy), -1 when lower is (NLL)."""
    mean: bool
    """Averaged over iterations 1–5 (else after the last)."""


ENDPOINTS = (
    Endpoint("nll_last", "NLL after iteration 5", -1, False),
    Endpoint("nll_mean", "NLL averaged over iterations 1–5", -1, True),
    Endpoint("acc_last", "accuracy after iteration 5", +1, False),
    Endpoint("acc_mean", "accuracy averaged over iterations 1–5", +1, True),
)

Table = dict[str, np.ndarray]
"""One evaluation of one arm: per-problem arrays [seeds, problems] correct, nll (−log p), tokens."""


def planned(design: pre.Design) -> list[tuple[str, str]]:
    """(task, arm) of every final the design runs, in the preregistered order."""
    rows = [("arithmetic", a.name) for a in pre.ARMS if a.tier <= design.max_tier and a.name in design.arms]
    if design.max_tier >= 3 and "worded" in design.tasks:
        rows += [("worded", a) for a in pre.WORDED_ARMS]
    return [r for r in rows if r[0] in design.tasks]


# ------------------------------------------------------------------------------------------ the archive


class Archive:
    """The finished runs of a grid archive, read in place (the gzipped samples unpacked on reading)."""

    def __init__(self, root: Path, iterations: int) -> None:
        self.root = root
        self.iterations = iterations
        state = read_json(root / STATE) if (root / STATE).exists() else {"runs": {}}
        self.entries: dict[str, dict[str, Any]] = {
            n: e for n, e in state["runs"].items() if e.get("group") != "start" and self.finished(n)
        }
        self.matched_epochs: dict[str, int] = state.get("matched_epochs", {})
        self._tables: dict[tuple[str, str], Table | None] = {}

    def finished(self, name: str) -> bool:
        path = self.root / name / "manifest.json"
        if not path.exists():
            return False
        done = read_json(path).get("iterations", {})
        keys = ["base", *(str(t) for t in range(self.iterations))]
        return all(done.get(k, {}).get("eval", {}).get("status") == "done" for k in keys)

    def group(self, group: str) -> dict[int, str]:
        """seed -> run name of a group's finished runs."""
        return {e["seed"]: n for n, e in self.entries.items() if e.get("group") == group}

    def samples(self, name: str, key: str) -> Table | None:
        """The per-problem test results of evaluation `key` ('base', 'iter_T') of one run."""
        if (name, key) not in self._tables:
            path = self.root / name / key / "eval_samples.jsonl"
            packed = path.with_name(path.name + ".gz")
            text = path.read_text() if path.exists() else ""
            if packed.exists():
                text = gzip.decompress(packed.read_bytes()).decode()
            rows = [json.loads(x) for x in text.splitlines() if x.strip()]
            self._tables[(name, key)] = None
            if rows and all("correct" in r for r in rows):
                self._tables[(name, key)] = {
                    "correct": np.array([float(r["correct"]) for r in rows]),
                    "nll": np.array([-float(r["logp"]) for r in rows]),
                    "tokens": np.array([float(r["tokens"]) for r in rows]),
                }
        return self._tables[(name, key)]

    def table(self, runs: dict[int, str], seeds: list[int], key: str) -> Table | None:
        """`key`'s results of `seeds` stacked [seeds, problems]; None unless every seed has them."""
        per_seed = [self.samples(runs[s], key) for s in seeds]
        if not per_seed or any(t is None for t in per_seed):
            return None
        return {k: np.stack([t[k] for t in per_seed]) for k in ("correct", "nll", "tokens")}  # type: ignore[index]

    def divergence(self, name: str) -> list[dict[str, float]]:
        return pre.divergence(self.root / name)

    def diagnostics(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name / DIAGNOSTICS
        return list(read_json(path)) if path.exists() else []


def endpoint_table(archive: Archive, runs: dict[int, str], seeds: list[int], ep: Endpoint) -> Table | None:
    """The endpoint's per-problem numerator and denominator, [seeds, problems]. The mean over iterations
    is one table, the per-cell mean of the five: the response token counts are the same in every
    evaluation, so its pooled NLL is exactly the mean of the five pooled NLLs."""
    keys = [f"iter_{t}" for t in range(archive.iterations)]
    tables = [archive.table(runs, seeds, k) for k in (keys if ep.mean else keys[-1:])]
    if any(t is None for t in tables):
        return None
    if any(not np.array_equal(t["tokens"], tables[0]["tokens"]) for t in tables):  # type: ignore[index]
        raise ValueError(f"runs {sorted(runs.values())}: token counts differ between evaluations")
    return {k: np.mean([t[k] for t in tables], axis=0) for k in ("correct", "nll", "tokens")}  # type: ignore[index]


def ratio(t: Table, ep: Endpoint) -> tuple[np.ndarray, np.ndarray | None]:
    """(numerator, denominator) of the endpoint's pooled ratio; None: 1 per cell."""
    return (t["nll"], t["tokens"]) if ep.key.startswith("nll") else (t["correct"], None)


# ------------------------------------------------------------------------------------------ tuning


def tuning(archive: Archive, design: pre.Design, task: str = "arithmetic") -> dict[str, dict[str, Any]]:
    """Per family: each archived learning rate's validation NLL averaged over iterations and tuning seeds,
    the chosen rate and whether the family's tuning is complete (the driver's `tune` rule: its grid,
    then one extension past an edge winner; SPIN β = 1 at β = 0.1's best and its neighbours)."""
    out: dict[str, dict[str, Any]] = {}
    for family in pre.FAMILIES:
        per_lr: dict[float, list[float]] = {}
        for name, e in archive.entries.items():
            if e.get("group") != f"tune-{family}" or not name.startswith(f"{task}-tune-{family}-lr"):
                continue
            lr = float(name.removeprefix(f"{task}-tune-{family}-lr").rsplit("-s", 1)[0])
            nll = pre.val_nll(archive.root / name, archive.iterations)
            per_lr.setdefault(lr, []).append(sum(nll) / len(nll))
        scores = {lr: sum(v) / len(v) for lr, v in per_lr.items() if len(v) == len(design.tuning_seeds)}
        if not scores:
            continue
        best = min(scores, key=lambda lr: scores[lr])
        if family == "spin-b1":
            centre = out.get("spin-b0.1", {}).get("lr") if out.get("spin-b0.1", {}).get("complete") else None
            grid = [centre, *pre.neighbours(centre)][: design.spin_b1_lrs] if centre else [math.nan]
            complete = all(any(math.isclose(g, lr) for lr in scores) for g in grid)
        else:
            base = list(design.lrs)
            complete = all(any(math.isclose(g, lr) for lr in scores) for g in base)
            edge = best in (min(scores), max(scores))
            if complete and edge and len(scores) == len(base) and design.max_extensions:
                complete = False  # the extension past the edge winner has not finished
        out[family] = {"lr": best, "val_nll_mean": scores[best], "scores": scores, "complete": complete}
    return out


def arm_runs(
    archive: Archive, tuned: dict[str, dict[str, Any]], task: str, arm: str
) -> tuple[dict[int, str], str]:
    """seed -> run of an arm's finals, and a note: SPIN tuned that chose β = 0.1 is SPIN β = 0.1's runs."""
    runs = archive.group(f"{task}-{arm}")
    if arm == "spin-tuned" and not runs:
        b01, b1 = tuned.get("spin-b0.1"), tuned.get("spin-b1")
        if b01 and b1 and b01["complete"] and b1["complete"]:
            if b01["val_nll_mean"] <= b1["val_nll_mean"]:
                return archive.group(f"{task}-spin-b0.1"), "alias of spin-b0.1: β = 0.1 won the tuning"
    return runs, ""


# ------------------------------------------------------------------------------------------ the analysis


def verdict(boot: Interval, p_adj: float, t: dict[str, float], better: int) -> str:
    """The preregistered rule, with the claim's direction `better` (+1: the first arm's number higher)."""
    claimed = boot.estimate * better > 0 and p_adj < ALPHA
    t_claimed = min(t["low"] * better, t["high"] * better) > 0
    opposite = max(boot.low * better, boot.high * better) < 0
    t_zero = t["low"] <= 0 <= t["high"]
    if claimed and t_claimed:
        return "reproduced in this setting"
    if opposite or (not boot.excludes_zero and t_zero):
        return "not reproduced in this setting"
    return "not settled"


def compare(
    archive: Archive, design: pre.Design, tuned: dict[str, dict[str, Any]], comparisons: list[Comparison]
) -> list[dict[str, Any]]:
    """Every comparison × endpoint with its intervals, raw and Holm-adjusted p and verdict; a row
    without data says what is missing."""
    rows: list[dict[str, Any]] = []
    for c in comparisons:
        a, note_a = arm_runs(archive, tuned, c.task, c.arm)
        b, note_b = arm_runs(archive, tuned, c.task, c.comparator)
        seeds = sorted(set(a) & set(b))
        for ep in ENDPOINTS:
            row: dict[str, Any] = {**asdict(c), "endpoint": ep.key, "seeds": seeds, "p": None}
            row["note"] = "; ".join(x for x in (note_a, note_b) if x)
            ta = endpoint_table(archive, a, seeds, ep) if seeds else None
            tb = endpoint_table(archive, b, seeds, ep) if seeds else None
            if ta is None or tb is None:
                missing = [x for x, r in ((c.arm, a), (c.comparator, b)) if not r]
                row["missing"] = f"not archived yet: {', '.join(missing) or 'a common seed'}"
                rows.append(row)
                continue
            (na, da), (nb, db) = ratio(ta, ep), ratio(tb, ep)
            if da is not None and not np.array_equal(da, db):
                raise ValueError(f"{c}: the two arms' test responses have different token counts")
            row["bootstrap"] = paired_difference(na, nb, da, db)
            # the denominators are the same for both arms, so the difference's sign in each replicate is
            # that of the numerators' difference: bootstrap_p on numerators is the ratio's p exactly
            row["p"] = bootstrap_p(na, nb)
            den = np.ones_like(na) if da is None else da  # the same for both arms (checked above)
            row["per_seed"] = [float(x) for x in (na.sum(1) - nb.sum(1)) / den.sum(1)]
            row["t"] = t_interval(row["per_seed"])
            rows.append(row)
    for family in dict.fromkeys(r["family"] for r in rows):
        members = [r for r in rows if r["family"] == family]
        adjusted = holm([1.0 if r["p"] is None else r["p"] for r in members])
        for r, p_adj in zip(members, adjusted, strict=True):
            r["family_size"] = len(members)
            if r["p"] is None:
                continue
            r["p_holm"] = p_adj
            ep = next(e for e in ENDPOINTS if e.key == r["endpoint"])
            if len(r["seeds"]) < len(design.final_seeds):
                r["verdict"] = f"pending ({len(r['seeds'])} of {len(design.final_seeds)} seeds)"
            else:
                r["verdict"] = verdict(r["bootstrap"], p_adj, r["t"], ep.better)
    return rows


# ------------------------------------------------------------------------------------------ tables


def _p(p: float) -> str:
    return f"< {2 / 4000:.4f}" if p == 0 else f"{p:.4f}"


def _t(t: dict[str, float]) -> str:
    if math.isnan(t["low"]):
        return "(needs ≥ 2 seeds)"
    return f"{t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]"


def comparison_md(rows: list[dict[str, Any]], family: str) -> list[str]:
    members = [r for r in rows if r["family"] == family]
    have = sum(r["p"] is not None for r in members)
    lines = [
        f"### {FAMILY_TITLES[family]}",
        "",
        f"Differences are first arm − second arm; the claim is the first arm's (lower NLL, higher accuracy). "
        f"Holm over the family's {len(members)} hypotheses, {have} with data (the others count as p = 1).",
        "",
        "| task | comparison | endpoint | seeds | estimate | bootstrap 95 % | seed t 95 % | p | Holm p "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in members:
        ep = next(e for e in ENDPOINTS if e.key == r["endpoint"])
        head = f"| {r['task']} | {r['arm']} − {r['comparator']} | {ep.title} | {len(r['seeds'])} |"
        if r["p"] is None:
            lines.append(f"{head} | | | | | {r['missing']} |")
            continue
        b = r["bootstrap"]
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(
            f"{head} {b.estimate:+.3f} | [{b.low:+.3f}, {b.high:+.3f}] | {_t(r['t'])} | {_p(r['p'])} | "
            f"{_p(r['p_holm'])} | {r['verdict']}{note} |"
        )
    tasks = dict.fromkeys(r["task"] for r in members)
    lines += ["", *(f"Setting: {SETTING.format(task=t)}." for t in tasks), ""]
    return lines


def _spread(values: list[float], spec: str) -> str:
    """Mean over seeds [lowest, highest]: with 3 seeds a bootstrap over seeds gives back min and max."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    return f"{np.mean(values):{spec}} [{min(values):{spec}}, {max(values):{spec}}]"


def trajectory_md(archive: Archive, tuned: dict[str, Any], arms: list[tuple[str, str]]) -> list[str]:
    iters = archive.iterations
    lines: list[str] = []
    head = "| task | arm | seeds | start | " + " | ".join(f"iter {t + 1}" for t in range(iters)) + " |"
    rule = "|" + "---|" * (iters + 4)
    for title, metric in (("Held-out NLL per token", "nll"), ("Held-out exact match", "correct")):
        lines += [f"### {title} per iteration (pooled over seeds × problems, 95 % bootstrap)", "", head, rule]
        for task, arm in arms:
            runs, note = arm_runs(archive, tuned, task, arm)
            if not runs:
                lines.append(f"| {task} | {arm} | 0 | not archived yet |" + " |" * iters)
                continue
            seeds = sorted(runs)
            cells = []
            for key in ["base", *(f"iter_{t}" for t in range(iters))]:
                t = archive.table(runs, seeds, key)
                den = t["tokens"] if t is not None and metric == "nll" else None
                cells.append("" if t is None else pooled_interval(t[metric], den).format())
            label = f"{arm} ({note})" if note else arm
            lines.append(f"| {task} | {label} | {len(seeds)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


DIVERGENCE = (("steps", ".0f"), ("first_loss", ".3g"), ("peak_loss", ".3g"), ("peak_grad_norm", ".3g"))


def divergence_md(archive: Archive, tuned: dict[str, Any], arms: list[tuple[str, str]]) -> list[str]:
    lines = [
        "### Divergence inside iterations (every step logged; mean over seeds [lowest, highest])",
        "",
        "| task | arm | iter | steps | first loss | peak loss | peak gradient norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, arm in arms:
        runs, _ = arm_runs(archive, tuned, task, arm)
        per_seed = [archive.divergence(n) for n in runs.values()]
        for t in range(archive.iterations):
            rows = [d[t] for d in per_seed if len(d) > t]
            if not rows:
                continue
            cells = [_spread([r[k] for r in rows], spec) for k, spec in DIVERGENCE]
            lines.append(f"| {task} | {arm} | {t + 1} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Tuning runs (validation only): the largest over their iterations.",
        "",
        "| run | peak loss | peak gradient norm | mean validation NLL |",
        "|---|---|---|---|",
    ]
    for name in sorted(n for n, e in archive.entries.items() if str(e.get("group")).startswith("tune-")):
        d = archive.divergence(name)
        nll = pre.val_nll(archive.root / name, archive.iterations)
        peak = max((r["peak_loss"] for r in d), default=math.nan)
        grad = max((r["peak_grad_norm"] for r in d), default=math.nan)
        lines.append(f"| {name} | {peak:.3g} | {grad:.3g} | {sum(nll) / len(nll):.4f} |")
    return [*lines, ""]


def verbatim_md(archive: Archive, tuned: dict[str, Any], arms: list[tuple[str, str]]) -> list[str]:
    iters = archive.iterations
    lines = [
        "### Verbatim samples: share of synthetic responses equal to their prompt's real response",
        "",
        "| task | arm | seeds | " + " | ".join(f"iter {t + 1}" for t in range(iters)) + " |",
        "|" + "---|" * (iters + 3),
    ]
    for task, arm in arms:
        runs, _ = arm_runs(archive, tuned, task, arm)
        diags = [archive.diagnostics(n) for n in runs.values()]
        cells = [
            _spread([d[t]["identical"] for d in diags if len(d) > t and "identical" in d[t]], ".3f")
            for t in range(iters)
        ]
        if any(cells):
            lines.append(f"| {task} | {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def cost(archive: Archive, names: list[str]) -> dict[str, float]:
    """Mean over runs of their tokens, compute, wall and CPU time; their largest peak RSS."""
    entries = [archive.entries[n] for n in names]

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values and len(values) == len(entries) else math.nan

    def total(key: str) -> list[float]:
        return [sum(c[key] for c in e["costs"]) for e in entries if "costs" in e]

    rss = [e["peak_rss_mb"] for e in entries if e.get("peak_rss_mb")]
    return {
        "forwarded": mean(total("forwarded")),
        "trained": mean(total("trained")),
        "compute": mean(total("compute")),
        "wall_s": mean([e["wall_s"] for e in entries if "wall_s" in e]),
        "cpu_s": mean([e["cpu_s"] for e in entries if "cpu_s" in e]),
        "peak_rss_mb": max(rss) if rss else math.nan,
        "hours": sum(e.get("wall_s", 0.0) for e in entries) / 3600,
    }


def cost_md(archive: Archive, arms: list[tuple[str, str]]) -> tuple[list[str], dict[str, Any]]:
    lines = [
        "### Cost per arm (mean per run; compute in forward-token equivalents: forwarded + 3 × trained)",
        "",
        "| task | arm | runs | tokens forwarded | tokens trained | compute | wall s | CPU s | peak RSS GB "
        "| hours, all runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = [(f"{t}-{a}", f"{t} | {a}") for t, a in arms]
    tuning_groups = {str(e["group"]) for e in archive.entries.values() if str(e["group"]).startswith("tune-")}
    groups += [(g, f"tuning | {g.removeprefix('tune-')}") for g in sorted(tuning_groups)]
    out: dict[str, Any] = {}
    for group, label in groups:
        names = [n for n, e in archive.entries.items() if e.get("group") == group]
        if not names:
            continue
        c = out[group] = cost(archive, names)
        lines.append(
            f"| {label} | {len(names)} | {c['forwarded']:.3g} | {c['trained']:.3g} | {c['compute']:.3g} | "
            f"{c['wall_s']:.0f} | {c['cpu_s']:.0f} | {c['peak_rss_mb'] / 1024:.2f} | {c['hours']:.2f} |"
        )
    hours = sum(e.get("wall_s", 0.0) for e in archive.entries.values()) / 3600
    lines += ["", f"Archived runs so far: {len(archive.entries)}, {hours:.2f} h of wall time."]
    matched = ", ".join(f"{task}: {epochs}" for task, epochs in archive.matched_epochs.items())
    return [*lines, f"SFT compute-matched epochs per iteration: {matched or 'not fixed yet'}.", ""], out


def start_md(root: Path) -> list[str]:
    lines = ["### Start: SFT epochs on the N pairs, validation NLL after each (the lowest is the start)", ""]
    for path in sorted(root.glob("*-start/manifest.json")):
        done = read_json(path).get("iterations", {})
        evals = [done[str(k)].get("eval", {}) for k in sorted(int(k) for k in done if k.isdigit())]
        nll = [e["nll"] for e in evals if e.get("status") == "done"]
        if nll:
            best = int(np.argmin(nll))
            cells = ", ".join(f"**{x:.4f}**" if i == best else f"{x:.4f}" for i, x in enumerate(nll))
            lines.append(f"* {path.parent.name}: {cells} → epoch {best + 1}")
    return [*lines, ""] if len(lines) > 2 else [*lines, "No start archived yet.", ""]


def tuning_md(tuned: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["### Tuning: validation NLL averaged over iterations 1–5, tuning seed(s) only", ""]
    lines += ["| family | learning rate: mean validation NLL | chosen | complete |", "|---|---|---|---|"]
    for family, r in tuned.items():
        cells = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(r["scores"].items()))
        lines.append(f"| {family} | {cells} | {r['lr']:g} | {'yes' if r['complete'] else 'not yet'} |")
    return [*lines, ""] if tuned else [*lines, "| (no tuning run archived yet) | | | |", ""]


# ------------------------------------------------------------------------------------------ the plot


def plot(archive: Archive, tuned: dict[str, Any], arms: list[tuple[str, str]], path: Path) -> None:
    """Held-out NLL against cumulative compute per arm (seed mean of each run's cumulative cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(t for t, _ in arms))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for _, arm in [x for x in arms if x[0] == task]:
            runs, alias = arm_runs(archive, tuned, task, arm)
            costs = [archive.entries[n].get("costs") for n in runs.values()]
            if not runs or alias or not all(costs):  # an alias would hide the line it repeats
                continue
            x = [0.0, *np.mean([np.cumsum([c["compute"] for c in r]) for r in costs], axis=0)]  # type: ignore[union-attr]
            seeds = sorted(runs)
            keys = ["base", *(f"iter_{t}" for t in range(archive.iterations))]
            tabs = [(xi, archive.table(runs, seeds, k)) for xi, k in zip(x, keys, strict=False)]
            ivs = [(xi, pooled_interval(t["nll"], t["tokens"])) for xi, t in tabs if t is not None]
            est = np.array([iv.estimate for _, iv in ivs])
            err = [est - [iv.low for _, iv in ivs], [iv.high for _, iv in ivs] - est]
            ax.errorbar(
                [xi for xi, _ in ivs], est, yerr=err, fmt="o-", capsize=2, label=f"{arm} ({len(seeds)} seeds)"
            )
        ax.set(
            title=f"{task}: held-out NLL against compute (95 % CI)",
            ylabel="NLL per token",
            xlabel="cumulative compute (forward-token equivalents)",
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ all of it


def write_report(archive_dir: Path, out: Path, design: pre.Design) -> dict[str, Any]:
    """OUT/results.md, results.json, nll_vs_compute.png from the archive alone; returns the summary."""
    archive = Archive(archive_dir, design.iterations)
    tuned = tuning(archive, design)
    arms = planned(design)
    comparisons = [c for c in COMPARISONS if {(c.task, c.arm), (c.task, c.comparator)} <= set(arms)]
    rows = compare(archive, design, tuned, comparisons)
    missing = []
    for task, arm in arms:
        runs, _ = arm_runs(archive, tuned, task, arm)
        missing += [f"{task}-{arm}-s{s}" for s in design.final_seeds if s not in runs]
    md = [
        "## Results of the preregistered grid (rebuilt from the archive by "
        "`python experiments/preregistered.py --report-only`)",
        "",
        f"Archive: {archive_dir}; {len(archive.entries)} finished runs. Finals planned and not archived yet "
        f"({len(missing)}): {', '.join(missing) or 'none'}.",
        "",
    ]
    for family in dict.fromkeys(c.family for c in comparisons):
        md += comparison_md(rows, family)
    md += start_md(archive_dir) + tuning_md(tuned) + trajectory_md(archive, tuned, arms)
    md += divergence_md(archive, tuned, arms) + verbatim_md(archive, tuned, arms)
    costs_lines, costs = cost_md(archive, arms)
    md += costs_lines
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(md) + "\n")
    plot(archive, tuned, arms, out / "nll_vs_compute.png")
    serial = [{k: (asdict(v) if isinstance(v, Interval) else v) for k, v in r.items()} for r in rows]
    summary = {
        "comparisons": serial,
        "tuning": tuned,
        "costs": costs,
        "missing": missing,
        "runs": len(archive.entries),
        "matched_epochs": archive.matched_epochs,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    """What the command prints: the comparisons in one line each, and what is missing."""
    lines = [f"{summary['runs']} finished runs archived"]
    for r in summary["comparisons"]:
        head = f"{r['family']:7} {r['task']:10} {r['arm']} - {r['comparator']:12} {r['endpoint']:8}"
        if r["p"] is None:
            lines.append(f"{head}  {r['missing']}")
        else:
            b = r["bootstrap"]
            lines.append(
                f"{head}  {b['estimate']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}]  t {_t(r['t'])}  "
                f"p {_p(r['p'])}  Holm {_p(r['p_holm'])}  {r['verdict']}"
            )
    missing = summary["missing"]
    lines.append(f"finals not archived yet ({len(missing)}): {' '.join(missing) or 'none'}")
    return "\n".join(lines)
