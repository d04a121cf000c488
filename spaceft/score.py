"""Teacher-forced sequence log-probabilities, and the score stage that caches the opponent's.

The opponent p_θt is frozen for a whole iteration, so log p_θt(y|x) and log p_θt(y'|x) are
computed once, here, and saved to `iter_t/opponent_logps.parquet`; training never holds a second
model (DESIGN.md, step 2). The same `sequence_logps` computes the policy's log-probs inside the
training loop, so at the first step of an iteration (policy == opponent) every reward is 0 up to
rounding: the score stage batches sequences by length and training by prompt, and differently padded
shapes change the last bits (on a tiny Llama |r| ≤ 3e-5 in float32, ≤ 2e-3 under bf16 autocast). The
first step's mean |reward| is recorded (`rewards/abs_mean`) and warned about above 1e-2 nats.

A sequence log-prob is the SUM of the response tokens' log-probs; prompt tokens are masked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from spaceft.rundir import ONE_PROCESS, Shard, content_hash, file_hash, merge_parts, write_parts
from spaceft.token_logps import chunked_token_logps, head_as_identity, output_head, selective_log_softmax

log = logging.getLogger(__name__)

__all__ = [
    "PackedBatch",
    "ScoreItem",
    "pack",
    "score_sequences",
    "score_stage",
    "selective_log_softmax",
    "sequence_logps",
]


def autocast(mixed_precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast under `train.mixed_precision=bf16`, else nothing.

    Training AND the score stage enter it, so the opponent's cached log-probs are computed exactly as
    the policy's are at the first step (rewards start at 0); the weights stay float32 (master copy).
    """
    if mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if mixed_precision != "no":
        raise ValueError(f"unknown mixed_precision {mixed_precision!r}: use 'no' or 'bf16'")
    return nullcontext()


@dataclass
class PackedBatch:
    input_ids: Tensor  # [N, L] right-padded prompt+response
    attention_mask: Tensor  # [N, L]
    response_mask: Tensor  # [N, L-1] 1 where target token L+1 is a response token

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device)
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    """Concatenate each prompt with its response, right-pad to the longest, mark response targets."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    length = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    n = len(prompts)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    response_mask = torch.zeros((n, length - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if len(r) == 0:
            raise ValueError("empty response: every response has at least its end-of-turn token")
        if len(p) == 0:  # the first response token would have no position predicting it
            raise ValueError("empty prompt: a response is scored after at least one prompt token")
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        # target position k predicts token k+1: response tokens are targets len(p)-1 .. len(seq)-2
        response_mask[i, len(p) - 1 : len(seq) - 1] = 1.0
    return PackedBatch(input_ids, attention_mask, response_mask)


def sequence_logps(
    model: torch.nn.Module, batch: PackedBatch, *, chunked: bool = True
) -> tuple[Tensor, Tensor]:
    """Summed response log-probs [N] (float32) and response lengths [N] of a packed batch.

    Only the positions from the first response target on are computed (`logits_to_keep`). With
    `chunked` (and a model whose logits are a plain linear head of its hidden states, see
    `token_logps.output_head`) the model returns hidden states and only the response tokens are
    projected to the vocabulary, a chunk at a time: no [N, L, V] tensor exists in either pass. Otherwise
    the model's logits go through `selective_log_softmax`. Models whose forward ignores
    `logits_to_keep` return all positions, which both paths handle.
    """
    length = batch.input_ids.shape[1]
    first = int(batch.response_mask.any(0).float().argmax())  # first target position with a response token
    keep = length - first  # positions first .. L-1 (the last one predicts nothing and is dropped)
    head = output_head(model, batch.input_ids, batch.attention_mask) if chunked else None
    with head_as_identity(head) if head is not None else nullcontext():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            logits_to_keep=keep,
        ).logits  # [N, keep, H] hidden states with the head swapped out, else [N, keep, V] logits
    start = length - out.shape[1]  # == first if honoured, 0 if the model returned every position
    mask = batch.response_mask[:, start:]  # [N, L-1-start]
    targets = batch.input_ids[:, start + 1 :]  # [N, L-1-start]
    if head is None:
        token_logps = selective_log_softmax(out[:, :-1], targets) * mask
    else:
        picked = mask.bool()
        hidden = out[:, :-1][picked]  # [T, H]: response positions only, no prompt or padding
        logps = chunked_token_logps(hidden, head.linear.weight, head.linear.bias, targets[picked])  # [T]
        token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(
            picked, logps
        )  # back to [N, L-1-start] so the sum runs in the same order as the logits path
    del out
    return token_logps.sum(-1), batch.response_mask.sum(-1)


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    desc: str = "score",
    progress: bool = True,
    mixed_precision: str = "no",
    chunked: bool = True,
) -> list[float]:
    """Summed log p(response | prompt) under `model` (eval mode), in input order.

    Sequences are batched in length order so padding is small; the result is put back in order.
    `mixed_precision` and `chunked` must be the training's (`train.mixed_precision`,
    `train.chunked_logps`) when these are opponent scores.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out = [0.0] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = pack([prompts[i] for i in idx], [responses[i] for i in idx], pad_id).to(device)
        with autocast(mixed_precision, device):
            logps, _ = sequence_logps(model, batch, chunked=chunked)
        for i, v in zip(idx, logps.tolist(), strict=True):
            out[i] = v
    model.train(was_training)
    return out


