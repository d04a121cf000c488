"""Shared-prompt rows: each prompt is forwarded once and all of its responses attend to it.

A micro-batch of B prompts with a real, K synthetic (and, for T-SPIN, a proto-synthetic) response each
is, unshared, B·(1+K(+1)) rows of prompt + response: every prompt runs through the model 1+K(+1) times,
although its hidden states are the same every time (attention is causal: a prompt token never sees
what follows it). Here a micro-batch is B rows, one per prompt:

    [ prompt | real | synthetic 1 | … | synthetic K | proto ]   right-padded to the longest row

with a tree-shaped attention mask and restarting positions:

* a prompt token attends causally within the prompt;
* a response token attends to the whole prompt and causally within its own response, never to the
  other responses of the row;
* position ids run 0 … p−1 over the prompt and restart at p for every response, so each response
  sees exactly the positions and keys it has after its prompt in an unshared row;
* the first token of every response is predicted by the prompt's last hidden state (position p−1),
  each later token by the one before it in its own response.

So every response token's log-prob is mathematically the one of the unshared row; only the shapes of
the GEMMs differ (float32: equal within 1e-5, values and gradients, tests/test_shared_prompt.py), so
scores from one path are never read by the other (`microbatch.composition_tag`). The gradient of the
prompt's activations is the sum over its responses, as it is when the rows are separate.

Why a tree mask and not the prompt's KV cache expanded over its responses: the mask is one ordinary
forward, so everything that wraps a forward works unchanged: activation checkpointing (transformers
drops the cache inside a checkpointed layer, and its recompute in backward would append to the cache a
second time), DDP (one forward, one backward per micro-batch), FSDP and ZeRO-3 gathers, peft. The cost
is attention over the whole row, masked: (p + ΣR)² per row instead of Σ(p+R)², small beside the
linear layers at these lengths (the rows are a few hundred to a few thousand tokens).

Attention kernels: the mask is a 4-D tensor, which transformers passes to the attention function as
is: a boolean mask for SDPA (on a GPU that is SDPA's memory-efficient kernel, which takes arbitrary
masks; SDPA's flash kernel takes none), an additive float mask for eager attention. Flash-attention
(2/3) cannot express a tree mask (it takes causal segments only), so shared prompts need `sdpa` or
`eager`. A sliding window that would bind (a row longer than the model's window) would not be applied
to a custom mask either, so that case is refused; below the window the two paths are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spaceft.token_logps import (
    chunked_token_logps,
    head_as_identity,
    output_head,
    resolve_path,
    selective_log_softmax,
)

TREE_KERNELS = ("sdpa", "eager")
"""Attention implementations that take a custom 4-D mask (module docstring)."""


@dataclass
class TreeBatch:
    """B rows of prompt + its responses, and where each response's targets and predictors sit."""

    input_ids: Tensor  # [B, L] right-padded
    position_ids: Tensor  # [B, L] restarting at the prompt's length for every response; 0 on padding
    segments: Tensor  # [B, L] 0 prompt, s+1 the row's s-th response, -1 padding
    rows: Tensor  # [N] the row of each response, in the order given to `pack_tree`
    predictors: Tensor  # [N, R] position predicting each response token (the prompt's last for the first)
    targets: Tensor  # [N, R] position of each response token
    response_mask: Tensor  # [N, R] 1 on a response's tokens, 0 past its end (R: the longest response)

    def to(self, device: torch.device) -> TreeBatch:
        return TreeBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def num_tokens(self) -> int:
        """Tokens forwarded (padding excluded): each prompt once, each response once."""
        return int((self.segments >= 0).sum())


