"""One iteration's micro-batches, fixed once and shared by the score stage and training.

At an iteration's first step the policy IS the opponent, so every reward r = log p_θ − log p_θt must be
exactly 0. It is only if both log-probs come from the same computation: the same rows packed together,
in the same order, with the same padding, autocast and log-prob path. Other batches change the GEMM
shapes and masks, hence the last bits of every hidden state, and under bf16 those bits flip the
rounding of logits whose steps are tenths of a nat: a random offset on every cached score that stays
for the whole iteration. So the micro-batches are a fixed partition of the iteration's items into
groups:

1. the items are permuted by a seeded generator (seed, iteration);
2. with `train.group_by_length`, each window of one optimizer step's worth of items is sorted by the
   length its packed rows will have (ties keep the seeded order), so a group pads little;
3. the permutation is cut into groups of `group_size` items.

The score stage forwards each group once (`forward_batch`, as training does) and caches its log-probs;
every epoch visits every group once, in its own seeded order (`step_groups`), and an optimizer step
takes the next `global_batch_size / group_size` groups. So one scoring pass serves every epoch, and a
group's opponent scores are bit-for-bit what the policy computes for it at the first step.

What changes the groups (data, seed, micro-batch size, global batch size, length grouping, the number
of processes when the global batch is smaller than a micro-batch per process) changes
`composition_tag`; the score stage records it and scores made for another composition are recomputed,
never read.

Several processes: the groups of a step are dealt round-robin. When a step has fewer groups than it
takes to give every process as many micro-batches as the busiest (an epoch's last step), the short
processes run a stand-in: a copy of a group of the step whose loss is multiplied by 0. DDP's
all-reduce, FSDP's gathers and DeepSpeed's accumulation then see the same number of micro-batches on
every process, and no prompt is ever left out of an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spaceft.config import RunConfig
from spaceft.rundir import content_hash
from spaceft.shared_prompt import pack_tree, tree_logps
from spaceft.token_logps import AUTO_RULE, pack, sequence_logps


@dataclass(frozen=True)
class TrainItem:
    """One prompt with its real response, K synthetic responses, the opponent's log-probs and, for
    T-SPIN, the proto-synthetic response drawn once from the start model."""

    prompt_ids: tuple[int, ...]
    real_ids: tuple[int, ...]
    synthetic_ids: tuple[tuple[int, ...], ...]  # K responses (empty for SFT)
    opponent_real: float = 0.0
    opponent_synthetic: tuple[float, ...] = ()
    proto_ids: tuple[int, ...] = ()  # y0 ~ p_θ0 (empty: the loss uses none)


def packed_length(item: TrainItem, *, shared: bool = False) -> int:
    """Tokens of the longest row this prompt adds to a packed micro-batch: its longest prompt + response,
    or with `shared` its one row of the prompt and every response."""
    responses = [item.real_ids, *item.synthetic_ids, item.proto_ids]
    lengths = [len(r) for r in responses]
    return len(item.prompt_ids) + (sum(lengths) if shared else max(lengths))


def step_size(cfg: RunConfig, n: int) -> int:
    """Prompts per optimizer step: the global batch, clamped to the data size."""
    return max(min(cfg.train.global_batch_size, n), 1)


def group_size(cfg: RunConfig, n: int, world: int) -> int:
    """Prompts per micro-batch: `train.micro_batch_size`, or fewer when a step holds fewer than that
    per process (so no process idles while another runs the step's only micro-batch)."""
    return max(min(cfg.train.micro_batch_size, math.ceil(step_size(cfg, n) / world)), 1)


def compose(items: Sequence[TrainItem], cfg: RunConfig, iteration: int, world: int) -> list[tuple[int, ...]]:
    """The iteration's micro-batches: item indices per group, in packing order (module docstring)."""
    n = len(items)
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + iteration * 1009 + 7)
    order = torch.randperm(n, generator=g).tolist()
    if cfg.train.group_by_length:
        window, shared = step_size(cfg, n), cfg.train.shared_prompt
        # sorted() is stable: ties keep the seeded order
        order = [
            i
            for w in range(0, n, window)
            for i in sorted(order[w : w + window], key=lambda i: packed_length(items[i], shared=shared))
        ]
    size = group_size(cfg, n, world)
    return [tuple(order[s : s + size]) for s in range(0, n, size)]


def step_groups(groups: Sequence[Sequence[int]], cfg: RunConfig, iteration: int) -> list[list[int]]:
    """Group indices of every optimizer step of the iteration, all epochs, in order: each epoch visits
    every group once in an order seeded by (seed, iteration, epoch)."""
    n = sum(len(grp) for grp in groups)
    per_step = math.ceil(step_size(cfg, n) / max(len(groups[0]), 1)) if groups else 1
    steps = []
    for epoch in range(cfg.train.epochs):
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + iteration * 1009 + epoch)
        order = torch.randperm(len(groups), generator=g).tolist()
        steps += [order[s : s + per_step] for s in range(0, len(order), per_step)]
    return steps


