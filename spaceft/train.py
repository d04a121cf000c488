"""The main player's training loop for one self-play iteration, on 🤗 Accelerate.

One readable loop: batch → policy forward (real and synthetic responses in ONE concatenated
forward) → loss from `losses.py` by `LossType` → backward → clip → step → log → checkpoint.
`accelerate launch` gives DDP / FSDP / DeepSpeed unchanged; the opponent's log-probs come from the
score stage's cache, computed in these very micro-batches (`spaceft.microbatch`), so no second model is
ever held and every reward is exactly 0 at the first step.

Reduction: each optimizer step averages the per-prompt losses of the `global_batch_size` prompts it
covers (SFT: the per-token NLL over all their response tokens, i.e. maximum likelihood), whatever the
micro-batch size, the number of accumulation steps or processes (each process scales its sum by
world_size / prompts_in_step; DDP then averages) — tests/test_train.py proves it.

Resume: every `save_every` optimizer steps the full training state (weights, optimizer and RNG via
`Accelerator.save_state`; the scheduler and step counter as JSON in `progress.json`) is written to
`train_state/` atomically. The micro-batches and the order each epoch visits them in are seeded
(`spaceft.microbatch`), so a resumed run replays exactly the remaining steps and ends bit-identical to
an uninterrupted one.
`progress.json` is the resume marker: written last, removed first. Nothing in the state is unpickled:
the scheduler is not registered with Accelerate (whose custom states load with `weights_only=False`)
and Accelerate loads the rest with `weights_only=True`; a state holding any other pickle is refused.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from spaceft.config import RunConfig, TrainConfig
from spaceft.losses import LossOutput, LossType, compute_loss
from spaceft.microbatch import TrainItem, compose, forward_batch, rank_groups, step_groups
from spaceft.models import apply_lora, mergeable
from spaceft.rundir import (
    atomic_dir,
    maybe_fail,
    write_json,
)
from spaceft.token_logps import autocast
from spaceft.train_state import drop_state, load_state, save_state, truncate_metrics

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "spaceft_config.yaml"
"""Saved next to each trained model's weights: the run's config (not part of the weights' identity)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stops and the last good checkpoint is kept."""


def loss_from_batch(out: dict[str, torch.Tensor], cfg: RunConfig, *, iteration: int) -> LossOutput:
    """The loss of a micro-batch's forward (`microbatch.forward_batch`) in `iteration` (T-SPIN's
    historical term is weighed by that iteration's β)."""
    t = cfg.train
    return compute_loss(
        t.loss,
        policy_real_logps=out["policy_real"],
        policy_synthetic_logps=out["policy_synthetic"],
        opponent_real_logps=out["opponent_real"] if t.loss.needs_opponent else None,
        opponent_synthetic_logps=out["opponent_synthetic"] if t.loss.needs_opponent else None,
        real_lengths=out["real_lengths"],
        synthetic_lengths=out["synthetic_lengths"],
        policy_proto_logps=out.get("policy_proto"),
        mu=t.mu,
        beta=t.beta,
        tau=t.tau,
        gamma=t.gamma,
        history_weight=t.history_weight_for(iteration),
    )


def make_optimizer(params: Any, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)


def warmup_then_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """Linear warm-up then linear decay, neither wasting a step: step s (0-based) runs at
    (s+1)/(warmup+1) of the peak during warm-up and (total-s)/(total-warmup) after, so the first step
    is not at lr 0 (a no-op; 1 step in 8 in the demo) and the last is not either."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(total - s, 0) / max(total - warmup, 1)

    return LambdaLR(optimizer, factor)


@dataclass
class Trainer:
    """Everything one iteration's loop needs, built once by `setup`."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    groups: list[tuple[int, ...]]  # item indices of every micro-batch (`microbatch.compose`)
    steps: list[list[int]]  # group indices of every optimizer step (all epochs)
    n_micro: int  # micro-batches per rank per step
    lr: float  # this iteration's peak learning rate
    start: int  # first step to run (> 0 when resuming)
    state_dir: Path
    metrics_path: Path

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None


def train_iteration(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[TrainItem],
    cfg: RunConfig,
    *,
    iteration: int,
    iter_dir: Path,
) -> dict[str, Any]:
    """Train the main player for `cfg.train.epochs` epochs on `items`; save it to iter_dir/model.

    1. set up Accelerate, LoRA, optimizer and schedule; resume from iter_dir/train_state if present
    2. for each optimizer step: batch → forward → loss → backward → step (`train_step`) → log → checkpoint
    3. save the model (LoRA merged) in HF format; drop the training state

    Returns the last step's metrics plus wall times: train_s (the loop), save_s, and tokens_per_s.
    """
    tic = time.perf_counter()
    # step 1: set up (and resume)
    tr = setup(model, items, cfg, iteration=iteration, iter_dir=iter_dir)
    bar = tqdm(
        total=len(tr.steps), initial=tr.start, desc=f"train iter {iteration}", unit="step",
        disable=not (cfg.logging.progress and tr.accelerator.is_main_process),
    )  # fmt: skip
    last: dict[str, float] = {}
    tokens = 0.0
    # step 2: the loop
    for step in range(tr.start, len(tr.steps)):
        last = train_step(
            tr, items, cfg, tokenizer.pad_token_id, iteration, step
        )
        tokens += last["tokens_per_s"] * last["step_s"]
        if step == 0 and cfg.train.loss.needs_opponent:
            beta = reward_scale(cfg.train)
            _check_start_rewards(last["rewards/abs_mean"] / beta, iteration, tr.accelerator.is_main_process)
        _log_step(tr, last, cfg)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracy']:.2f}")
        bar.update(1)
        maybe_fail("train", step + 1)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < len(tr.steps):
            save_state(tr.accelerator, tr.state_dir, step + 1, tr.scheduler)
    bar.close()
    train_s = time.perf_counter() - tic
    # step 3: save
    launch = {"distributed": tr.accelerator.distributed_type.value}  # NO, MULTI_GPU, FSDP, DEEPSPEED, ...
    # the summary also stands in for the stage's entry when a run stopped after the save (work_train)
    save_model(tr, tokenizer, cfg, iter_dir, {"steps": len(tr.steps), "lr": tr.lr, **last, **launch})
    timing = {"train_s": round(train_s, 3), "save_s": round(time.perf_counter() - tic - train_s, 3),
              "tokens_per_s": round(tokens / max(train_s, 1e-9), 1)}  # fmt: skip
    release_training(tr)
    return {"steps": len(tr.steps), **last, **timing, **launch}


def release_training(tr: Trainer) -> None:
    """Free what training held once its model is saved: `free_memory()` drops the accelerator's
    references to the prepared model, optimizer and scheduler and destroys a DeepSpeed engine. Without it
    every iteration's engine, with its master weights and optimizer state, stayed in memory through the
    later iterations (measured on CPU, 2 processes: one more live engine per iteration under ZeRO-2,
    none with it). ZeRO-3 needs more: :func:`release_zero3`."""
    module = getattr(tr.model, "module", tr.model)
    tr.accelerator.free_memory()
    release_zero3(module)


def release_zero3(module: torch.nn.Module) -> dict[str, int]:
    """Drop the two references DeepSpeed ZeRO-3 keeps, at module level, to a model it trained, each of
    which keeps the model and, through its hooks, the engine with its master weights and optimizer state
    alive after ``engine.destroy()``: under ZeRO-3 one engine per iteration stayed (CPU, 2 processes,
    DeepSpeed 0.19.8: 1/2/3 live after iterations 0/1/2; 0/0/0 with both dropped, neither alone).

    - ``PartitionedParameterCoordinator.__params_to_release`` is an unbounded ``functools.lru_cache`` on
      the class, keyed by (coordinator, submodule, step): it is emptied (found through the decorators'
      closures: DeepSpeed wraps it without ``functools.wraps``);
    - ``parameter_offload.FWD_MODULE_STACK``, the list of modules in a forward pass, still holds the
      model after training: the model's modules are removed from it.

    Returns how many caches were emptied and modules removed; nothing without DeepSpeed."""
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
    cleared, todo, seen = 0, list(vars(cls).values()) if cls is not None else [], set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if callable(getattr(obj, "cache_clear", None)):
            obj.cache_clear()
            cleared += 1
        todo.extend(c.cell_contents for c in getattr(obj, "__closure__", None) or () if _has_contents(c))
        if hasattr(obj, "__wrapped__"):
            todo.append(obj.__wrapped__)
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    removed = 0
    if any(hasattr(p, "ds_id") for p in module.parameters()) and not cleared:  # ZeRO-3 ran
        log.warning("DeepSpeed ZeRO-3 trained this model, but its parameter coordinator's cache was not "
                    "found to empty: this DeepSpeed may keep each iteration's engine in memory "
                    "(spaceft.train.release_zero3)")  # fmt: skip
    if isinstance(stack, list):
        ours = {id(m) for m in module.modules()}
        kept = [m for m in stack if id(m) not in ours]
        removed = len(stack) - len(kept)
        stack[:] = kept
    return {"caches": cleared, "stack": removed}


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def setup(
    model: torch.nn.Module, items: Sequence[TrainItem], cfg: RunConfig, *, iteration: int, iter_dir: Path
) -> Trainer:
    """Accelerate, LoRA, checkpointing, optimizer and schedule for one iteration; resume if a training
    state is on disk."""
    t = cfg.train
    accelerator = Accelerator(
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(cfg.run_dir), logging_dir=str(cfg.run_dir / "logs")
        ),
    )
    if cfg.logging.report_to != "none":
        accelerator.init_trackers(f"{cfg.name}-iter{iteration}", config=_flat(cfg.to_dict()))
    torch.manual_seed(t.seed + iteration)
    model = apply_lora(model, cfg.model)
    if cfg.model.gradient_checkpointing:
        # transformers >= 5.x names it activation checkpointing; older releases only have the old name
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    model.train()
    _check_precision(model, accelerator, cfg)
    world = accelerator.num_processes
    groups = compose(items, cfg, iteration, world)
    steps = step_groups(groups, cfg, iteration)
    if not steps:
        raise ValueError("no training prompts")
    n_micro = math.ceil(len(steps[0]) / world)
    micro_size = len(groups[0])
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        # DeepSpeed needs concrete sizes without a prepared dataloader; its backward divides the
        # loss by gradient_accumulation_steps, which the loop undoes (it normalises by prompts itself)
        ds.deepspeed_config.update(
            train_micro_batch_size_per_gpu=micro_size,
            gradient_accumulation_steps=n_micro,
            train_batch_size=micro_size * n_micro * world,
            gradient_clipping=t.max_grad_norm,
        )
    lr = t.lr_for(iteration)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, lr)
    scheduler = warmup_then_decay(optimizer, math.ceil(t.warmup_ratio * len(steps)), len(steps))
    # The scheduler is NOT prepared: Accelerate's wrapper steps it once per process per call (it
    # assumes per-process step counts), while `steps` already counts global optimizer steps.
    model, optimizer = accelerator.prepare(model, optimizer)
    tr = Trainer(accelerator, model, optimizer, scheduler, groups, steps, n_micro, lr, 0,
                 iter_dir / "train_state", iter_dir / "metrics.jsonl")  # fmt: skip
    tr.start = _resume(tr, iteration)
    return tr


