"""MMLU as the harness defines it, on the per-subject files of :mod:`spaceft.bench.sources`.

The harness runs MMLU as a group of 57 subject tasks (``mmlu_<subject>``, each with its own
"The following are multiple choice questions (with answers) about <subject>." description and its
subject's 5 dev questions as few-shot pool), tagged into four category groups (STEM, humanities,
social sciences, other) that the ``mmlu`` group averages weighted by size, i.e. over all questions.
A single task over all 14,042 questions would lose the per-subject description and few-shot pool,
so spaceft keeps the structure and renames it: for each harness YAML it writes a local one,
``mmlu`` becoming ``spaceft_mmlu`` in every task, tag and group name,

* ``spaceft_mmlu_<subject>.yaml``: ``include:`` the harness's ``mmlu_<subject>.yaml`` (prompt, choices,
  metric, description), with the data served from ``<subject>.test.jsonl`` and ``<subject>.dev.jsonl``;
* ``spaceft_mmlu_<category>.yaml`` and ``spaceft_mmlu.yaml``: the harness's group YAMLs with the names
  changed, so the aggregation (``acc`` weighted by size) is the harness's own.

``--limit N`` therefore reads the first N questions of *each* subject (57·N in all).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from spaceft.lmeval import LocalTask, harness_task_yaml, write_task_yaml
from spaceft.rundir import write_text

log = logging.getLogger(__name__)

HARNESS_DIR = "mmlu/default"
"""The harness's zero-shot MMLU (``mmlu``), relative to ``lm_eval/tasks``."""

GROUP = "spaceft_mmlu"
"""The local group's name; the harness's ``mmlu`` becomes this in every name."""


def _rename(name: str) -> str:
    if not name.startswith("mmlu"):
        raise ValueError(f"unexpected name {name!r} in the harness's MMLU YAMLs")
    return "spaceft_" + name


def _load(path: Path) -> dict[str, Any]:
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        raise RuntimeError(f"{path} is not a task YAML")
    return cfg


def harness_subjects() -> dict[str, Path]:
    """Each subject the installed harness's MMLU defines, with its ``mmlu_<subject>.yaml``."""
    directory = harness_task_yaml(f"{HARNESS_DIR}/_mmlu.yaml").parent
    return {_load(p)["dataset_name"]: p for p in sorted(directory.glob("mmlu_*.yaml"))}


def write_mmlu_tasks(task_dir: Path, data_dir: Path) -> LocalTask:
    """Write the local MMLU YAMLs into ``task_dir``; return the top group with its subject tasks.

    ``data_dir`` holds ``<subject>.test.jsonl``, ``<subject>.dev.jsonl`` and ``source.json`` (see
    :func:`spaceft.bench.sources.convert_subjects`); its subjects must be the harness's.
    """
    subjects = harness_subjects()
    have = {p.name.removesuffix(".test.jsonl") for p in data_dir.glob("*.test.jsonl")}
    if have != set(subjects):
        extra, missing = sorted(have - set(subjects)), sorted(set(subjects) - have)
        raise RuntimeError(f"{data_dir}: MMLU subjects differ from the harness's "
                           f"(missing {missing or 'none'}, unknown {extra or 'none'})")  # fmt: skip
    tasks = []
    for subject, harness_yaml in subjects.items():
        tag = _rename(_load(harness_yaml)["tag"])
        tasks.append(write_task_yaml(
            task_dir, _rename(harness_yaml.stem), data_dir / f"{subject}.test.jsonl", split="test",
            include=harness_yaml, fewshot_file=data_dir / f"{subject}.dev.jsonl", overrides={"tag": tag},
        ))  # fmt: skip
    top = harness_task_yaml(f"{HARNESS_DIR}/_mmlu.yaml")
    for group_yaml in [top, *(top.parent / f"_{name}.yaml" for name in _load(top)["task"])]:
        cfg = _load(group_yaml)
        cfg["group"] = _rename(cfg["group"])
        cfg["task"] = [_rename(t) for t in cfg["task"]]
        write_text(task_dir / f"{cfg['group']}.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return LocalTask(GROUP, task_dir / f"{GROUP}.yaml", data_dir / "source.json", subtasks=tuple(tasks))
