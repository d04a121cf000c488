"""The per-iteration report of a run: a Markdown table and PNG plots, rebuilt from the run directory.

`spaceft report RUN` prints the table and writes RUN/report.md, RUN/rewards.png (real vs synthetic
reward over training steps, iterations side by side) and RUN/eval.png (held-out metrics per iteration).

The report also carries the per-iteration diagnostics the SPACE paper argues from
(:func:`collect_diagnostics`): the real responses' log-likelihood under the opponent and under the
trained player, the real and synthetic rewards, how many synthetic samples are the real response
verbatim (then SPIN's margin is 0 whatever the model), and the synthetic responses' length and cap rate.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spaceft.losses import LossType
from spaceft.rundir import Manifest, atomic_path, read_json, read_jsonl, read_table
from spaceft.stages import STAGES

log = logging.getLogger(__name__)


def collect(run_dir: Path) -> list[dict[str, Any]]:
    """One row per evaluated model: 'base', then each iteration with its last training metrics."""
    rows: list[dict[str, Any]] = []
    base = run_dir / "base" / "eval.json"
    if base.exists():
        rows.append({"iteration": "base", **_eval_cols(read_json(base))})
    sft = Manifest.open(run_dir).config.get("train", {}).get("loss") == "sft"
    t = 0
    while (run_dir / f"iter_{t}").exists():
        d = run_dir / f"iter_{t}"
        row: dict[str, Any] = {"iteration": str(t)}
        if (d / "eval.json").exists():
            row.update(_eval_cols(read_json(d / "eval.json")))
        metrics = read_metrics(d / "metrics.jsonl")
        if metrics:
            first, last = metrics[0], metrics[-1]
            row.update(
                {
                    "loss_first": first["loss"],
                    "loss_last": last["loss"],
                    "reward_real": last["rewards/real"],
                    "reward_synthetic": last["rewards/synthetic"],
                    "reward_accuracy": last["rewards/accuracy"],
                    "steps": last["step"],
                }
            )
            if "rewards/abs_mean" in first:  # 0 unless the score and training passes disagree
                row["reward_abs_first"] = first["rewards/abs_mean"]
            if sft:  # SFT has no opponent: its "rewards" are not rewards
                for key in ("reward_real", "reward_synthetic", "reward_accuracy", "reward_abs_first"):
                    row.pop(key, None)
        rows.append(row)
        t += 1
    return rows


def _eval_cols(ev: dict[str, Any]) -> dict[str, Any]:
    """Held-out accuracy and NLL; lm-eval's benchmarks have their own table (:func:`benchmark_rows`)."""
    return {k: ev[k] for k in ("accuracy", "nll") if k in ev}


PAPER = {
    "SPACE paper, start model": {"ifeval": 23.6, "gsm8k": 37.7},
    "SPACE paper, final SPACE": {"ifeval": 35.9, "gsm8k": 46.0},
}
"""The SPACE paper's benchmark numbers (percent; Mistral-7B-class model on UltraChat, as quoted in the
project's issue 12), shown beside a run's own task of the same name for orientation: models, data and
sizes differ, and the paper's harness settings (shots, metric) were not checked against its text."""


def task_base(key: str) -> str:
    """A benchmark column's task name without its ``harness:`` prefix and ``:SHOTS`` suffix."""
    from spaceft.bench.catalog import HARNESS_PREFIX, split_shots

    return split_shots(key)[0].removeprefix(HARNESS_PREFIX)


def headline_metric(key: str, metrics: dict[str, Any]) -> str | None:
    """The metric a table shows for a task: spaceft's or the leaderboard's choice, else the first."""
    from spaceft.bench.run import HEADLINE

    return HEADLINE.get(task_base(key), next(iter(metrics), None))