def _resume(tr: Trainer, iteration: int) -> int:
    """Load the training state if a previous run stopped mid-iteration; the step to start at."""
    # the scheduler is not registered with Accelerate: its state travels as JSON in progress.json
    start = load_state(tr.accelerator, tr.state_dir, tr.scheduler, iteration)
    if start:
        log.info("iteration %d: resuming training at step %d/%d", iteration, start, len(tr.steps))
    if tr.accelerator.is_main_process:
        tr.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if start == 0 and tr.metrics_path.exists():
            tr.metrics_path.unlink()
        truncate_metrics(tr.metrics_path, start)
    return start


def train_step(
    tr: Trainer, items: Sequence[TrainItem], cfg: RunConfig, pad_id: int, iteration: int, step: int
) -> dict[str, float]:
    """Optimizer step `step` over its groups of `items`; returns its metrics.

    1. this process's micro-batches: its share of the step's groups (`microbatch.rank_groups`)
    2. per micro-batch: policy forward → loss → backward (gradients sync only on the last)
    3. clip, optimizer step (unless a value is not finite: weights and saved state stay good)
    """
    t, accelerator, model = cfg.train, tr.accelerator, tr.model
    world = accelerator.num_processes
    # step 1: batch. SFT is maximum likelihood: token NLL summed over the step / its response tokens;
    # the pairwise losses average per prompt. Either way the step's gradient ignores how it is split.
    groups = [tr.groups[g] for g in tr.steps[step]]
    micro = [([items[i] for i in tr.groups[g]], counts)
             for g, counts in rank_groups(tr.steps[step], accelerator.process_index, world)]  # fmt: skip
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    sft = t.loss is LossType.SFT
    step_items = [items[i] for grp in groups for i in grp]
    denom = sum(len(it.real_ids) for it in step_items) if sft else len(step_items)
    scale = world / denom * (tr.n_micro if tr.deepspeed else 1)
    sums = torch.zeros(len(STATS), device=accelerator.device)
    tic = time.perf_counter()
    # step 2: forward → loss → backward, per micro-batch
    for m, (mb, counts) in enumerate(micro):
        sync = m == len(micro) - 1
        accelerator.gradient_state._set_sync_gradients(sync)  # DeepSpeed steps only on the last
        # FSDP reduce-scatters every micro-batch (accelerate's sync_each_batch): skipping the sync would
        # keep each rank's gradients unsharded, a whole model's worth per GPU, until the last one
        with nullcontext() if sync or fsdp else accelerator.no_sync(model):
            with autocast(t.mixed_precision, accelerator.device):
                out = forward_batch(model, mb, pad_id, accelerator.device, path=t.logps_path,
                                    shared=t.shared_prompt)
            try:
                res = loss_from_batch(out, cfg, iteration=iteration)
                finite = bool(torch.isfinite(res.losses).all())
            except ValueError as e:  # the losses reject non-finite log-probs
                if "non-finite" not in str(e):
                    raise
                finite = False
            _stop_if(not finite, accelerator, "loss", iteration, step, tr.state_dir)
            weights = out["real_lengths"] if sft else 1.0  # SFT's per-prompt loss is a token mean
            # a stand-in (counts False) only keeps this process in step with the others: weight 0
            accelerator.backward((res.losses * weights).sum() * (scale if counts else 0.0))
        if counts:
            sums += _batch_stats(res, out, weights)
    # step 3: clip and step
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
    _stop_if(grad_norm is not None and not math.isfinite(float(grad_norm)), accelerator, "gradient",
             iteration, step, tr.state_dir, stepped=tr.deepspeed)  # fmt: skip
    step_lr = tr.scheduler.get_last_lr()[0]  # the rate this step used (before the schedule advances)
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    sums = accelerator.reduce(sums, "sum")
    elapsed = time.perf_counter() - tic
    metrics = _metrics(sums, grad_norm, step_lr, elapsed)
    metrics.update(step=step + 1, epoch=step * t.epochs // len(tr.steps) + 1, step_s=round(elapsed, 4))
    return metrics


def _log_step(tr: Trainer, metrics: dict[str, float], cfg: RunConfig) -> None:
    """Append to metrics.jsonl and the tracker every `log_every` steps and at the last step."""
    step = int(metrics["step"])
    if tr.accelerator.is_main_process and (step % cfg.logging.log_every == 0 or step == len(tr.steps)):
        with tr.metrics_path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        tr.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)