def rank_groups(step: Sequence[int], rank: int, world: int) -> list[tuple[int, bool]]:
    """This process's micro-batches of one step: (group index, counts). Groups are dealt round-robin;
    a process with fewer than the busiest runs stand-ins (`counts` False: the loss is multiplied by 0)."""
    mine = [(grp, True) for grp in step[rank::world]]
    busiest = math.ceil(len(step) / world)
    return mine + [(step[rank % len(step)], False)] * (busiest - len(mine))


def composition_tag(groups: Sequence[Sequence[int]], items: Sequence[TrainItem], cfg: RunConfig) -> str:
    """What the cached opponent scores were computed for: the groups, the tokens in them, and every
    setting of the forward pass (precision, log-prob path, attention)."""
    m, t = cfg.model, cfg.train
    # the configured path, not the one taken: "auto" decides per micro-batch from what is hashed here
    # and its rule's name. An explicit path enters as the boolean it replaced, so those runs' tags stay
    path = {"chunked": True, "logits": False, "auto": AUTO_RULE}[t.logps_path]
    settings = (t.mixed_precision, path, m.dtype, m.attn_implementation)
    if t.shared_prompt:  # appended only when on: the tags of unshared runs stay as they were
        settings += ("shared_prompt",)
    # proto responses only where items carry them: the tags of losses without them stay as they were
    rows = ((it.prompt_ids, it.real_ids, it.synthetic_ids) + ((it.proto_ids,) if it.proto_ids else ())
            for it in items)
    tokens = content_hash(*rows)
    return content_hash(settings, tokens, [tuple(grp) for grp in groups])


def forward_batch(
    model: torch.nn.Module,
    items: Sequence[TrainItem],
    pad_id: int,
    device: torch.device,
    *,
    path: str = "auto",
    shared: bool = False,
) -> dict[str, torch.Tensor]:
    """Log-probs of a micro-batch under `model`: B real + B·K synthetic (+ B proto-synthetic, when the
    items carry them) sequences in one forward; with `shared` (`train.shared_prompt`) as B rows, each
    prompt forwarded once with its responses attending to it (`spaceft.shared_prompt`).

    Returns policy_real [B], policy_synthetic [B, K], real_lengths [B], synthetic_lengths [B, K],
    opponent_real [B], opponent_synthetic [B, K] (from the items), the number of non-pad tokens and,
    with proto responses, policy_proto [B] and proto_lengths [B].
    The score stage calls it with the opponent, training with the policy: the same rows, the same packing,
    and `path` (`train.logps_path`; "auto" decides from the batch's shape) the same head path.
    """
    b = len(items)
    k = len(items[0].synthetic_ids)
    if any(len(it.synthetic_ids) != k for it in items):
        raise ValueError("every prompt in a batch needs the same number K of synthetic responses")
    proto = bool(items[0].proto_ids)
    if any(bool(it.proto_ids) != proto for it in items):
        raise ValueError("either every prompt in a batch has a proto-synthetic response or none has")
    # step 1: pack [B real ; B*K synthetic ; B proto] sequences (prompt + response), right-padded;
    # shared: one row per prompt, its responses in that order after it
    owners = list(range(b)) + [i for i in range(b) for _ in range(k)] + (list(range(b)) if proto else [])
    responses = [it.real_ids for it in items] + [s for it in items for s in it.synthetic_ids]
    responses += [it.proto_ids for it in items] if proto else []
    prompts = [it.prompt_ids for it in items]
    if shared:
        tree = pack_tree(prompts, responses, owners, pad_id).to(device)
        num_tokens = tree.num_tokens
        # step 2: one forward; summed response log-probs [B + B*K (+ B)]
        logps, lengths = tree_logps(model, tree, path=path)
    else:
        batch = pack([prompts[o] for o in owners], responses, pad_id).to(device)
        num_tokens = batch.num_tokens
        logps, lengths = sequence_logps(model, batch, path=path)  # step 2, unshared
    end = b + b * k  # where the proto rows start
    extra = {"policy_proto": logps[end:], "proto_lengths": lengths[end:]} if proto else {}  # [B], [B]
    return {
        "policy_real": logps[:b],  # [B]
        "policy_synthetic": logps[b:end].view(b, k),  # [B, K]
        "real_lengths": lengths[:b],
        "synthetic_lengths": lengths[b:end].view(b, k),
        **extra,
        "opponent_real": torch.tensor([it.opponent_real for it in items], device=device),
        "opponent_synthetic": torch.tensor(  # items not scored yet (the score stage's) carry none: 0
            [list(it.opponent_synthetic) or [0.0] * k for it in items], device=device
        ).view(b, k),
        "num_tokens": torch.tensor(num_tokens, device=device),  # forwarded, padding excluded
    }