def benchmark_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One row per evaluated model with each lm-eval benchmark's headline metric (percent); the
    metric and few-shot count of each column under ``_label``."""
    rows: list[dict[str, Any]] = []
    keys = ["base", *(f"iter_{t}" for t in range(_count_iterations(run_dir)))]
    for key in keys:
        path = run_dir / key / "eval.json"
        if not path.exists():
            continue
        ev = read_json(path)
        scores: dict[str, Any] = {}
        labels: dict[str, str] = {}
        shots = ev.get("lm_eval_shots", {})
        for task, metrics in ev.get("lm_eval", {}).items():
            metric = headline_metric(task, metrics)
            if metric is not None and metric in metrics:
                scores[task] = 100.0 * metrics[metric]
                shot = f", {shots[task]}-shot" if task in shots else ""
                labels[task] = f"{task} ({metric.removesuffix(',strict-match').removesuffix(',none')}{shot})"
        if scores:
            n = ev.get("lm_eval_provenance", {}).get("n_samples", {})
            rows.append({"model": key.removeprefix("iter_"), **scores, "_n": n, "_label": labels})
    return rows


def _count_iterations(run_dir: Path) -> int:
    t = 0
    while (run_dir / f"iter_{t}").exists():
        t += 1
    return t


def benchmark_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: iterations' benchmark scores (percent) under "task (metric, shots)", then the paper's
    where it reports a task of that name."""
    if not rows:
        return ""
    tasks = sorted({k for r in rows for k in r if k not in ("model", "_n", "_label")})
    labels = {t: next((r["_label"][t] for r in rows if t in r.get("_label", {})), t) for t in tasks}
    lines = [
        "| model | " + " | ".join(labels[t] for t in tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
    ]
    lines += [_score_row(r["model"], r, tasks) for r in rows]
    for label, paper in PAPER.items():
        scores = {t: paper[task_base(t)] for t in tasks if task_base(t) in paper}
        if scores:
            lines.append(_score_row(label, scores, tasks))
    return "\n".join(lines)


def _score_row(label: str, scores: dict[str, Any], tasks: list[str]) -> str:
    return f"| {label} | " + " | ".join(f"{scores[t]:.1f}" if t in scores else "" for t in tasks) + " |"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return read_jsonl(path)  # a torn last line (a crash mid-append) is dropped with a warning


COLUMNS = [
    ("iteration", "iter", "{}"),
    ("accuracy", "held-out acc", "{:.3f}"),
    ("nll", "held-out NLL", "{:.4f}"),
    ("loss_first", "loss (first step)", "{:.4f}"),
    ("loss_last", "loss (last step)", "{:.4f}"),
    ("reward_real", "reward real", "{:+.4f}"),
    ("reward_synthetic", "reward synthetic", "{:+.4f}"),
    ("reward_accuracy", "reward acc", "{:.2f}"),
    ("reward_abs_first", "mean |reward| step 1", "{:.1e}"),
    ("steps", "steps", "{}"),
]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    extra = sorted({k for r in rows for k in r} - {c[0] for c in COLUMNS})
    lines = [
        "| " + " | ".join([c[1] for c in cols] + extra) + " |",
        "|" + "---|" * (len(cols) + len(extra)),
    ]
    for r in rows:
        cells = [c[2].format(r[c[0]]) if c[0] in r else "" for c in cols]
        cells += [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(run_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    # rewards over training steps, iterations laid end to end
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0
    t = 0
    while (run_dir / f"iter_{t}").exists():
        m = read_metrics(run_dir / f"iter_{t}" / "metrics.jsonl")
        if m:
            xs = [offset + r["step"] for r in m]
            ax.plot(xs, [r["rewards/real"] for r in m], color="tab:blue", label="real" if t == 0 else None)
            ax.plot(
                xs,
                [r["rewards/synthetic"] for r in m],
                color="tab:red",
                label="synthetic" if t == 0 else None,
            )
            ax.axvline(offset, color="grey", lw=0.5)
            offset = xs[-1]
        t += 1
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="optimizer step (iterations end to end)", ylabel="reward β·log(pθ/pθt)", title=run_dir.name)
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, run_dir / "rewards.png"))
    plt.close(fig)
    # held-out metrics per iteration
    evaluated = [r for r in rows if "nll" in r]
    if evaluated:
        fig, ax1 = plt.subplots(figsize=(6, 3.5))
        xs = list(range(len(evaluated)))
        labels = [r["iteration"] for r in evaluated]
        ax1.plot(xs, [r["nll"] for r in evaluated], "o-", color="tab:purple", label="held-out NLL")
        ax1.set_ylabel("held-out NLL (per token)")
        if any("accuracy" in r for r in evaluated):
            ax2 = ax1.twinx()
            ax2.plot(xs, [r.get("accuracy", float("nan")) for r in evaluated], "s--", color="tab:green",
                     label="held-out accuracy")  # fmt: skip
            ax2.set_ylabel("held-out exact match")
            ax2.legend(loc="upper right")
        ax1.set_xticks(xs, labels)
        ax1.set_xlabel("iteration")
        ax1.legend(loc="upper left")
        ax1.set_title(f"{run_dir.name}: evaluation")
        fig.tight_layout()
        written.append(_save(fig, run_dir / "eval.png"))
        plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _sampling_note(cfg: dict[str, Any]) -> list[str]:
    """A warning paragraph when the run opted into samples that are not the opponent's own distribution."""
    gen, play = cfg.get("generation", {}), cfg.get("selfplay", {})
    if not gen.get("allow_biased_sampling"):
        return []
    source, space = "", cfg.get("train", {}).get("loss") == "space"
    if space and not play.get("resample", True):
        source = ", and every iteration trained on iteration 0's samples (selfplay.resample=false)"
    elif space and play.get("mix_previous"):
        source = ", and also on the previous opponent's samples (selfplay.mix_previous=true)"
    return [
        f"**Biased sampling:** synthetic responses were sampled with temperature {gen.get('temperature')}, "
        f"top_p {gen.get('top_p')}, top_k {gen.get('top_k')}{source} (generation.allow_biased_sampling="
        "true); the loss still used the current opponent's untempered log-probs as their density.",
        "",
    ]


