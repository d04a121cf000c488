"""How often one process indexes lm-eval's task files, and what it costs.

    python benchmarks/lmeval_index.py --evaluations 3

Runs what a run with harness tasks given by name does before and between its harness calls: preflight's
check of the names (`harness:gsm8k`, `harness:hellaswag`), then `auto`'s output-type lookup once per
evaluation, counting the harness `TaskManager`s built and the wall time. Each build indexes the installed
harness's ~15,000 task YAMLs (seconds); spaceft builds the default one once per process
(`lmeval.harness_tasks`), so the count is 1 whatever the number of evaluations.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evaluations", type=int, default=3)
    a = p.parse_args()
    import lm_eval.tasks

    from spaceft import lmeval, preflight

    builds = [0]
    real = lm_eval.tasks.TaskManager

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            builds[0] += 1
            super().__init__(*args, **kwargs)

    lm_eval.tasks.TaskManager = Counting
    start = time.perf_counter()
    preflight.check_lm_eval_tasks(["harness:gsm8k", "harness:hellaswag"])
    for _ in range(a.evaluations):
        lmeval.harness_index(["gsm8k", "hellaswag"], "auto")
    print(f"TaskManager builds: {builds[0]}, {time.perf_counter() - start:.1f} s "
          f"(preflight and {a.evaluations} evaluations' lookups)")  # fmt: skip


if __name__ == "__main__":
    main()