@dataclass(frozen=True)
class ScoreItem:
    """One response to score: `key` identifies it in opponent_logps.parquet."""

    kind: str  # "real" | "synthetic"
    prompt_index: int
    sample: int
    source_iteration: int  # iteration whose opponent generated it (-1 for real)
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.kind, self.prompt_index, self.sample, self.source_iteration)


def score_key(opponent: str, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
    """What a cached score is looked up by: the opponent's weights hash and the exact token ids, so a
    score computed by another opponent or for other tokens can never be read."""
    return content_hash(opponent, tuple(prompt_ids), tuple(response_ids))


def score_stage(
    model: torch.nn.Module,
    items: Sequence[ScoreItem],
    out: Path,
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    opponent: str = "",
    mixed_precision: str = "no",
    chunked: bool = True,
) -> dict[str, Any]:
    """One process: score every item with the frozen opponent and write `out` (resumable in parts).

    Returns the manifest entry: rows, output hash, opponent, and the wall time and tokens (prompt +
    response) per second of the parts computed by this call.
    """
    speed = write_score_parts(model, items, out, pad_id=pad_id, batch_size=batch_size, device=device,
                              opponent=opponent, progress=progress, mixed_precision=mixed_precision,
                              chunked=chunked)  # fmt: skip
    return {**merge_score_parts(out, items, batch_size=batch_size, opponent=opponent), **speed}


def _chunk_size(batch_size: int) -> int:
    return max(batch_size * 8, 1)


def parts_tag(items: Sequence[ScoreItem], opponent: str) -> str:
    """Names this item list's parts: parts made for other items or another opponent are never joined."""
    return content_hash(opponent, [(it.key, it.prompt_ids, it.response_ids) for it in items])


def write_score_parts(
    model: torch.nn.Module,
    items: Sequence[ScoreItem],
    out: Path,
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    opponent: str = "",
    shard: Shard = ONE_PROCESS,
    progress: bool = True,
    mixed_precision: str = "no",
    chunked: bool = True,
) -> dict[str, float]:
    """Score this shard's chunks of `items` and write their parts of `out` (resumable).

    `mixed_precision` must be the training's (`train.mixed_precision`): rewards then start at 0.
    Returns this call's wall time and tokens/s (parts finished before a crash are not re-scored).
    """
    tic = time.perf_counter()
    computed = [0]
    chunk = _chunk_size(batch_size)
    n_chunks = max((len(items) + chunk - 1) // chunk, 1)
    bar = tqdm(total=sum(len(items[c * chunk : (c + 1) * chunk]) for c in shard.units(n_chunks)),
               desc="score opponent", disable=not progress)  # fmt: skip

    def make_chunk(c: int) -> list[dict[str, Any]]:
        part = items[c * chunk : (c + 1) * chunk]
        logps = score_sequences(
            model,
            [it.prompt_ids for it in part],
            [it.response_ids for it in part],
            pad_id=pad_id,
            batch_size=batch_size,
            device=device,
            progress=False,
            mixed_precision=mixed_precision,
            chunked=chunked,
        )
        bar.update(len(part))
        computed[0] += sum(len(it.prompt_ids) + len(it.response_ids) for it in part)
        return [
            {
                "kind": it.kind,
                "prompt_index": it.prompt_index,
                "sample": it.sample,
                "source_iteration": it.source_iteration,
                "length": len(it.response_ids),
                "logp": lp,
                "key": score_key(opponent, it.prompt_ids, it.response_ids),
            }
            for it, lp in zip(part, logps, strict=True)
        ]

    write_parts(out, n_chunks, make_chunk, stage="score", tag=parts_tag(items, opponent), shard=shard)
    bar.close()
    wall = time.perf_counter() - tic
    return {"wall_s": round(wall, 3), "tokens_per_s": round(computed[0] / max(wall, 1e-9), 1)}


def merge_score_parts(
    out: Path, items: Sequence[ScoreItem], *, batch_size: int, opponent: str = ""
) -> dict[str, Any]:
    """Join the parts into `out`; returns the stage's manifest entry."""
    chunk = _chunk_size(batch_size)
    n_chunks = max((len(items) + chunk - 1) // chunk, 1)
    rows = merge_parts(out, n_chunks, tag=parts_tag(items, opponent))
    return {"rows": len(rows), "hash": file_hash(out), "opponent": opponent}


def logps_by_key(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int, int], float]:
    return {(r["kind"], r["prompt_index"], r["sample"], r["source_iteration"]): r["logp"] for r in rows}


def logps_by_content(rows: list[dict[str, Any]]) -> dict[str, float]:
    """score_key -> log-prob, for rows written with a `key` column."""
    return {r["key"]: r["logp"] for r in rows if "key" in r}
