"""Per-token log-probs log p(y_k | y_<k) without materialising [N, L, V] logits.

Two kernels, both giving float32 log-probs of chosen tokens:

* `selective_log_softmax(logits, index)` — from logits that a model already returned. It loops over
  `logits.unbind(0)`: indexing `logits[row]` instead would make autograd zero-fill a full-size
  [N, L, V] gradient for every row in backward and sum them (13.5 % of a training step in
  the 2026-11-28 profile, docs/PERFORMANCE.md).
* `chunked_token_logps(hidden, weight, bias, targets)` — from the final hidden states: the
  vocabulary projection and the log-softmax run a chunk of tokens at a time and are recomputed in
  backward, so neither pass ever holds more than [chunk, V] logits. Peak memory no longer grows with
  N·L·V; cost is one extra lm-head matmul in backward.

`output_head(model)` decides whether a model's logits are exactly `F.linear(hidden, W, b)` of the
hidden states it would feed its output layer (true for Llama/Qwen/Mistral/SmolLM, tied or not; a
linear logit scale is fine too), checked once per model on a real forward; models with a non-linear
logit transform (Gemma-2's soft-capping), a LoRA-wrapped head, or sharded weights (FSDP, ZeRO-3) get
the logits path instead.

On top of the kernels: `pack` (prompt + response rows and their response mask), `sequence_logps` (a
packed batch's summed response log-probs) and `score_sequences` (many sequences, batched by length).
The score stage and training both compute log-probs through `sequence_logps`, so the opponent's cached
scores and the policy's first-step log-probs come from the same code; `spaceft.microbatch` makes them
come from the same batches too.

Precision: the vocabulary projection and the log-softmax run in float32 whatever the model's dtype or
autocast, for every model whose head `output_head` finds. Under bf16 the logits of a trained model lie
around 8-32, where bf16's steps are 0.06-0.125 nats: a last-bit difference in a hidden state would move
a token's log-prob by that much. The float32 head costs one V x H matmul per token in float32 (2-4 % of
a 7B model's FLOPs; docs/PERFORMANCE.md measures it on CPU). Models whose head is not found (soft-capped
logits, a LoRA-wrapped or sharded head) keep their own logits, up-cast before the log-softmax.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# [chunk, V] float32 logits per chunk: 2**23 elements is 32 MiB (a chunk of 170 tokens at V=49,152,
# 64 at V=128k); the softmax and its gradient add about two more of these in backward.
CHUNK_ELEMENTS = 2**23
VERIFY_TOKENS = 16  # length of the one-off check that a model's logits are its head of its hidden states


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log_softmax(logits, -1).gather(-1, index) without a float32 [N, L, V] copy.

    logits [N, L, V] (any float dtype), index [N, L] -> [N, L] float32.
    One sequence at a time, so the temporary is [L, V]; low-precision logits are up-cast row by row
    because log_softmax in bfloat16 loses ~2 digits.
    """
    rows = []
    for row_logits, row_index in zip(logits.unbind(0), index.unbind(0), strict=True):  # [L, V], [L]
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)  # [L]
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    if not rows:
        return torch.empty(index.shape, dtype=torch.float32, device=logits.device)
    return torch.stack(rows)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) would run in here: autocast's if active, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weightᵀ + bias)[t, targets[t]] chunk by chunk, recomputed in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # [T, H]
        weight: Tensor,  # [V, H]
        bias: Tensor | None,  # [V]
        targets: Tensor,  # [T]
        chunk: int,
        dtype: torch.dtype,
    ) -> Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [T]
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                logits = F.linear(hidden[s : s + chunk].to(dtype), w, b).float()  # [c, V]
                picked = logits.gather(-1, targets[s : s + chunk, None])[:, 0]
                out[s : s + chunk] = picked - torch.logsumexp(logits, -1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)  # [c, H]
                g = grad_out[s : s + chunk, None].float()  # [c, 1]
                probs = torch.softmax(F.linear(h, w, b).float(), -1)  # [c, V]
                # d logp_t / d logits = onehot(target) - softmax
                grad_logits = (-g * probs).scatter_add_(-1, targets[s : s + chunk, None], g).to(dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = (grad_logits @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (grad_logits.t() @ h).float()
                if grad_b is not None:
                    grad_b += grad_logits.float().sum(0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def chunked_token_logps(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    chunk: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """log_softmax(F.linear(hidden, weight, bias).float(), -1).gather(-1, targets) in chunks.

    hidden [T, H], weight [V, H], bias [V] or None, targets [T] -> [T] float32. The projection runs in
    `dtype` (None: the dtype F.linear would use here, autocast's if active). Equal (values and
    gradients) to that naive one-liner in the same dtype; holds at most [chunk, V] logits.
    """
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    dtype = dtype or _compute_dtype(hidden, weight)
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk, dtype)


# ------------------------------------------------------------------------------- the model's output head


@dataclass(frozen=True)
class OutputHead:
    """The plain linear output layer of a model and where it sits (to swap it out for a forward)."""

    parent: torch.nn.Module
    name: str
    linear: torch.nn.Linear


_VERIFIED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
"""Whether each model's head passed the check. A bool, not the OutputHead: that holds the model's own
modules, so as a value it would keep its key alive and no checked model would ever be freed."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module a DDP wrapper holds; None for wrappers that shard weights (FSDP, DeepSpeed)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if any(k in type(model).__name__ for k in ("FullyShardedDataParallel", "DeepSpeedEngine")):
        return None
    return model


def _find_head(model: torch.nn.Module) -> OutputHead | None:
    inner = _unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if inner is None or type(head) is not torch.nn.Linear:  # LoRA-wrapped heads are not plain Linear
        return None
    w = head.weight
    if type(w) is not torch.nn.Parameter or hasattr(w, "ds_id") or w.dim() != 2 or w.numel() == 0:
        return None  # DTensor (FSDP2) or ZeRO-3 partitioned parameter
    for name, module in inner.named_modules():
        if module is head and name:
            parent_name, _, attr = name.rpartition(".")
            return OutputHead(inner.get_submodule(parent_name), attr, head)
    return None


@contextmanager
def head_as_identity(head: OutputHead) -> Iterator[None]:
    """Inside the block the model returns its final hidden states in place of logits."""
    setattr(head.parent, head.name, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(head.parent, head.name, head.linear)


def output_head(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> OutputHead | None:
    """The model's output head if its logits are exactly `head(hidden)`, else None (logits path).

    Checked once per model: one sequence's last-position logits from a normal forward against the head
    applied to the hidden states returned with the head swapped out. This catches soft-capping and any
    other non-linear logit transform, and forwards that bypass the head module.
    """
    if model in _VERIFIED:
        return _find_head(model) if _VERIFIED[model] else None
    head = _find_head(model)
    if head is not None:
        ids, mask = input_ids[:1, :VERIFY_TOKENS], attention_mask[:1, :VERIFY_TOKENS]  # cheap: one short row
        with torch.no_grad():
            real = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0, -1].float()  # [V]
            with head_as_identity(head):
                hidden = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0, -1]
            if hidden.shape[-1] != head.linear.in_features:
                ok = False
            else:
                mine = head.linear(hidden.to(head.linear.weight.dtype)).float()
                tol = 1e-3 if head.linear.weight.dtype == torch.float32 else 3e-2
                ok = mine.shape == real.shape and torch.allclose(
                    mine, real, rtol=tol, atol=tol * real.abs().max()
                )
        if not ok:
            log.info("%s: logits are not a linear map of the hidden states; using the full-logits path",
                     type(model).__name__)  # fmt: skip
            head = None
    _VERIFIED[model] = head is not None
    return head


# ------------------------------------------------------------------------------ which path, per batch

LOGPS_PATHS = ("auto", "chunked", "logits")
"""`train.logps_path`'s choices: "auto" is `choose_path`'s pick per micro-batch."""
LOGITS_PATH_MAX_BYTES = 2**28
"""`choose_path`'s limit on the float32 logits (and their gradient) the logits path may hold: 256 MiB."""
AUTO_RULE = "auto/2"
"""Names `choose_path`'s rule in the score stage's composition tag: change it with the rule, so that
scores cached under another rule (another path for some micro-batch) are re-scored, never read."""


def choose_path(vocab: int, positions: int, device: str) -> str:
    """The faster head path, "chunked" or "logits", for `positions` × `vocab` float32 logits.

    A pure function of what the score stage and training share for a micro-batch (its shape, the
    model's vocabulary and the device type): never of free memory or timing, because
    both passes must take the same path for rewards to start at exactly 0.

    Both paths run the head and the log-softmax in float32 in every precision, so on a CPU the rule
    is one for all precisions:
    * the logits path while the float32 logits and their gradient, 2 · 4 B · positions · vocab, stay
      within `LOGITS_PATH_MAX_BYTES` (256 MiB), the chunked one above. Measured on a 2-core Intel Xeon
      (AMX-bf16) CPU (`benchmarks/logps_memory.py --sweep`, a 2-layer width-256 Llama, 8 rows of 16-256
      response tokens, V = 49,152 and 128,256; docs/PERFORMANCE.md "Which path"): in float32 the logits
      path was the faster from 512 positions on (chunked took 1.2-1.3x its time at V = 49k), since
      chunking recomputes the head in backward; at 192 MiB of logits its peak RSS equalled the chunked
      path's, at 501-768 MiB it was 0.5-0.7 GB above, at 2 GiB 1.8 GB. On SmolLM2-135M under bf16
      autocast at ~600 positions (239 MB) the head's matrix products took 0.93 s on the logits path and
      1.44-1.49 s on the chunked one per 2 training steps (`benchmarks/profile_train.py --precision amp
      --shared-prompt --vocab-share --logps-path ...`).
    * other devices: chunked; not measured there, and its memory does not grow with the vocabulary.
    """
    if device != "cpu":
        return "chunked"
    return "logits" if 2 * 4 * positions * vocab <= LOGITS_PATH_MAX_BYTES else "chunked"


def resolve_path(path: str, head: OutputHead, device: torch.device, positions: int) -> str:
    """`path` ("chunked" or "logits"), or for "auto" `choose_path` of this forward; `positions` is what
    the logits path would project."""
    if path not in LOGPS_PATHS:
        raise ValueError(f"unknown log-prob path {path!r}: use one of {', '.join(LOGPS_PATHS)}")
    if path != "auto":
        return path
    return choose_path(head.linear.out_features, positions, device.type)


# ------------------------------------------------------------------------- sequences of a packed batch


def autocast(mixed_precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast under `train.mixed_precision=bf16`, else nothing (the weights stay float32).

    Training, the score stage and generation all enter it, so the opponent's cached log-probs are
    computed exactly as the policy's are at an iteration's first step.
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
    model: torch.nn.Module, batch: PackedBatch, *, path: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Summed response log-probs [N] (float32) and response lengths [N] of a packed batch.

    Only the positions from the first response target on are computed (`logits_to_keep`). When the
    model's logits are a plain linear head of its hidden states (`output_head`) the model returns the
    hidden states and the head runs here, in float32 (module docstring): on the "chunked" path on the
    response tokens only, a chunk at a time, so no [N, L, V] tensor exists in either pass; on the
    "logits" path on every kept position at once (faster on a CPU while small, more memory);
    "auto" picks one per batch (`choose_path`). Other models' logits go through
    `selective_log_softmax`. Models whose forward ignores `logits_to_keep` return all positions, which
    every path handles.
    """
    length = batch.input_ids.shape[1]
    first = int(batch.response_mask.any(0).float().argmax())  # first target position with a response token
    keep = length - first  # positions first .. L-1 (the last one predicts nothing and is dropped)
    head = output_head(model, batch.input_ids, batch.attention_mask)
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
    elif resolve_path(path, head, out.device, mask.numel()) == "chunked":
        picked = mask.bool()
        hidden = out[:, :-1][picked]  # [T, H]: response positions only, no prompt or padding
        w, b = head.linear.weight, head.linear.bias
        logps = chunked_token_logps(hidden, w, b, targets[picked], dtype=torch.float32)  # [T]
        token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(
            picked, logps
        )  # back to [N, L-1-start] so the sum runs in the same order as the logits path
    else:
        w, b = head.linear.weight.float(), None if head.linear.bias is None else head.linear.bias.float()
        with torch.autocast(out.device.type, enabled=False):
            logits = F.linear(out[:, :-1].float(), w, b)  # [N, L-1-start, V] float32
        token_logps = selective_log_softmax(logits, targets) * mask
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
    path: str = "auto",
) -> list[float]:
    """Summed log p(response | prompt) under `model` (eval mode), in input order.

    Sequences are batched in length order so padding is small; the result is put back in order. For
    held-out likelihoods: an opponent's scores for training are computed in training's own micro-batches
    (`spaceft.microbatch`), where other batches would differ from the policy's in the last bits.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out = [0.0] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = pack([prompts[i] for i in idx], [responses[i] for i in idx], pad_id).to(device)
        with autocast(mixed_precision, device):
            logps, _ = sequence_logps(model, batch, path=path)
        for i, v in zip(idx, logps.tolist(), strict=True):
            out[i] = v
    model.train(was_training)
    return out
