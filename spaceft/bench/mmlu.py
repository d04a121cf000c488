"""MMLU as the harness defines it, on the per-subject files of :mod:`spaceft.bench.sources`.

The harness runs MMLU as a group of 57 subject tasks, each with its own description ("The following
are multiple choice questions (with answers) about anatomy.") and its subject's 5 dev questions as
few-shot pool, tagged into four category groups (STEM, humanities, social sciences, other) that the
top group averages weighted by size, i.e. over all questions. It ships two zero-shot formulations:

* ``mmlu`` (``tasks/mmlu/default``): the question, the four choices lettered A-D and "Answer:"; the
  model is scored on the letters (the formulation of the MMLU paper and the Open LLM Leaderboard);
* ``mmlu_continuation`` (``tasks/mmlu/continuation``): "Question: ...\\nAnswer:" and the model is scored
  on each choice's *text* (the "cloze" formulation that small-model cards report, since models this
  small rarely get above chance on letters).

A single task over all 14,042 questions would lose the per-subject description and few-shot pool,
so spaceft keeps the structure and renames it: for each harness YAML it writes a local one, every
task, tag and group name starting with ``mmlu`` prefixed with ``spaceft_``:

* ``spaceft_mmlu_<subject>[...].yaml``: ``include:`` the harness's subject YAML (prompt, choices,
  metric, description), with the data served from ``<subject>.test.jsonl`` and ``<subject>.dev.jsonl``;
* the group YAMLs: the harness's with the names changed, so the aggregation (``acc`` weighted by
  size) is the harness's own.

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

VARIANTS = {"mmlu": "mmlu/default", "mmlu_continuation": "mmlu/continuation"}
"""The harness's zero-shot MMLU groups spaceft runs, by group name, with their directory under
``lm_eval/tasks``."""


def _rename(name: str) -> str:
    if not name.startswith("mmlu"):
        raise ValueError(f"unexpected name {name!r} in the harness's MMLU YAMLs")
    return "spaceft_" + name


def _load(path: Path) -> dict[str, Any]:
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        raise RuntimeError(f"{path} is not a task YAML")
    return cfg


def _variant_dir(variant: str) -> Path:
    if variant not in VARIANTS:
        raise ValueError(f"unknown MMLU variant {variant!r}; known: {', '.join(VARIANTS)}")
    return harness_task_yaml(f"{VARIANTS[variant]}/_mmlu.yaml").parent


def harness_subjects(variant: str = "mmlu") -> dict[str, Path]:
    """Each subject the installed harness's MMLU defines, with its subject YAML."""
    return {_load(p)["dataset_name"]: p for p in sorted(_variant_dir(variant).glob("mmlu_*.yaml"))}


def _renamed_group(cfg: dict[str, Any], directory: Path, out: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``cfg`` (a group, or a group defined inline in another) with its names renamed.

    Members that are groups of their own file (``_<name>.yaml`` beside the top group, as in
    ``tasks/mmlu/default``) are renamed too and added to ``out``; inline groups named without
    ``mmlu`` (``stem`` in ``tasks/mmlu/continuation``) keep their names.
    """
    cfg = dict(cfg)
    if cfg["group"].startswith("mmlu"):
        cfg["group"] = _rename(cfg["group"])
    members = []
    for member in cfg["task"]:
        if isinstance(member, dict):
            members.append(_renamed_group(member, directory, out))
            continue
        own_file = directory / f"_{member}.yaml"
        if own_file.is_file():
            group = _renamed_group(_load(own_file), directory, out)
            out[group["group"]] = group
        members.append(_rename(member))
    cfg["task"] = members
    return cfg


def write_mmlu_tasks(task_dir: Path, data_dir: Path, variant: str = "mmlu") -> LocalTask:
    """Write the local YAMLs of ``variant`` into ``task_dir``; return its top group with its subject tasks.

    ``data_dir`` holds ``<subject>.test.jsonl``, ``<subject>.dev.jsonl`` and ``source.json`` (see
    :func:`spaceft.bench.sources.convert_subjects`); its subjects must be the harness's.
    """
    subjects = harness_subjects(variant)
    have = {p.name.removesuffix(".test.jsonl") for p in data_dir.glob("*.test.jsonl")}
    if have != set(subjects):
        extra, missing = sorted(have - set(subjects)), sorted(set(subjects) - have)
        raise RuntimeError(f"{data_dir}: MMLU subjects differ from the harness's "
                           f"(missing {missing or 'none'}, unknown {extra or 'none'})")  # fmt: skip
    tasks = []
    for subject, harness_yaml in subjects.items():
        cfg = _load(harness_yaml)
        tasks.append(write_task_yaml(
            task_dir, _rename(cfg["task"]), data_dir / f"{subject}.test.jsonl", split="test",
            include=harness_yaml, fewshot_file=data_dir / f"{subject}.dev.jsonl",
            overrides={"tag": _rename(cfg["tag"])},
        ))  # fmt: skip
    groups: dict[str, dict[str, Any]] = {}
    directory = _variant_dir(variant)
    top = _renamed_group(_load(directory / "_mmlu.yaml"), directory, groups)
    groups[top["group"]] = top
    for name, cfg in groups.items():
        write_text(task_dir / f"{name}.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return LocalTask(top["group"], task_dir / f"{top['group']}.yaml", data_dir / "source.json",
                     subtasks=tuple(tasks))  # fmt: skip