def pack_tree(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], owners: Sequence[int], pad_id: int
) -> TreeBatch:
    """One row per prompt holding the prompt, then its responses in the order they appear in
    `responses` (`owners[n]`: the index in `prompts` of response n's prompt); right-padded.

    The returned per-response tensors keep the order of `responses`, so the log-probs line up with those
    of `pack(prompts[owners], responses)`.
    """
    if len(responses) != len(owners):
        raise ValueError(f"{len(responses)} responses but {len(owners)} owners")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: a response is scored after at least one prompt token")
    if any(len(r) == 0 for r in responses):
        raise ValueError("empty response: every response has at least its end-of-turn token")
    ends = [len(p) for p in prompts]  # where each row's next response starts
    starts = []
    for r, o in zip(responses, owners, strict=True):
        starts.append(ends[o])
        ends[o] += len(r)
    b, length, n = len(prompts), max(ends), len(responses)
    longest = max((len(r) for r in responses), default=1)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    segments = torch.full((b, length), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        position_ids[i, : len(p)] = torch.arange(len(p))
        segments[i, : len(p)] = 0
    predictors = torch.zeros((n, longest), dtype=torch.long)
    targets = torch.zeros((n, longest), dtype=torch.long)
    response_mask = torch.zeros((n, longest), dtype=torch.float32)
    for s, (r, o, q) in enumerate(zip(responses, owners, starts, strict=True)):
        p = len(prompts[o])
        input_ids[o, q : q + len(r)] = torch.tensor(r, dtype=torch.long)
        position_ids[o, q : q + len(r)] = torch.arange(p, p + len(r))
        segments[o, q : q + len(r)] = s + 1  # unique per response: rows never share a segment id
        targets[s, : len(r)] = torch.arange(q, q + len(r))
        predictors[s, : len(r)] = torch.arange(q - 1, q + len(r) - 1)
        predictors[s, 0] = p - 1  # the prompt's last token predicts every response's first
        response_mask[s, : len(r)] = 1.0
    rows = torch.tensor(list(owners), dtype=torch.long)
    return TreeBatch(input_ids, position_ids, segments, rows, predictors, targets, response_mask)


def tree_mask(segments: Tensor) -> Tensor:
    """[B, 1, L, L] boolean: query q sees key k iff k ≤ q and k is in the prompt or in q's own response.

    A padding position sees itself only, so no softmax row is empty (SDPA would give NaN there, and
    its gradient NaN everywhere).
    """
    length = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]  # [B, L, 1], [B, 1, L]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    visible = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    eye = torch.eye(length, dtype=torch.bool, device=segments.device)
    return (visible | ((q < 0) & eye))[:, None]


def _attn_implementation(model: torch.nn.Module) -> str | None:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return getattr(getattr(inner, "config", None), "_attn_implementation", None)


def _check_window(model: torch.nn.Module, longest: int) -> None:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    config = getattr(inner, "config", None)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window and longest > window:
        raise ValueError(
            f"a prompt + response of {longest} tokens is longer than the model's sliding window ({window}), "
            "which a shared-prompt mask does not apply: set train.shared_prompt=false"
        )


def attention_mask_for(model: torch.nn.Module, segments: Tensor) -> Tensor:
    """The 4-D mask in the form `model`'s attention takes: boolean for SDPA, additive for eager."""
    kernel = _attn_implementation(model)
    if kernel not in TREE_KERNELS:
        raise ValueError(
            f"shared-prompt batches need attention that takes a custom mask ({', '.join(TREE_KERNELS)}); "
            f"the model uses {kernel!r}: set model.attn_implementation=sdpa or train.shared_prompt=false"
        )
    mask = tree_mask(segments)
    if kernel == "sdpa":
        return mask
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, torch.finfo(dtype).min)


def tree_logps(model: torch.nn.Module, batch: TreeBatch, *, path: str = "auto") -> tuple[Tensor, Tensor]:
    """Summed response log-probs [N] (float32) and response lengths [N] of a shared-prompt batch: the
    values of `token_logps.sequence_logps` on the unshared rows, from one forward of B rows.

    The log-prob paths are `sequence_logps`'s (the float32 head, chunked or on all logits, "auto"
    choosing by `token_logps.choose_path`, or the model's own logits), applied to each response token's
    predictor position gathered from the rows.
    """
    length = batch.input_ids.shape[1]
    _check_window(model, int((batch.position_ids.max() + 1).item()) if batch.position_ids.numel() else 0)
    valid = (batch.segments >= 0).long()
    head = output_head(model, batch.input_ids, valid)  # checks row 0's first tokens: a plain causal prefix
    keep = length - int(batch.predictors[:, 0].min())  # nothing before the earliest predictor is needed
    with head_as_identity(head) if head is not None else nullcontext():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=attention_mask_for(model, batch.segments),
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=keep,
        ).logits  # [B, keep, H] hidden states with the head swapped out, else [B, keep, V] logits
    start = length - out.shape[1]  # == length - keep if honoured, 0 if every position came back
    # past a response's end the indices are 0, below `start`: clamped to any kept position, masked out
    gathered = out[batch.rows[:, None], (batch.predictors - start).clamp_min(0)]  # [N, R, H or V]
    targets = batch.input_ids[batch.rows[:, None], batch.targets]  # [N, R]
    mask = batch.response_mask
    if head is None:
        token_logps = selective_log_softmax(gathered, targets) * mask
    elif resolve_path(path, head, out.device, mask.numel()) == "chunked":
        picked = mask.bool()
        w, b = head.linear.weight, head.linear.bias
        logps = chunked_token_logps(gathered[picked], w, b, targets[picked], dtype=torch.float32)  # [T]
        token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(
            picked, logps
        )
    else:
        w, b = head.linear.weight.float(), None if head.linear.bias is None else head.linear.bias.float()
        with torch.autocast(out.device.type, enabled=False):
            logits = F.linear(gathered.float(), w, b)  # [N, R, V] float32
        token_logps = selective_log_softmax(logits, targets) * mask
    del out, gathered
    return token_logps.sum(-1), mask.sum(-1)