def save_model(
    tr: Trainer, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig, iter_dir: Path, summary: dict[str, Any]
) -> None:
    """Save the trained model (LoRA merged) in HF format with its config, then drop the resume state."""
    accelerator = tr.accelerator
    accelerator.wait_for_everyone()
    # under ZeRO-3 / FSDP the weights are sharded: gather a full state dict on every rank first
    state_dict = None if cfg.model.lora.r else accelerator.get_state_dict(tr.model)
    if accelerator.is_main_process:
        final = mergeable(accelerator.unwrap_model(tr.model))
        if state_dict is not None:
            drop_tied_copy(final, state_dict)
        with atomic_dir(iter_dir / "model") as tmp:
            final.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / RUN_CONFIG_FILE).write_text(cfg.to_yaml())  # the config travels with the weights
        if tr.state_dir.exists():
            drop_state(tr.state_dir)
        write_json(iter_dir / "train_summary.json", summary)
    accelerator.wait_for_everyone()  # no rank reads the model before it is written
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group
        tracker.finish()


def drop_tied_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    """Drop the output embedding from a gathered state dict when the model ties it to the input
    embedding and the two are equal. `save_pretrained` drops a tied copy by shared storage, which a state
    dict gathered from shards (FSDP2, ZeRO-2) no longer has: `lm_head.weight` was written too, so the
    files, and the evaluation cache's key, differed from one process's, though the model loaded the same.
    Returns the key dropped."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):  # as transformers ties
        return None
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None:
        return None
    names = {id(m): name for name, m in model.named_modules()}
    key_in, key_out = (f"{names.get(id(m), '?')}.weight" for m in (get_in(), get_out()))
    if key_in == key_out or key_in not in state_dict or key_out not in state_dict:
        return None
    if not torch.equal(state_dict[key_in], state_dict[key_out]):
        return None
    del state_dict[key_out]
    return key_out


def _check_precision(model: torch.nn.Module, accelerator: Accelerator, cfg: RunConfig) -> None:
    """Refuse settings under which rewards would not start at 0, warn where updates would vanish."""
    launched = accelerator.mixed_precision
    ours = cfg.train.mixed_precision
    if launched not in ("no", ours) and accelerator.state.deepspeed_plugin is None:
        raise ValueError(
            f"accelerate mixed_precision={launched} would train under autocast while the opponent was scored "
            "without it, so rewards would not start at 0: launch without mixed precision and set "
            "train.mixed_precision=bf16 (training and scoring then share the autocast)"
        )
    state = accelerator.state
    if launched != "no" and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            f"under FSDP, accelerate mixed_precision={launched} casts the sharded weights to {launched} for "
            "the forward (FSDP's param_dtype), which the score stage does not do, so rewards would not start "
            "at 0: launch FSDP with mixed_precision: no (as spaceft/recipes/accelerate/fsdp2.yaml) and set "
            "train.mixed_precision=bf16 (autocast over float32 weights, as scoring does) or "
            "model.dtype=bfloat16 (pure bf16: FSDP keeps no float32 masters, so only at lr >= 1e-5)"
        )
    if state.deepspeed_plugin is not None and launched == "bf16" and cfg.model.dtype != "bfloat16":
        raise ValueError(
            "DeepSpeed with bf16 trains bf16 copies of the weights (its optimizer keeps the float32 masters) "
            f"while the score stage reads model.dtype={cfg.model.dtype} weights, so rewards would not start "
            "at 0: set model.dtype=bfloat16 (as recipes/paper_space.yaml does with accelerate/zero3.yaml)"
        )
    low = {p.dtype for p in model.parameters() if p.requires_grad} & {torch.bfloat16, torch.float16}
    if (
        low
        and accelerator.state.deepspeed_plugin is None
        and cfg.train.lr_for(0) < 1e-5
        and not cfg.model.lora.r
    ):
        log.warning(
            "training %s weights without fp32 master weights at lr %.1e: most updates are below the "
            "format's resolution and round away. Use model.dtype=float32, LoRA, or DeepSpeed (which keeps "
            "fp32 master weights).", sorted(str(d) for d in low), cfg.train.lr_for(0),
        )  # fmt: skip


# At the first step of an iteration the policy IS the opponent, and the opponent's cached scores were
# computed in this step's very micro-batches (spaceft.microbatch): every reward is exactly 0, in float32 and
# bf16 alike (tests/test_exact_start.py). Anything above this tolerance is a real difference between the
# scoring forward (eval mode, no grad) and the training forward (train mode): dropout or other train-mode
# noise, or another attention or log-prob path.
START_REWARD_TOLERANCE = 1e-6


def reward_scale(t: TrainConfig) -> float:
    """β of the logged rewards: β·(log-ratio) for the losses that have a β (losses.py); 1 for S-IPO,
    whose rewards are the plain log-ratios (the config refuses a β for it)."""
    return t.beta or t.loss.default_beta or 1.0


def _check_start_rewards(abs_mean: float, iteration: int, main: bool) -> None:
    """`abs_mean`: the mean |log p_θ - log p_θt| of the first step, in nats (β divided out)."""
    if abs_mean > START_REWARD_TOLERANCE and main:
        log.warning(
            "iteration %d: mean |reward| at the first step is %.3g nats, where the policy is the "
            "opponent and both were computed in the same micro-batches (tolerance %.0e): the model computes "
            "differently in training mode than in the score stage's eval mode, so every reward of the "
            "iteration carries that noise. Switch off what only runs in training mode: dropout (spaceft "
            "zeroes the config's dropout fields; a custom module may keep its own), MoE router jitter or "
            "noise, stochastic depth; or a custom forward that picks another attention or log-prob path "
            "when gradients are on.",
            iteration, abs_mean, START_REWARD_TOLERANCE,
        )  # fmt: skip


def _stop_if(
    bad: bool,
    accelerator: Accelerator,
    what: str,
    iteration: int,
    step: int,
    state_dir: Path,
    *,
    stepped: bool = False,
) -> None:
    """Raise NonFiniteLossError on every rank if any rank saw a non-finite value (no rank hangs).

    `stepped`: the optimizer already stepped (DeepSpeed steps inside `backward`), so the message must
    not claim that the weights were spared.
    """
    flag = accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), "sum")
    if float(flag.item()) > 0:
        saved = (
            f"the last good training state is in {state_dir}"
            if (state_dir / "progress.json").exists()
            else f"no training state was saved yet, so iteration {iteration} will start over"
        )
        happened = (
            "under DeepSpeed the optimizer steps inside backward, so this update was already applied "
            "(unless DeepSpeed's fp16 loss scaler skipped it) and the weights in memory are not used"
            if stepped
            else "the weights were not updated"
        )
        raise NonFiniteLossError(
            f"non-finite {what} at iteration {iteration}, step {step + 1}: lower train.lr, or train in "
            f"float32; {happened} and {saved}"
        )


STATS = ("prompts", "loss", "real", "synthetic", "accuracy", "logp_real", "logp_synthetic", "tokens",
         "abs_reward", "loss_weight", "proto", "proto_prompts")
"""The sums `_batch_stats` returns per micro-batch and `_metrics` reads back after the step's all-reduce,
in this order."""


def _batch_stats(res: LossOutput, out: dict[str, torch.Tensor], weights: Any = 1.0) -> torch.Tensor:
    """Sums over the micro-batch (`STATS`): prompts, loss, real/syn rewards, accuracy, real/syn logps,
    tokens, the mean |reward| of each prompt's 1 + K responses, the loss's weight, and the proto-synthetic
    rewards with the number of prompts that have one (T-SPIN). The loss is summed with the `weights` the
    step's gradient uses (SFT: each prompt's token mean times its response tokens), so the logged loss is
    the one optimised (SFT: the token-weighted mean, not the mean of prompt means)."""
    real = res.real_rewards  # [B]
    syn = res.synthetic_rewards  # [B, K]
    syn_mean = syn.mean(-1) if syn.numel() else torch.zeros_like(real)
    acc = (real > syn_mean).float() if syn.numel() else torch.zeros_like(real)
    syn_logp = out["policy_synthetic"].mean(-1).sum() if syn.numel() else torch.tensor(0.0)
    both = torch.cat([real.unsqueeze(-1), syn], dim=-1) if syn.numel() else real.unsqueeze(-1)  # [B, 1+K]
    abs_mean = both.abs().mean(-1)
    proto = res.proto_rewards if res.proto_rewards is not None else real.new_zeros(0)  # [B] or [0]
    sums = {
        "prompts": torch.tensor(float(len(real))),
        "loss": (res.losses.detach() * weights).sum().cpu(),
        "real": real.sum().cpu(),
        "synthetic": syn_mean.sum().cpu(),
        "accuracy": acc.sum().cpu(),
        "logp_real": out["policy_real"].detach().sum().cpu(),
        "logp_synthetic": syn_logp.detach().cpu(),
        "tokens": out["num_tokens"].float().cpu(),
        "abs_reward": abs_mean.sum().cpu(),
        "loss_weight": (torch.ones_like(real) * weights).sum().cpu(),
        "proto": proto.sum().cpu(),
        "proto_prompts": torch.tensor(float(len(proto))),
    }
    return torch.stack([sums[k].float() for k in STATS]).to(out["policy_real"].device)


def _metrics(sums: torch.Tensor, grad_norm: Any, lr: float, elapsed: float) -> dict[str, float]:
    s = dict(zip(STATS, sums.tolist(), strict=True))
    n = s["prompts"]
    metrics = {
        "loss": s["loss"] / s["loss_weight"],
        "rewards/real": s["real"] / n,
        "rewards/synthetic": s["synthetic"] / n,
        "rewards/abs_mean": s["abs_reward"] / n,
        "rewards/margin": (s["real"] - s["synthetic"]) / n,
        "rewards/accuracy": s["accuracy"] / n,
        "logps/real": s["logp_real"] / n,
        "logps/synthetic": s["logp_synthetic"] / n,
        "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
        "lr": lr,
        "tokens_per_s": s["tokens"] / max(elapsed, 1e-9),
    }
    if s["proto_prompts"]:  # T-SPIN: the reward of the proto-synthetic response
        metrics["rewards/proto"] = s["proto"] / s["proto_prompts"]
    return metrics


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