def _stages_note(loss: str) -> list[str]:
    """Which stages a reference-free objective skips: it trains on the policy's own log-probs alone."""
    try:
        kind = LossType(loss)
    except ValueError:  # a run directory written by another version
        return []
    if not kind.uses_synthetic or kind.needs_opponent:
        return []
    note = f"Reference-free: no score stage (the `{loss}` loss reads no opponent log-probs)."
    if kind.uses_proto:
        note += " Each prompt's proto-synthetic response is its first sample of iteration 0."
    return [note, ""]


def write_report(run_dir: Path) -> tuple[str, list[Path]]:
    """Write report.md and the plots; return the table and the paths written."""
    rows = collect(run_dir)
    table = markdown_table(rows)
    bench = benchmark_table(benchmark_rows(run_dir))
    if bench:
        table += "\n\nBenchmarks (lm-eval; percent):\n\n" + bench
    pngs = plot(run_dir, rows)
    manifest = Manifest.open(run_dir)
    cfg = manifest.config
    loss = cfg.get("train", {}).get("loss", "?")
    body = [
        f"# {run_dir.name}",
        "",
        f"Objective `{loss}`, model `{cfg.get('model', {}).get('name', '?')}`, "
        f"start model `{manifest.start_model or '?'}`.",
        "",
        *_stages_note(loss),
        *_sampling_note(cfg),
        table,
        "",
        *diagnostics_section(run_dir),
        *timing_section(manifest),
        *[f"![{p.stem}]({p.name})" for p in pngs],
        "",
    ]
    md = run_dir / "report.md"
    with atomic_path(md) as tmp:
        tmp.write_text("\n".join(body), encoding="utf-8")
    return table, [md, *pngs]


# ------------------------------------------------------------------------------ per-iteration diagnostics


