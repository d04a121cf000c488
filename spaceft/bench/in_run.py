"""`eval.lm_eval_tasks` in a run: each entry resolved to a harness task, and the tasks run on a model.

An entry (`spaceft.bench.catalog.parse_task_entry`) names a benchmark of `spaceft bench` (its data
fetched once, offline), a local task YAML, or a harness task by name (data from the Hub or the
`datasets` cache); the harness call is `spaceft.lmeval.run_lm_eval_chat`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from spaceft.bench.catalog import BENCHMARKS, TaskEntry, parse_task_entry
from spaceft.bench.run import prepare
from spaceft.lmeval import HarnessModel, LocalTask, run_lm_eval_chat

log = logging.getLogger(__name__)


def resolve_tasks(
    specs: Sequence[str], task_dir: Path, cache_dir: Path | None = None
) -> tuple[list[LocalTask | str], dict[str, str], dict[str, TaskEntry]]:
    """``eval.lm_eval_tasks`` entries as harness tasks, the environment they need, and each task's
    entry by the task's harness name (its few-shot count; the key its scores are recorded under).

    An entry (:func:`parse_task_entry`) is a benchmark of ``spaceft bench`` (``ifeval``,
    ``arc_easy``, ``hellaswag``, ``gsm8k_cot``, ``mmlu``, ``arithmetic``: local data, fetched once), a
    path to a local task YAML (its directory becomes an ``include_path``; it must read local files),
    or a harness task name (``harness:NAME`` where a benchmark has that name), whose data comes from
    the Hub or the ``datasets`` cache. A few-shot count on a local task that has no split to draw
    examples from other than the one it evaluates is refused (the harness would take them from the
    evaluated items themselves).
    """
    entries = [parse_task_entry(s) for s in specs]
    bench = [e.target for e in entries if e.kind == "bench"]
    env: dict[str, str] = {}
    prepared: dict[str, LocalTask] = {}
    if bench:
        local, env = prepare(bench, task_dir, cache_dir)
        prepared = dict(zip(bench, local, strict=True))
    tasks: list[LocalTask | str] = []
    by_name: dict[str, TaskEntry] = {}
    for e in entries:
        task: LocalTask | str
        if e.kind == "bench":
            task = prepared[e.target]
        elif e.kind == "yaml":
            task = local_task_from_yaml(Path(e.target))
        else:
            task = e.target
        name = task.name if isinstance(task, LocalTask) else task
        if name in by_name:
            first = by_name[name].text
            raise ValueError(f"eval.lm_eval_tasks: {first!r} and {e.text!r} both run task {name}")
        if e.shots and isinstance(task, LocalTask) and not has_fewshot_source(task):
            own = e.kind == "bench" and e.target in BENCHMARKS  # an offline copy of a harness task
            hint = f"; the harness's own task, with its train split, is harness:{e.target}:{e.shots}"
            hint = hint if own else ""
            raise ValueError(
                f"eval.lm_eval_tasks entry {e.text!r}: {task.yaml_path} serves only the split it evaluates, "
                f"so {e.shots} few-shot examples would come from the evaluated items themselves{hint}"
            )
        tasks.append(task)
        by_name[name] = e
    keys: dict[str, str] = {}
    for name, e in by_name.items():  # a local YAML's task named like a benchmark would share its key
        key = result_key(e, name)
        if key in keys:
            first = keys[key]
            raise ValueError(f"eval.lm_eval_tasks: {first!r} and {e.text!r} would share the key {key!r}")
        keys[key] = e.text
    return tasks, env, by_name


def has_fewshot_source(task: LocalTask) -> bool:
    """Whether the harness draws a local task's few-shot examples from other than the split it evaluates:
    a served ``fewshot_split``, fixed ``fewshot_config.samples``, or a served training split (for a
    group: every member)."""
    if task.subtasks:
        return all(has_fewshot_source(t) for t in task.subtasks)
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(task.yaml_path, resolve_func=False)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    served = set(files) if isinstance(files, dict) else set()
    evaluated = cfg.get("test_split") or cfg.get("validation_split")
    split = cfg.get("fewshot_split")
    if split and split in served and split != evaluated:
        return True
    if (cfg.get("fewshot_config") or {}).get("samples"):
        return True
    return any(cfg.get(k) and cfg.get(k) in served and cfg.get(k) != evaluated
               for k in ("training_split", "validation_split"))  # fmt: skip


def local_task_from_yaml(path: Path) -> LocalTask:
    """A user's local task YAML: its ``task`` name and the first file its ``data_files`` names."""
    if not path.is_file():
        raise FileNotFoundError(f"eval.lm_eval_tasks: {path} does not exist")
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_LenientLoader)  # safe; tags -> None
    files = ((cfg or {}).get("dataset_kwargs") or {}).get("data_files")
    if not isinstance(cfg, dict) or "task" not in cfg or not files:
        raise ValueError(f"{path}: a local task YAML needs `task:` and `dataset_kwargs.data_files`")
    first = next(iter(files.values())) if isinstance(files, dict) else files
    first = first[0] if isinstance(first, list) else first
    data = Path(first) if Path(first).is_absolute() else path.parent / first
    return LocalTask(str(cfg["task"]), path, data)


