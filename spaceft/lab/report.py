"""Reports of a lab run: summary statistics over seeds, Markdown tables and the KL plot."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

Summary = dict[str, tuple[list[float], list[float]]]
"""method key → (mean per iteration, std per iteration) over seeds."""


def _runs(result: dict, mode: str) -> dict[str, list[list[dict]]]:
    """method key → one record list per seed."""
    runs: dict[str, list[list[dict]]] = {}
    for per_seed in result[mode]["seeds"].values():
        methods = per_seed["methods"] if mode == "sampled" else per_seed
        for key, records in methods.items():
            runs.setdefault(key, []).append(records)
    return runs


def summarize(result: dict, mode: str, metric: str) -> Summary:
    """Mean and sample standard deviation (ddof = 1; 0 for one seed) of ``metric`` per iteration."""
    summary: Summary = {}
    for key, seeds in _runs(result, mode).items():
        means, stds = [], []
        for it in range(len(seeds[0])):
            values = [s[it][metric] for s in seeds if s[it][metric] is not None]
            if not values:
                means.append(math.nan)
                stds.append(math.nan)
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            means.append(mean)
            stds.append(math.sqrt(var))
        summary[key] = (means, stds)
    return summary


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3g} ± {std:.1g}"


def _labels(result: dict) -> dict[str, str]:
    return {m["key"]: m["label"] for m in result["methods"]}


def iteration_table(result: dict, mode: str, metric: str = "kl") -> str:
    """Markdown table: one row per method, one column per iteration, cells mean ± std over seeds."""
    summary = summarize(result, mode, metric)
    labels = _labels(result)
    n_iter = len(next(iter(summary.values()))[0])
    lines = ["| method | " + " | ".join(f"it {t}" for t in range(n_iter)) + " |"]
    lines.append("|---|" + "---:|" * n_iter)
    for key, (means, stds) in summary.items():
        cells = [_fmt(m, s) for m, s in zip(means, stds, strict=True)]
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_FINAL_COLUMNS = (
    ("kl", "KL(p_data‖p_θ)"),
    ("kl_empirical", "KL(p̂‖p_θ)"),
    ("tv", "TV"),
    ("unseen_mass", "mass on unseen y"),
    ("logp_real", "mean log p_θ(y)"),
    ("kl_from_opponent", "KL(p_θt‖p_θ)"),
    ("frac_synthetic_equals_real", "frac y′=y"),
    ("reward_real", "reward real"),
    ("reward_synthetic", "reward synthetic"),
)


def final_table(result: dict) -> str:
    """Markdown table of every sampled-mode metric at the last iteration, plus the best KL reached."""
    labels = _labels(result)
    kl = summarize(result, "sampled", "kl")
    cols = {name: summarize(result, "sampled", name) for name, _ in _FINAL_COLUMNS}
    head = "| method | best KL (iteration) | " + " | ".join(title for _, title in _FINAL_COLUMNS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(_FINAL_COLUMNS)]
    for key, (means, stds) in kl.items():
        best = min(range(len(means)), key=lambda t: means[t])
        cells = [_fmt(cols[name][key][0][-1], cols[name][key][1][-1]) for name, _ in _FINAL_COLUMNS]
        best_cell = f"{_fmt(means[best], stds[best])} ({best})"
        lines.append(f"| {labels[key]} | {best_cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: dict, command: str | None = None) -> str:
    """The whole lab.md: setup, population table, sampled tables."""
    cfg, world = result["config"], result["world"]
    seeds = cfg["seeds"]
    out = ["# spaceft theory lab", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    out += [
        f"World: {world['num_prompts']} prompts, vocabulary {world['vocab_size']} (with the end token), "
        f"responses of up to {cfg['world']['max_len']} letters: "
        f"{world['num_responses']} responses per prompt; "
        f"mean entropy of p_data {world['mean_entropy_of_data']:.3f} nats. Seeds {seeds}; "
        f"wall time {result['wall_time_s']:.1f} s. Cells: mean ± sample std over seeds.",
        "",
    ]
    if "population" in result:
        pop = cfg["population"]
        out += [
            f"## Population mode: KL(p_data‖p_θ) per iteration (exact expectations, start={pop['start']}, "
            f"L-BFGS ≤ {pop['max_steps']} steps per iteration)",
            "",
            iteration_table(result, "population"),
            "",
        ]
    if "sampled" in result:
        s = cfg["sampled"]
        setting = (
            f"N={s['num_real']} real per prompt, E={s['epochs']} epochs/iteration, RMSProp lr={s['lr']} "
            f"(warm-up {s['warmup_ratio']:g}, linear decay), "
            f"batch {s['batch_size']}, {s['policy']} model, SFT start {s['sft_start_epochs']} epochs"
        )
        out += [
            f"## Sampled mode: KL(p_data‖p_θ) per iteration ({setting})",
            "",
            iteration_table(result, "sampled"),
            "",
            "## Sampled mode: KL(p̂‖p_θ) to the empirical distribution of the real set, per iteration",
            "",
            iteration_table(result, "sampled", "kl_empirical"),
            "",
            "## Sampled mode: last iteration",
            "",
            final_table(result),
            "",
        ]
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    """KL vs iteration, one line per method with a ±std band over seeds; one panel per mode/metric."""
    panels = []
    if "population" in result:
        panels.append(("population", "kl", "population mode: KL(p_data‖p_θ)", True))
    if "sampled" in result:
        panels.append(("sampled", "kl", "sampled mode: KL(p_data‖p_θ)", False))
        panels.append(("sampled", "kl_empirical", "sampled mode: KL(p̂‖p_θ), empirical", False))
    labels = _labels(result)
    colors = {key: plt.get_cmap("tab10")(i % 10) for i, key in enumerate(labels)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (mode, metric, title, log) in zip(axes[0], panels, strict=True):
        for key, (means, stds) in summarize(result, mode, metric).items():
            xs = list(range(len(means)))
            lo = [m - s for m, s in zip(means, stds, strict=True)]
            hi = [m + s for m, s in zip(means, stds, strict=True)]
            if log:  # KL can be exactly 0 (start at p_data): clip for the log axis
                means, lo, hi = ([max(v, 1e-16) for v in seq] for seq in (means, lo, hi))
            ax.plot(xs, means, marker="o", ms=3, color=colors[key], label=labels[key])
            ax.fill_between(xs, lo, hi, color=colors[key], alpha=0.2, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("self-play iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _strict(value: object) -> object:
    """Non-finite floats become None, so lab.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def write_json(result: dict, path: Path) -> None:
    text = json.dumps(_strict(result), indent=1, allow_nan=False) + "\n"
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_text(text: str, path: Path) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def _atomic(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
