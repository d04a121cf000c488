"""lm-evaluation-harness, offline and on every rank.

spaceft never lets the harness fetch a task's data: every task it runs is a *local task YAML* whose
``dataset_path: json`` and ``dataset_kwargs.data_files`` name a JSON-lines file on disk, found by
the harness through ``TaskManager(include_path=...)``. Where the harness already defines the task
(IFEval, ARC, HellaSwag, GSM8K-CoT, MMLU) the local YAML ``include:``s the harness's own YAML and
overrides only where the data comes from, so prompts, metrics and filters stay the harness's. The embedded
arithmetic task ships its own YAML in GSM8K's format (``spaceft/bench/tasks/spaceft_arithmetic.yaml``).

While the harness runs local tasks only, ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set, so a
local task that would reach the Hugging Face Hub fails instead. A harness task given by name (``harness:``
prefix, or a name that is no benchmark of ``spaceft bench``: the leaderboard's ``arc_challenge``,
``winogrande``...) reads its data from the Hub, or from the ``datasets`` cache where the environment
says offline. An entry may end in ``:N`` for N-shot (the Open LLM Leaderboard's ARC is
``arc_challenge:25``); see :func:`spaceft.bench.catalog.parse_task_entry` (a run's entries are resolved
and run by :mod:`spaceft.bench.in_run`). Data parallelism is the harness's own: under ``accelerate
launch`` (or ``torchrun``) its HF backend shards the requests across the processes, so
:func:`run_lm_eval` must be called on *every* rank; only the main rank gets the results back.

A local task may be a group (MMLU's 57 subject tasks under ``spaceft_mmlu``): the harness runs it by
name, the group's score is the result, and its members' scores are kept under ``subtasks``.

The result records what makes a score reproducible: the harness version and, per task, the SHA-256
of the YAML the harness read (with everything it includes) and of its data file (and few-shot file;
for a group, of every member's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from spaceft.rundir import atomic_path

log = logging.getLogger(__name__)

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
"""Set while the harness runs: nothing may touch the Hugging Face Hub."""

ARITHMETIC_TASK = "spaceft_arithmetic"
"""The embedded arithmetic task's name in the harness (its YAML ships with spaceft)."""

ChatMode = Literal["auto", "on", "off"]
CHAT_MODES: tuple[ChatMode, ...] = get_args(ChatMode)
"""Chat template use: on / off for every task, or auto: on for generation tasks (an instruct model
answers a request, as in IFEval), off for log-likelihood ones (ARC, HellaSwag score a continuation
of plain text, as leaderboards do)."""

@dataclass(frozen=True)
class LocalTask:
    """A harness task backed by a local JSON-lines file."""

    name: str
    """Task name as the harness knows it (the YAML's ``task:``)."""
    yaml_path: Path
    """The local YAML (in a directory passed to the harness as ``include_path``)."""
    data_file: Path
    """The JSON-lines file the YAML's ``data_files`` names (for a group: the file that pins its
    members' data, e.g. a source manifest with their hashes)."""
    fewshot_file: Path | None = None
    """The file of the few-shot split, where the task draws examples from one (MMLU's dev)."""
    subtasks: tuple[LocalTask, ...] = ()
    """For a group (the YAML has ``group:``): the local tasks it aggregates. The harness runs the
    group by name; each member's YAML and data are recorded in the provenance."""


@dataclass
class HarnessModel:
    """How the harness loads the model: what ``model_args`` and the chat-template flag carry."""

    path: str
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    chat_template: bool = False
    """Render prompts with the tokenizer's chat template (``apply_chat_template`` in the harness);
    see :func:`run_lm_eval_chat` for choosing it per task."""
    batch_size: int = 16

    def model_args(self) -> dict[str, Any]:
        """The harness HF backend's ``model_args``."""
        args: dict[str, Any] = {"pretrained": self.path, "dtype": self.dtype}
        if self.revision:
            args["revision"] = self.revision
        if self.trust_remote_code:
            args["trust_remote_code"] = True
        return args