class _LenientLoader(yaml.SafeLoader):
    """Safe YAML loading that reads harness tags such as ``!function`` as plain strings."""


_LenientLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def result_key(entry: TaskEntry, task_name: str) -> str:
    """The key a task's scores are recorded under: the entry as written, but a local YAML's task name
    (with its few-shot count) in place of its path."""
    if entry.kind != "yaml":
        return entry.text
    return task_name if entry.shots is None else f"{task_name}:{entry.shots}"


def lm_eval_for_run(
    model_dir: str, cfg: Any, model_cfg: Any | None, out_dir: Path, *, every_rank: bool = False
) -> dict[str, Any]:
    """The lm-eval part of a run's evaluation (``eval.lm_eval_tasks``).

    ``cfg`` is the run's ``EvalConfig``, ``model_cfg`` its ``ModelConfig`` (dtype, revision,
    trust_remote_code). Returns ``{"lm_eval": {task: {metric: value}}, "lm_eval_provenance": {...}}``
    on the main rank, ``{}`` elsewhere. Under several processes the harness shards the work across
    all of them, so every rank must call this (``every_rank=True`` says the caller does); called from
    one rank only it would wait forever for the others, so that is refused.
    """
    from accelerate import PartialState

    processes = PartialState().num_processes
    if processes > 1 and not every_rank:
        raise RuntimeError(
            f"eval.lm_eval_tasks under {processes} processes: lm-eval must run on every rank, and this "
            "evaluation runs on the main process only; run `spaceft eval` in one process"
        )
    tasks, env, entries = resolve_tasks(list(cfg.lm_eval_tasks), out_dir / "lm_eval_tasks")
    model = HarnessModel(
        model_dir,
        dtype=getattr(model_cfg, "dtype", "float32"),
        # a revision names a hub commit: it applies to the start model by hub id, not to saved iterations
        revision=getattr(model_cfg, "revision", None) if not Path(model_dir).exists() else None,
        trust_remote_code=getattr(model_cfg, "trust_remote_code", False),
        batch_size=cfg.lm_eval_batch_size,
    )
    gen = {"max_gen_toks": cfg.lm_eval_max_gen_toks} if cfg.lm_eval_max_gen_toks else None
    out = run_lm_eval_chat(model, tasks, cfg.lm_eval_chat_template, limit=cfg.lm_eval_limit, env=env,
                           gen_kwargs=gen, fewshot={t: e.shots for t, e in entries.items()})  # fmt: skip
    if not out:
        return {}
    used = out["provenance"].get("n_shot", {})
    for t, e in entries.items():  # a task whose YAML fixes its count ignores the one asked for
        if e.shots is not None and t in used and used[t] != e.shots:
            log.warning("lm-eval ran %s %d-shot, not %d-shot as %r asks (its task fixes the count)", t,
                        used[t], e.shots, e.text)  # fmt: skip
    result = {
        "lm_eval": {result_key(entries[t], t) if t in entries else t: m for t, m in out["results"].items()},
        "lm_eval_provenance": {**out["provenance"], "max_gen_toks": cfg.lm_eval_max_gen_toks},
        "lm_eval_shots": {result_key(entries[t], t): n for t, n in used.items() if t in entries},
    }
    if out.get("subtasks"):  # a group's members (MMLU's subjects and categories)
        result["lm_eval_subtasks"] = out["subtasks"]
    return result