def final_epoch_means(metrics: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """Mean of each key over the logged steps of the last epoch (steps are equal-sized batches, so this
    is the mean over the final epoch's training pairs, up to the model moving within the epoch)."""
    if not metrics:
        return {}
    last = [m for m in metrics if m.get("epoch") == metrics[-1].get("epoch")]
    return {k: sum(m[k] for m in last) / len(last) for k in keys if all(k in m for m in last)}


def collect_diagnostics(
    run_dir: Path, real_ids: dict[int, tuple[int, ...]] | None = None
) -> list[dict[str, Any]]:
    """One row per trained iteration t, from iter_t's artefacts:

    * ``logp_real_opponent``: mean summed log-likelihood of the real responses under the opponent θt
      (opponent_logps.parquet; θt is the model after iteration t-1), ``nll_real_opponent`` per token;
    * ``logp_real``, ``logp_synthetic``, ``reward_real``, ``reward_synthetic``, ``reward_margin``: the
      trained player's, averaged over the final epoch (metrics.jsonl);
    * ``identical``: share of synthetic samples equal, token for token, to their prompt's real response;
    * ``syn_length``, ``syn_capped``: mean synthetic length (tokens) and share that hit the length cap;
    * ``template_drift``: share of the samples the tokenization rule re-renders as other ids at the
      response's start or end (the generate entry's `chat.template_drift`; near 1: a template that
      marks every real response);
    * ``accuracy``, ``nll``: held-out metrics of the trained model (eval.json), when evaluated.

    `real_ids` (prompt index -> real response ids) is read from the run's data when not given.
    """
    rows: list[dict[str, Any]] = []
    manifest = Manifest.open(run_dir)
    sft = manifest.config.get("train", {}).get("loss") == "sft"
    t = 0
    while (run_dir / f"iter_{t}").exists():
        d = run_dir / f"iter_{t}"
        row: dict[str, Any] = {"iteration": t}
        if (d / "opponent_logps.parquet").exists():
            real = [r for r in read_table(d / "opponent_logps.parquet") if r["kind"] == "real"]
            if real:
                row["logp_real_opponent"] = sum(r["logp"] for r in real) / len(real)
                row["nll_real_opponent"] = -sum(r["logp"] for r in real) / sum(r["length"] for r in real)
        means = final_epoch_means(
            read_metrics(d / "metrics.jsonl"),
            ("logps/real", "logps/synthetic", "rewards/real", "rewards/synthetic", "rewards/margin"),
        )
        if sft:  # SFT has no opponent: its "rewards" are not rewards
            means = {k: v for k, v in means.items() if not k.startswith("rewards/")}
        row.update({k.replace("logps/", "logp_").replace("rewards/", "reward_"): v for k, v in means.items()})
        if (d / "synthetic.parquet").exists():
            syn = read_table(d / "synthetic.parquet")
            if syn:
                if real_ids is None:
                    from spaceft.rundata import training_data

                    real_ids = {tok.index: tok.response_ids for tok in training_data(run_dir)}
                same = sum(tuple(r["response_ids"]) == real_ids.get(r["prompt_index"]) for r in syn)
                row["identical"] = same / len(syn)
                row["syn_length"] = sum(r["length"] for r in syn) / len(syn)
                row["syn_capped"] = sum(bool(r["hit_cap"]) for r in syn) / len(syn)
        drift = (manifest.stage(t, "generate") or {}).get("template_drift")
        if drift:
            row["template_drift"] = drift["boundary_fraction"]
        if (d / "eval.json").exists():
            row.update({k: v for k, v in read_json(d / "eval.json").items() if k in ("accuracy", "nll")})
        rows.append(row)
        t += 1
    return rows


DIAGNOSTIC_COLUMNS = [
    ("iteration", "iter", "{}"),
    ("logp_real_opponent", "log p real (opponent)", "{:.2f}"),
    ("logp_real", "log p real (player, last epoch)", "{:.2f}"),
    ("reward_real", "reward real", "{:+.3f}"),
    ("reward_synthetic", "reward synthetic", "{:+.3f}"),
    ("identical", "synthetic = real", "{:.2f}"),
    ("syn_length", "synthetic length", "{:.1f}"),
    ("syn_capped", "capped", "{:.2f}"),
    ("template_drift", "re-tokenized otherwise at start/end", "{:.2f}"),
]


def diagnostics_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`collect_diagnostics` rows (columns no row has are left out)."""
    cols = [c for c in DIAGNOSTIC_COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "" for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def diagnostics_section(run_dir: Path) -> list[str]:
    """The report's diagnostics section as lines (none for a run with no trained iteration)."""
    rows = collect_diagnostics(run_dir)
    if not any(len(r) > 1 for r in rows):
        return []
    return [
        "## Diagnostics per iteration",
        "",
        "Log-likelihoods are summed over a response's tokens; the player's columns average the final epoch.",
        "",
        diagnostics_table(rows),
        "",
    ]


# ------------------------------------------------------------------------------ where the time goes

TIMED_STAGES = STAGES


def _stage_cell(entry: dict[str, Any]) -> str:
    if "wall_s" not in entry:
        return ""
    cell = f"{entry['wall_s']:.1f}"
    if entry.get("tokens_per_s"):
        cell += f" ({entry['tokens_per_s']:.0f} tok/s)"
    return cell + (" cached" if entry.get("cached") else "") + (" resumed" if entry.get("resumed") else "")


def timing_section(manifest: Manifest) -> list[str]:
    """Wall seconds per stage and iteration (tokens/s where the stage records it), and each stage's share
    of the total; none for a run whose manifest has no timings (written before they were recorded)."""
    by_iteration: dict[int | str, dict[str, dict[str, Any]]] = {}
    for record in manifest.records():  # "base" first, then the iterations in order
        by_iteration.setdefault(record.iteration, {})[record.stage] = record.info
    rows, totals = [], dict.fromkeys(TIMED_STAGES, 0.0)
    for key, stages in by_iteration.items():
        cells = [_stage_cell(stages.get(stage, {})) for stage in TIMED_STAGES]
        if not any(cells):
            continue
        for stage in TIMED_STAGES:
            totals[stage] += float(stages.get(stage, {}).get("wall_s", 0.0))
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    total = sum(totals.values())
    if not rows or total <= 0:
        return []
    share = " | ".join(f"{100 * totals[s] / total:.0f}%" for s in TIMED_STAGES)
    return [
        "## Where the time goes",
        "",
        "Wall seconds of each stage's last invocation (a stage marked resumed counts only what was left).",
        "",
        "| iter | " + " | ".join(TIMED_STAGES) + " |",
        "|" + "---|" * (len(TIMED_STAGES) + 1),
        *rows,
        f"| share | {share} |",
        "",
    ]