def require_harness() -> Any:
    """Import ``lm_eval`` or say how to install it."""
    try:
        import lm_eval
    except ImportError as e:
        raise RuntimeError("lm-eval is not installed: pip install 'spaceft[eval]'") from e
    return lm_eval


def _device() -> str:
    # The harness's HF backend defaults to "cuda" even on a CPU-only torch; under `accelerate
    # launch` it places the model on each process's own device whatever this says.
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def harness_version() -> str:
    return metadata.version("lm_eval")


def harness_task_yaml(relative: str) -> Path:
    """The installed harness's own YAML for a task, e.g. ``arc/arc_easy.yaml``."""
    lm_eval = require_harness()
    path = Path(lm_eval.__file__).parent / "tasks" / relative
    if not path.is_file():
        raise RuntimeError(f"lm-eval {harness_version()} has no task file tasks/{relative}")
    return path


def write_task_yaml(
    task_dir: Path,
    name: str,
    data_file: Path,
    *,
    split: str,
    include: Path | None = None,
    overrides: dict[str, Any] | None = None,
    fewshot_file: Path | None = None,
    fewshot_split: str = "dev",
) -> LocalTask:
    """Write ``task_dir/<name>.yaml``: a task reading ``data_file`` as its ``split`` split.

    With ``include`` the task derives from that YAML (the harness merges it, ours wins) and only the
    data source, the task name and the splits change; the splits it does not ship are switched off so
    the harness never looks for them. ``fewshot_file`` is served as ``fewshot_split``, the split the
    included YAML draws few-shot examples from (the harness loads it even at zero shots).
    """
    task_dir.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {}
    if include is not None:
        cfg["include"] = str(include)
    files = {split: str(Path(data_file).resolve())}
    if fewshot_file is not None:
        files[fewshot_split] = str(Path(fewshot_file).resolve())
    cfg.update(
        {
            "task": name,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "training_split": None,
            "validation_split": None,
            "test_split": None,
        }
    )
    cfg["validation_split" if split == "validation" else "test_split"] = split
    cfg.update(overrides or {})
    path = task_dir / f"{name}.yaml"
    with atomic_path(path) as tmp:  # every rank writes the same file: never let one read a torn copy
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return LocalTask(name, path, Path(data_file), Path(fewshot_file) if fewshot_file is not None else None)


def arithmetic_task(task_dir: Path, *, n: int, seed: int) -> LocalTask:
    """The embedded arithmetic task's held-out split in GSM8K's format, with the shipped YAML.

    Rows are ``{"question", "answer"}`` with the worked solution ending in ``#### <answer>``, as in
    GSM8K, so the harness's GSM8K filters and exact match apply unchanged.
    """

    from spaceft.tasks import make_arithmetic

    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = task_dir / f"{ARITHMETIC_TASK}.jsonl"
    rows = make_arithmetic(n, seed=seed, split="test")
    with atomic_path(data_file) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            user, assistant = row["messages"][0]["content"], row["messages"][1]["content"]
            fh.write(json.dumps({"question": user, "answer": assistant}) + "\n")
    shipped = yaml.safe_load(
        (resources.files("spaceft.bench") / "tasks" / f"{ARITHMETIC_TASK}.yaml").read_text(encoding="utf-8")
    )
    shipped["dataset_kwargs"] = {"data_files": {"test": str(data_file.resolve())}}
    path = task_dir / f"{ARITHMETIC_TASK}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(shipped, sort_keys=False), encoding="utf-8")
    return LocalTask(ARITHMETIC_TASK, path, data_file)


def sha256_file(path: Path) -> str:
    from spaceft.default_model import _sha256

    return _sha256(Path(path))


