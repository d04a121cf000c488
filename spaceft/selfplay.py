"""The self-play driver: Algorithm 1 of the SPACE paper, iterated and resumable, on one process or many.

    for t in 0 .. T-1:
        generate  y'_j ~ p_θt(·|x), K per prompt               -> iter_t/synthetic.parquet
        score     log p_θt(y|x), log p_θt(y'_j|x), once          -> iter_t/opponent_logps.parquet
        train     θ ← argmin L(θ; θt) from θ = θt, E epochs      -> iter_t/model/
        evaluate  held-out NLL, task accuracy                    -> iter_t/eval.json
        θt+1 ← θ (the opponent of the next iteration is the trained model itself)

The stages, their outputs, when each applies and what each reads are one table, `spaceft.stages.TABLE`.
`run` makes a plan (the list of (stage, iteration) steps still to do) and runs each step with
`run_step`: every stage is three functions in `spaceft.stage_fns.STAGE_FNS` — `load` its inputs (every
process), `work` (every process, as the table's `ranks` says), `finish` (the main process: join the
parts, return the manifest entry). Under `torchrun` / `accelerate launch` every process takes part in
every stage; the result does not depend on the number of processes (docs/ARCHITECTURE.md, "Several
processes").

Each step is recorded in runs/NAME/manifest.json when it finishes; running the same command again
skips finished steps and resumes an unfinished one where it stopped, with any number of processes.
Re-running a stage removes, on disk too, everything derived from it (its later stages and all later
iterations); what is stale or damaged is forgotten before planning (spaceft.runstate). A config change
that would make finished work stale is refused unless `force=True`, which discards the stale work.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from spaceft.config import RunConfig
from spaceft.distributed import agree, attempt
from spaceft.runstate import StaleRunError, drop_stale_work, verify_pending_inputs
from spaceft.stage_fns import STAGE_FNS, batches, close_generator, load_generate, train_items
from spaceft.stages import BY_NAME, STAGES, TABLE, Step
from spaceft.workspace import Workspace, prepare, release_models

log = logging.getLogger(__name__)

__all__ = ["RANKS", "STAGES", "StaleRunError", "Step", "Workspace", "load_generate", "plan", "prepare", "run",
           "run_step", "train_items"]  # fmt: skip

RANKS = {s.name: s.ranks for s in TABLE}
"""What each process does in each stage (from the stage table)."""


def plan(ws: Workspace, only_stage: str | None = None, only_iteration: int | None = None) -> list[Step]:
    """The steps still to do, in order: every stage of the table that applies, iteration by iteration,
    after the start model's evaluation; or the one stage asked for."""
    cfg = ws.cfg
    if only_stage is not None:
        t = only_iteration if only_iteration is not None else 0
        if t < 0:
            return [Step("eval", "base")]
        return [Step(only_stage, t)] if BY_NAME[only_stage].applies(cfg, t) else []
    steps = [Step("eval", "base")] if BY_NAME["eval"].applies(cfg, "base") else []
    for t in range(cfg.selfplay.iterations):
        steps += [Step(s.name, t) for s in TABLE if s.applies(cfg, t)]
    return [s for s in steps if not ws.manifest.is_done(s.iteration, s.stage)]


