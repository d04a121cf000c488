"""The stage graph of a self-play run, declared once: `TABLE`.

Each iteration t runs up to four stages, in the table's order; the start model is evaluated before
iteration 0 (the step ("eval", "base")). A row says what every process does in its stage, which files of
iter_t/ it writes, when it applies, which finished stages of which iterations it reads, and what makes a
finished one stale. Everything that plans, resumes, invalidates, checks or reports stages reads it: the
driver (spaceft.selfplay), done / stale / redo (spaceft.runstate), the costs and the report's timing.
Each stage's load / work / finish functions are `spaceft.stage_fns.STAGE_FNS[name]` (they need the
workspace, which sits above this module in the import graph).

Adding a stage is one row here and one entry in STAGE_FNS; tests/test_stages.py checks that every
module that lists stages, their outputs or their dependencies reads them from this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from spaceft.config import RunConfig, SelfPlayConfig
from spaceft.rundir import Manifest

Iteration = int | str
"""An iteration number, or "base": the start model, evaluated before iteration 0."""


@dataclass(frozen=True)
class Step:
    """One stage of one iteration."""

    stage: str
    iteration: Iteration

    def __str__(self) -> str:
        return f"{self.stage} of iteration {self.iteration}"


def sources(selfplay: SelfPlayConfig, t: int) -> list[int]:
    """Iterations whose synthetic responses iteration t trains on (t, and t-1 when mixing; 0 when
    resampling is off)."""
    if not selfplay.resample:
        return [0]
    return [t, t - 1] if selfplay.mix_previous and t > 0 else [t]


def synthetic_hashes(cfg: RunConfig, m: Manifest, t: int) -> dict[str, str]:
    """The hashes of the samples iteration t is scored and trained on (the score entry's `inputs`)."""
    return {str(src): (m.stage(src, "generate") or {}).get("hash", "") for src in sources(cfg.selfplay, t)}


# ----------------------------------------------------------------------------------- when it applies


def _samples(cfg: RunConfig, t: Iteration) -> bool:
    return cfg.train.loss.uses_synthetic and (t == 0 or cfg.selfplay.resample)


def _scores(cfg: RunConfig, t: Iteration) -> bool:
    return cfg.train.loss.needs_opponent


def _always(cfg: RunConfig, t: Iteration) -> bool:
    return True


def _evaluates(cfg: RunConfig, t: Iteration) -> bool:
    return cfg.eval.enabled and bool(cfg.data.eval)


# ----------------------------------------------------------------------------------- what it reads


def _opponent(t: int) -> list[tuple[int, str]]:
    return [(t - 1, "train")] if t > 0 else []  # θt: the model iteration t-1 trained


def _needs_generate(cfg: RunConfig, t: int) -> list[tuple[int, str]]:
    return _opponent(t)


def _needs_score(cfg: RunConfig, t: int) -> list[tuple[int, str]]:
    return _opponent(t) + [(src, "generate") for src in sources(cfg.selfplay, t)]


def _needs_train(cfg: RunConfig, t: int) -> list[tuple[int, str]]:
    needs = _opponent(t)
    if cfg.train.loss.uses_synthetic:  # the samples are read from their file, the scores by item
        needs += [(src, "generate") for src in sources(cfg.selfplay, t)]
    if cfg.train.loss.uses_proto and (0, "generate") not in needs:  # y0: iteration 0's first samples
        needs.append((0, "generate"))
    return needs + ([(t, "score")] if _scores(cfg, t) else [])


def _needs_eval(cfg: RunConfig, t: int) -> list[tuple[int, str]]:
    return [(t, "train")]


# ----------------------------------------------------------------------------------- what makes it stale
# A rule compares a finished stage's manifest entry with the run as it is now (`opponent`: the hash of θt's
# weights; `composition`: training's micro-batches, computed only when asked) and says why it is stale.


def _stale_generate(
    cfg: RunConfig, m: Manifest, t: int, opponent: str, composition: Callable[[], str]
) -> str | None:
    """Samples drawn by another opponent (e.g. the start model's files changed) are not samples of p_θt."""
    entry = m.stage(t, "generate")
    if entry is None or entry.get("opponent", opponent) == opponent:
        return None
    return "the opponent's weights changed since its samples were drawn; sampling again"


def _stale_score(
    cfg: RunConfig, m: Manifest, t: int, opponent: str, composition: Callable[[], str]
) -> str | None:
    """Scores of other synthetic samples (e.g. after `spaceft generate -t T`), by another opponent, or in
    other micro-batches than the untrained iteration will use are recomputed."""
    entry = m.stage(t, "score")
    if entry is None:
        return None
    if entry.get("inputs") != synthetic_hashes(cfg, m, t):
        return "synthetic samples changed since scoring; re-scoring"
    if entry.get("opponent", opponent) != opponent:
        return "the opponent's weights changed since scoring; re-scoring"
    if not m.is_done(t, "train") and entry.get("composition") != composition():
        return ("training's micro-batches changed since scoring (micro-batch size, length grouping, number "
                "of processes or data); re-scoring in the new ones")  # fmt: skip
    return None


StaleRule = Callable[[RunConfig, Manifest, int, str, Callable[[], str]], "str | None"]


@dataclass(frozen=True)
class Stage:
    name: str
    ranks: str
    """What each process does in it."""
    outputs: tuple[str, ...]
    """Files of iter_t/ it writes: re-running the stage removes them."""
    hashed: str | None
    """The output whose hash its manifest entry records, checked on read-back (None: nothing reads it)."""
    applies: Callable[[RunConfig, Iteration], bool]
    needs: Callable[[RunConfig, int], list[tuple[int, str]]]
    """The (iteration, stage) entries it reads."""
    stale: StaleRule | None = None
    """Why its finished entry is stale, or None (besides config changes: spaceft.runstate.check_resume)."""
    eval_only: bool = False
    """Decided by the model and the eval settings alone: an eval-settings change redoes only this stage, and
    nothing reads its outputs (re-running it invalidates no later iteration)."""
    collective: bool = False
    """Its work runs collectives (DDP): a failure there ends its process and the launcher stops the rest."""


TABLE = (
    Stage(
        "generate",
        ranks="every process samples its shard of the prompt batches (batch c: process c mod N; a vLLM "
        "tensor-parallel group of processes shares one shard); the main process joins the parts",
        outputs=("synthetic.parquet", "synthetic.parts"),
        hashed="synthetic.parquet",
        applies=_samples,
        needs=_needs_generate,
        stale=_stale_generate,
    ),
    Stage(
        "score",
        ranks="every process scores its shard of the item chunks; the main process joins the parts",
        outputs=("opponent_logps.parquet", "opponent_logps.parts"),
        hashed="opponent_logps.parquet",
        applies=_scores,
        needs=_needs_score,
        stale=_stale_score,
    ),
    Stage(
        "train",
        ranks="every process trains on its slice of each optimizer step (data parallel through Accelerate); "
        "the main process saves the model",
        outputs=("model", "train_state", "train_state.tmp", "train_state.old", "metrics.jsonl",
                 "train_summary.json"),
        hashed="model",
        applies=_always,
        needs=_needs_train,
        collective=True,
    ),
    Stage(
        "eval",
        ranks="every process evaluates its shard of the held-out batches, and runs lm-eval, which shards its "
        "requests across the processes itself; the main process joins them and computes the metrics",
        outputs=("eval.json", "eval_samples.jsonl", "eval_outputs.parquet", "eval_outputs.parts",
                 "lm_eval_tasks"),
        hashed=None,
        applies=_evaluates,
        needs=_needs_eval,
        eval_only=True,
    ),
)

STAGES = tuple(s.name for s in TABLE)
"""The stages of an iteration, in the order they run."""
BY_NAME = {s.name: s for s in TABLE}


def from_stage(stage: str) -> tuple[Stage, ...]:
    """`stage` and the stages after it in an iteration (what re-running it makes stale there)."""
    return TABLE[STAGES.index(stage) :]