def yaml_hash(path: Path) -> str:
    """SHA-256 over a task YAML and, in order, every YAML it includes (what the harness reads)."""
    digest = hashlib.sha256()
    seen: set[Path] = set()
    todo = [Path(path).resolve()]
    while todo:
        current = todo.pop(0)
        if current in seen:
            continue
        seen.add(current)
        text = current.read_bytes()
        digest.update(text)
        for line in text.decode("utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "include" and value.strip():
                inc = Path(value.strip().strip("'\""))
                todo.append(inc if inc.is_absolute() else current.parent / inc)
    return digest.hexdigest()


class SharedModel:
    """One harness model (the HF backend) for the several harness calls of one evaluation, so the weights
    load once, not once per chat setting, few-shot count and kind of task: ``paper_space``'s six
    benchmarks are five calls. Built at the first call, inside that call's environment."""

    def __init__(self, model: HarnessModel) -> None:
        self.model = model
        self.lm: Any = None

    def get(self, lm_eval: Any) -> Any:
        if self.lm is None:
            self.lm = lm_eval.api.registry.get_model("hf").create_from_arg_obj(
                self.model.model_args(),
                {"batch_size": self.model.batch_size, "max_batch_size": None, "device": _device()},
            )
        return self.lm

    def release(self) -> None:
        self.lm = None
        gc.collect()


def _simple_evaluate(
    lm_eval: Any,
    model: HarnessModel,
    names: list[str],
    manager: Any,
    limit: int | float | None,
    gen_kwargs: dict[str, Any] | None,
    log_samples: bool,
    num_fewshot: int | None = None,
    shared: SharedModel | None = None,
) -> dict[str, Any] | None:
    return lm_eval.simple_evaluate(
        model=shared.get(lm_eval) if shared else "hf",
        model_args=None if shared else model.model_args(),
        tasks=names,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=model.batch_size,
        device=_device(),
        apply_chat_template=model.chat_template,
        fewshot_as_multiturn=model.chat_template,
        task_manager=manager,
        log_samples=log_samples,
        gen_kwargs=gen_kwargs,
    )


def write_samples(samples: dict[str, list[dict[str, Any]]], samples_dir: Path) -> None:
    """One JSON line per item and task: doc id, prompt, the (filtered) response and the item's scores."""
    samples_dir.mkdir(parents=True, exist_ok=True)
    for task, items in samples.items():
        with (samples_dir / f"{task}.jsonl").open("w", encoding="utf-8") as fh:
            for item in items:
                args = item.get("arguments") or [[None]]
                row = {"doc_id": item.get("doc_id"), "prompt": args[0][0], "target": item.get("target"),
                       "response": item.get("filtered_resps"),
                       **{m: item.get(m) for m in item.get("metrics", [])}}  # fmt: skip
                fh.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")


def task_provenance(task: LocalTask) -> dict[str, Any]:
    """Paths and SHA-256 of a local task's YAML (with its includes), data file, few-shot file and,
    for a group, of each member task's."""
    prov: dict[str, Any] = {
        "yaml": str(task.yaml_path),
        "yaml_sha256": yaml_hash(task.yaml_path),
        "data": str(task.data_file),
        "data_sha256": sha256_file(task.data_file),
    }
    if task.fewshot_file is not None:
        prov.update(fewshot=str(task.fewshot_file), fewshot_sha256=sha256_file(task.fewshot_file))
    if task.subtasks:
        prov["subtasks"] = {t.name: task_provenance(t) for t in task.subtasks}
    return prov


@contextlib.contextmanager
def quiet_git_hash() -> Iterator[None]:
    """Make the harness's record of the working directory's git commit quiet.

    ``simple_evaluate`` stores ``git describe --always`` of the current directory, running git with
    its stderr on the terminal: outside a repository that prints "fatal: not a git repository" on
    every call. The harness has no setting for it, so for the duration its call runs git with stderr
    captured (the hash is recorded where there is one, ``None`` elsewhere).
    """
    import subprocess

    from lm_eval import evaluator

    def git_hash() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True)
        except OSError:  # no git installed
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