def run_step(ws: Workspace, step: Step) -> None:
    """Run one step on every process; every process ends it together, or all raise.

    1. check its inputs and load them (every process; agreed)
    2. work (every process, as the table's `ranks` says; agreed unless the work is collective)
    3. finish on the main process (join parts, manifest entry; agreed), then every process re-reads
       the manifest
    """
    state, stage, fns, m = ws.state, BY_NAME[step.stage], STAGE_FNS[step.stage], ws.manifest
    started = time.perf_counter()
    resumed = any((ws.iter_dir(step.iteration) / name).exists() for name in stage.outputs)
    # step 1
    needs = [] if step.iteration == "base" else stage.needs(ws.cfg, int(step.iteration))
    missing = [f"{s} of iteration {i}" for i, s in needs if not m.is_done(i, s)]
    if missing:
        raise RuntimeError(f"{step} needs {', '.join(missing)}: run `spaceft run` first")
    inputs, error = attempt(fns.load, ws, step)
    agree(state, error, f"loading the inputs of {step}")
    # step 2
    if stage.collective:
        result = fns.work(ws, step, inputs)
    else:
        result, error = attempt(fns.work, ws, step, inputs)
        agree(state, error, str(step))
    # step 3
    error = None
    if state.is_main_process:
        info, error = attempt(fns.finish, ws, step, inputs, result)
        if error is None:
            m.mark_done(step.iteration, step.stage, **_timed(info, time.perf_counter() - started, resumed))
    agree(state, error, f"finishing {step}")
    if not state.is_main_process:
        m.reload()


def _timed(info: dict[str, Any], wall_s: float, resumed: bool) -> dict[str, Any]:
    """The stage's manifest entry with its wall time and, for generation, the tokens it sampled per
    second. A resumed stage (its outputs were partly there) counts only this invocation's time, says
    `resumed`, and gets no tokens/s (its rows were not all sampled in that time)."""
    info = {**info, **({"resumed": True} if resumed else {})}
    info.setdefault("wall_s", round(wall_s, 3))
    if "mean_length" in info and "tokens_per_s" not in info and not resumed:
        info["tokens_per_s"] = round(info["rows"] * info["mean_length"] / max(info["wall_s"], 1e-9), 1)
    return info


def _drop_stale_work(ws: Workspace, only_stage: str | None, only_iteration: int | None) -> None:
    """Main process: forget what is damaged, re-run or stale (spaceft.runstate), before planning."""
    verify_pending_inputs(ws.manifest, ws.cfg)
    drop_stale_work(ws.manifest, ws.cfg, only_stage, only_iteration, opponent=ws.opponent_hash,
                    composition=lambda t: batches(ws, t).composition)  # fmt: skip


def run(
    cfg: RunConfig,
    *,
    force: bool = False,
    only_stage: str | None = None,
    only_iteration: int | None = None,
) -> Workspace:
    """Run (or resume) all iterations; with `only_stage`, re-run that one stage of one iteration
    (which also invalidates everything built on it: its later stages and all later iterations)."""
    ws = prepare(
        cfg, force=force, trains=only_stage in (None, "train"), generates=only_stage in (None, "generate")
    )
    state, m = ws.state, ws.manifest
    log.info("run %s: %s, %d iteration(s), %d training pairs, %d held-out", cfg.name, cfg.train.loss,
             cfg.selfplay.iterations, len(ws.train_tok), len(ws.eval_tok))  # fmt: skip
    if cfg.train.loss.uses_synthetic and not cfg.train.loss.needs_opponent:
        log.info("%s is reference-free: no score stage%s", cfg.train.loss,
                 ", and each prompt's proto-synthetic response is its first sample of iteration 0"
                 if cfg.train.loss.uses_proto else "")  # fmt: skip
    error = None
    if state.is_main_process:
        _, error = attempt(_drop_stale_work, ws, only_stage, only_iteration)
    agree(state, error, "preparing the run")
    if not state.is_main_process:
        m.reload()
    steps = plan(ws, only_stage, only_iteration)
    ws.generations_left = sum(step.stage == "generate" for step in steps)  # a backend is kept if > 1
    try:
        for step in steps:
            log.info("%s (%s)", step, RANKS[step.stage] if state.num_processes > 1 else "one process")
            run_step(ws, step)
    finally:
        if ws.generator is not None:  # a stage failed between two generate steps
            close_generator(ws, ws.generator)
    release_models(ws)
    if only_stage is None and state.is_main_process:
        from spaceft.report import write_report

        write_report(cfg.run_dir)
    return ws
