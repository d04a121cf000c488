"""The score stage: the opponent's log-probs of every training sequence, in training's own micro-batches.

The opponent p_θt is frozen for a whole iteration, so log p_θt(y|x) and log p_θt(y'|x) are computed
once, here, and saved to `iter_t/opponent_logps.parquet`; training never holds a second model
(DESIGN.md, step 2). Each of the iteration's micro-batches (`spaceft.microbatch.compose`) is forwarded
through `forward_batch`, the function training calls with the policy, under the same autocast and
log-prob path: at an iteration's first step, where policy and opponent are one model, every reward is
then exactly 0, in float32, bf16 autocast and pure bf16 alike. One forward per sequence per iteration
serves every epoch, since every epoch visits the same micro-batches.

A sequence log-prob is the SUM of the response tokens' log-probs; prompt tokens are masked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from spaceft.microbatch import TrainItem, forward_batch
from spaceft.rundir import ONE_PROCESS, Shard, content_hash, file_hash, merge_parts, write_parts
from spaceft.token_logps import autocast

__all__ = ["GROUPS_PER_PART", "merge_score_parts", "score_key", "with_opponent_scores", "write_score_parts"]

GROUPS_PER_PART = 8
"""Micro-batches per part of the table: the unit of resume and of sharding across processes."""


def score_key(opponent: str, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
    """What each cached score carries: the opponent's weights hash and the exact token ids, so a score
    computed by another opponent or for other tokens is never read as this one."""
    return content_hash(opponent, tuple(prompt_ids), tuple(response_ids))


def _n_parts(groups: Sequence[Sequence[int]]) -> int:
    return max(math.ceil(len(groups) / GROUPS_PER_PART), 1)


def _parts_tag(opponent: str, composition: str) -> str:
    """Names the parts: parts made for other micro-batches or by another opponent are never joined."""
    return content_hash(opponent, composition)


@torch.no_grad()
def write_score_parts(
    model: torch.nn.Module,
    items: Sequence[TrainItem],
    groups: Sequence[Sequence[int]],
    origins: Sequence[tuple[int, int]],
    out: Path,
    *,
    pad_id: int,
    device: torch.device,
    opponent: str,
    composition: str,
    shard: Shard = ONE_PROCESS,
    progress: bool = True,
    mixed_precision: str = "no",
    path: str = "auto",
    shared: bool = False,
) -> dict[str, float]:
    """Score this shard's parts of the micro-batches `groups` of `items` and write them (resumable).

    `origins[i]` is item i's (prompt index, iteration that sampled its synthetic responses), kept in the
    table for the report. `mixed_precision`, `path` and `shared` must be the training's. Returns this
    call's wall time and tokens/s (parts finished before a crash are not scored again).
    """
    tic = time.perf_counter()
    computed = 0
    n_parts = _n_parts(groups)
    mine = [g for c in shard.units(n_parts) for g in range(c * GROUPS_PER_PART, (c + 1) * GROUPS_PER_PART)]
    total = sum(len(groups[g]) for g in mine if g < len(groups))
    bar = tqdm(total=total, desc="score opponent", unit="prompt", disable=not progress)
    was_training = model.training
    model.eval()

    def make_part(c: int) -> list[dict[str, Any]]:
        nonlocal computed
        rows: list[dict[str, Any]] = []
        for grp in groups[c * GROUPS_PER_PART : (c + 1) * GROUPS_PER_PART]:
            batch = [items[i] for i in grp]
            with autocast(mixed_precision, device):
                res = forward_batch(model, batch, pad_id, device, path=path, shared=shared)
            real, syn = res["policy_real"].tolist(), res["policy_synthetic"].tolist()  # [B], [B, K]
            for b, i in enumerate(grp):
                it, (prompt_index, source) = items[i], origins[i]
                responses = [("real", 0, -1, it.real_ids, real[b])]
                responses += [("synthetic", j, source, s, syn[b][j]) for j, s in enumerate(it.synthetic_ids)]
                rows += [
                    {
                        "item": i,
                        "kind": kind,
                        "prompt_index": prompt_index,
                        "sample": j,
                        "source_iteration": src,
                        "length": len(ids),
                        "logp": lp,
                        "key": score_key(opponent, it.prompt_ids, ids),
                    }
                    for kind, j, src, ids, lp in responses
                ]
                computed += sum(len(it.prompt_ids) + len(ids) for _, _, _, ids, _ in responses)
            bar.update(len(grp))
        return rows

    try:
        tag = _parts_tag(opponent, composition)
        write_parts(out, n_parts, make_part, stage="score", tag=tag, shard=shard)
    finally:
        model.train(was_training)
        bar.close()
    wall = time.perf_counter() - tic
    return {"wall_s": round(wall, 3), "tokens_per_s": round(computed / max(wall, 1e-9), 1)}


def merge_score_parts(
    out: Path, groups: Sequence[Sequence[int]], *, opponent: str, composition: str
) -> dict[str, Any]:
    """Join the parts into `out`; returns the stage's manifest entry."""
    rows = merge_parts(out, _n_parts(groups), tag=_parts_tag(opponent, composition))
    return {"rows": len(rows), "hash": file_hash(out), "opponent": opponent, "composition": composition}


def with_opponent_scores(
    items: Sequence[TrainItem], rows: Sequence[dict[str, Any]], opponent: str, where: str
) -> list[TrainItem]:
    """`items` with the opponent's log-probs from the score table's `rows`, looked up by item and
    checked against each sequence's tokens and the opponent: a score of other tokens or of another
    opponent is an error naming `where`, never a silent reuse."""
    by_item: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}
    for r in rows:
        by_item.setdefault(int(r.get("item", -1)), {})[(r["kind"], int(r["sample"]))] = r

    def logp(i: int, kind: str, j: int, it: TrainItem, ids: tuple[int, ...]) -> float:
        r = by_item.get(i, {}).get((kind, j))
        if r is None or r.get("key") != score_key(opponent, it.prompt_ids, ids):
            what = "real response" if kind == "real" else f"sample {j}"
            raise RuntimeError(f"{where} has no score of item {i}'s {what} by this opponent for these "
                               "micro-batches: re-run the score stage")  # fmt: skip
        return float(r["logp"])

    return [
        replace(
            it,
            opponent_real=logp(i, "real", 0, it, it.real_ids),
            opponent_synthetic=tuple(logp(i, "synthetic", j, it, s) for j, s in enumerate(it.synthetic_ids)),
        )
        for i, it in enumerate(items)
    ]