@contextlib.contextmanager
def offline(extra: dict[str, str] | None = None, *, hub: bool = False) -> Iterator[None]:
    """Set the Hub-offline variables (unless ``hub``: a harness task by name reads the Hub as the
    environment allows) and ``extra`` for the duration, then restore them.

    ``datasets`` and ``huggingface_hub`` read the variables once, at import (and the harness has
    imported both), so their module constants are switched as well: the variables alone would leave an
    imported ``load_dataset`` reaching for the Hub."""
    wanted = {**({} if hub else OFFLINE_ENV), **(extra or {})}
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    constants: list[tuple[Any, str, Any]] = []
    if not hub:
        import datasets.config
        import huggingface_hub.constants

        for module, name in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                             (huggingface_hub.constants, "HF_HUB_OFFLINE")):  # fmt: skip
            if hasattr(module, name):
                constants.append((module, name, getattr(module, name)))
                setattr(module, name, True)
    nltk_path: list[str] | None = None
    if "NLTK_DATA" in wanted:  # NLTK reads $NLTK_DATA once, at import: tell an imported NLTK too
        import nltk

        nltk_path = list(nltk.data.path)
        nltk.data.path.insert(0, wanted["NLTK_DATA"])
    try:
        yield
    finally:
        if nltk_path is not None:
            import nltk

            nltk.data.path[:] = nltk_path
        for module, name, value in constants:
            setattr(module, name, value)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_generative(task: LocalTask | str, index: Mapping[str, Any] | None = None) -> bool:
    """Whether a task generates text (``output_type: generate_until``, includes merged). A harness task
    by name is looked up in the harness's task ``index`` (a group or tag: when all its tasks generate);
    without an index, or where the index does not say, it counts as not generating."""
    if not isinstance(task, LocalTask):
        return index is not None and harness_output_types(index, task) == {"generate_until"}
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task.yaml_path, resolve_func=False).get("output_type") == "generate_until"


def _harness_entry(index: Mapping[str, Any], name: str) -> tuple[str, dict[str, Any], list[Any] | None]:
    """(kind, config, members) of a harness task index entry (lm-eval 0.4.10+: entries with ``kind``,
    ``cfg`` and ``tags``); members None for a task or what the index does not say. A group may define a
    member inline (a mapping with its own config)."""
    entry = index.get(name)
    kind = str(getattr(entry, "kind", "")).rsplit(".", 1)[-1]
    cfg = getattr(entry, "cfg", None) or {}
    members = cfg.get("task") if kind == "GROUP" else getattr(entry, "tags", None) if kind == "TAG" else None
    if isinstance(members, str):
        members = [members]
    return kind, cfg, list(members) if isinstance(members, list | set | tuple) else None


def harness_output_types(index: Mapping[str, Any], name: str, depth: int = 0) -> set[str]:
    """The output types of a harness task, group or tag by name, from the harness's task index;
    ``{"?"}`` for what the index does not say."""
    kind, cfg, members = _harness_entry(index, name)
    if kind == "TASK":
        return {str(cfg.get("output_type", "?"))}
    if not members or depth > 8:
        return {"?"}
    out: set[str] = set()
    for m in members:
        inline = isinstance(m, dict)
        out |= {str(m.get("output_type", "?"))} if inline else harness_output_types(index, m, depth + 1)
    return out


def harness_members(index: Mapping[str, Any], name: str, depth: int = 0) -> set[str]:
    """Every group, tag and task a harness group or tag by name holds, at any depth."""
    _, _, members = _harness_entry(index, name)
    out: set[str] = set()
    for m in (members or []) if depth <= 8 else []:
        member = m.get("task") if isinstance(m, dict) else m
        if isinstance(member, str):
            out |= {member} | harness_members(index, member, depth + 1)
    return out


def harness_tasks() -> Any:
    """The harness's own task manager (its default task index), built once per process: indexing its
    ~15,000 task files takes seconds, and preflight, `auto`'s lookup and each harness call of every
    evaluation would otherwise each index them again. Keyed by the class, so a stand-in never meets a
    real index."""
    from lm_eval.tasks import TaskManager

    return _task_manager(TaskManager)


@functools.lru_cache(maxsize=2)
def _task_manager(manager_class: Any) -> Any:
    return manager_class()


def harness_index(tasks: Sequence[LocalTask | str], chat: str) -> Mapping[str, Any] | None:
    """The harness's task index when `auto` must tell named tasks apart (indexing the harness's task
    files takes seconds: only then)."""
    if chat != "auto" or all(isinstance(t, LocalTask) for t in tasks):
        return None
    return getattr(harness_tasks(), "task_index", None)


def run_lm_eval_chat(
    model: HarnessModel,
    tasks: Sequence[LocalTask | str],
    chat: str,
    *,
    limit: int | float | None = None,
    env: dict[str, str] | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    samples_dir: Path | None = None,
    fewshot: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """:func:`run_lm_eval` with a chat mode of :data:`CHAT_MODES` and a few-shot count per task name
    (``fewshot``; missing or None: the task's own). The model loads once (:class:`SharedModel`), for
    one harness call per chat setting, few-shot count
    and kind (local tasks, which run with the Hub off, apart from tasks by name); the results are
    merged, with the chat setting per task in the provenance (always a mapping)."""
    if chat not in CHAT_MODES:
        raise ValueError(f"chat template mode must be one of {', '.join(CHAT_MODES)}, got {chat!r}")
    shots = dict(fewshot or {})
    groups: dict[tuple[bool, int | None, bool], list[LocalTask | str]] = {}
    index = harness_index(tasks, chat)
    for t in tasks:  # local tasks apart from named ones: a call with a named task has the Hub on
        templated = chat == "on" or (chat == "auto" and is_generative(t, index))
        if index is not None and not isinstance(t, LocalTask) and not templated:
            types = harness_output_types(index, t)
            if "generate_until" in types:
                log.warning("lm-eval %s mixes generation with other tasks (%s): run as plain text under "
                            "lm_eval_chat_template=auto; list its generation tasks apart, or set on",
                            t, ", ".join(sorted(types)))  # fmt: skip
        groups.setdefault((templated, shots.get(_task_name(t)), isinstance(t, LocalTask)), []).append(t)
    merged: dict[str, Any] = {"results": {}, "stderr": {}, "subtasks": {}}
    shared = SharedModel(model)
    try:
        outs = [
            run_lm_eval(dataclasses.replace(model, chat_template=templated), group, limit=limit, env=env,
                        gen_kwargs=gen_kwargs, samples_dir=samples_dir, num_fewshot=n_shot, shared=shared)
            for (templated, n_shot, _), group in groups.items()
        ]  # fmt: skip
    finally:
        shared.release()
    for (templated, _, _), out in zip(groups, outs, strict=True):
        if not out:
            continue
        names = list(out["results"])
        out["provenance"]["chat_template"] = dict.fromkeys(names, templated)
        for key in ("results", "stderr", "subtasks"):
            merged[key].update(out[key])
        prov = merged.setdefault("provenance", {})
        for key, value in out["provenance"].items():
            if isinstance(value, dict) and key != "model_args":
                prov.setdefault(key, {}).update(value)
            else:
                prov[key] = value
    return merged if merged["results"] else {}


def _task_name(task: LocalTask | str) -> str:
    return task.name if isinstance(task, LocalTask) else task


def run_lm_eval(
    model: HarnessModel,
    tasks: Sequence[LocalTask | str],
    *,
    limit: int | float | None = None,
    env: dict[str, str] | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    samples_dir: Path | None = None,
    num_fewshot: int | None = None,
    shared: SharedModel | None = None,
) -> dict[str, Any]:
    """Run harness tasks on a saved model; call it on every rank.

    ``tasks`` are :class:`LocalTask` (their YAML directories become ``include_path``) or names of
    tasks the harness or those directories define. Local tasks only: the Hub is off. A task by name
    reads its data from the Hub (or the ``datasets`` cache, where the environment says offline).
    ``num_fewshot`` overrides every task's few-shot count (None: each task's own). Returns, on the
    main rank, ``{"results": {task: {metric: value}}, "stderr": {...}, "subtasks": {...},
    "provenance": {...}}``; on other ranks ``{}``. ``results`` and ``stderr`` hold the tasks asked
    for; the members of a group asked for (and its inner groups) are in ``subtasks``, with their
    stderr under ``<metric>_stderr``. The provenance's ``n_shot`` is the few-shot count the harness
    used per task. With ``samples_dir``, each item's prompt, response and scores go to
    ``samples_dir/<task>.jsonl``.
    """
    lm_eval = require_harness()
    from lm_eval.tasks import TaskManager

    local = [t for t in tasks if isinstance(t, LocalTask)]
    include = sorted({str(t.yaml_path.parent) for t in local})
    names = [_task_name(t) for t in tasks]
    hub = len(local) < len(tasks)
    log.info("lm-eval %s on %s: %s (limit %s, %s-shot, chat template %s, Hub %s)", harness_version(),
             model.path, ", ".join(names), limit, "default" if num_fewshot is None else num_fewshot,
             model.chat_template, "as the environment allows" if hub else "off")  # fmt: skip
    with offline(env, hub=hub):
        # Only our directories are indexed when every task is local: indexing the harness's
        # thousands of YAMLs costs seconds and local tasks reach theirs through `include:`.
        manager = TaskManager(include_path=include, include_defaults=hub) if include else harness_tasks()
        try:
            with quiet_git_hash():
                samples = samples_dir is not None
                out = _simple_evaluate(
                    lm_eval, model, names, manager, limit, gen_kwargs, samples, num_fewshot, shared
                )
        except ConnectionError as e:  # datasets' OfflineModeIsEnabled and friends
            if hub:
                raise RuntimeError(
                    f"lm-eval task(s) {', '.join(names)} need the Hugging Face Hub, which is unreachable or "
                    f"set offline, and their data is not in the datasets cache ({e}); fetch it once where "
                    "the Hub is reachable, or use a benchmark of `spaceft bench` or a local task YAML"
                ) from e
            raise RuntimeError(
                f"lm-eval task(s) {', '.join(names)} need the Hugging Face Hub, which spaceft keeps offline "
                f"for local tasks ({e}); use a local task YAML (`dataset_path: json`) or a benchmark of "
                "`spaceft bench`"
            ) from e
    if not out:  # the harness returns results on the main rank only
        return {}
    if samples_dir is not None:
        write_samples(out.get("samples", {}), samples_dir)
    results, stderr, subtasks = {}, {}, {}
    for task, metrics in out.get("results", {}).items():
        numbers = {
            k.removesuffix(",none"): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "sample_len"
        }
        if task not in names:
            subtasks[task] = numbers
            continue
        results[task] = {k: v for k, v in numbers.items() if "_stderr" not in k}
        stderr[task] = {k.replace("_stderr", ""): v for k, v in numbers.items() if "_stderr" in k}
    n_samples = {t: v.get("effective", v.get("original")) for t, v in out.get("n-samples", {}).items()}
    for group in (t for t in local if t.subtasks):  # the harness counts leaf tasks only
        n_samples[group.name] = sum(n_samples.get(t.name) or 0 for t in group.subtasks)
    provenance = {
        "lm_eval": harness_version(),
        "limit": limit,
        "chat_template": model.chat_template,
        "n_shot": {t: int(n) for t, n in (out.get("n-shot") or {}).items() if t in names},
        "model_args": model.model_args(),
        "n_samples": n_samples,
        "tasks": {t.name: task_provenance(t) for t in local},
    }
    return {"results": results, "stderr": stderr, "subtasks": subtasks, "provenance": provenance}
