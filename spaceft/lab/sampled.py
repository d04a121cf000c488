"""Sampled mode: self-play as practitioners run it, with exact bookkeeping.

Per seed, N real responses per prompt are drawn once from p_data and kept fixed (the SFT set). The
starting model is SFT on them for a few epochs. Then, for t = 1 … T and each method (Algorithm 1 of
the SPACE seed, as in ``spaceft.selfplay``):

1. opponent p_θt ← the current model (its log-probs of every response, detached);
2. draw K synthetic responses per real pair from p_θt; T-SPIN's proto-synthetic response y0 of each
   pair is the first of them in iteration 1 (drawn from the start model), kept for the whole run;
3. E epochs of RMSProp (a fresh optimiser per iteration, 10% linear warm-up then linear decay, as
   ``spaceft.train``) on the method's loss over the N·P pairs;
4. record exact KL(p_data‖p_θ), KL(p̂‖p_θ) to the empirical distribution p̂ of the real responses,
   TV(p_data, p_θ), the p_θ mass on responses never seen in the real set, KL(p_θt‖p_θ) (how far the
   iteration moved the model), the fraction of pairs with y' = y, and the mean real and synthetic
   rewards of the iteration's pairs under the final θ.

SFT is the same loop without synthetic responses (more epochs on the real set). All methods of a seed
share the real set and the starting model; each draws its synthetic responses from its own generator
seeded by the seed, so a method's numbers do not depend on which other methods run.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spaceft.lab.methods import Method
from spaceft.lab.policies import POLICY_KINDS, make_policy
from spaceft.lab.world import World, empirical_logps, kl_divergence, total_variation
from spaceft.losses import LossType

logger = logging.getLogger(__name__)

Record = dict[str, float | int | None]

_SFT = Method("sft", "SFT", LossType.SFT, 0)


@dataclass(frozen=True)
class SampledConfig:
    """Settings of the sampled-mode runs."""

    num_real: int = 16
    """N, real responses per prompt (fixed for the whole run)."""
    iterations: int = 10
    """T, self-play iterations."""
    epochs: int = 2
    """E, epochs per iteration over the N·P real pairs (the seed's 2)."""
    batch_size: int = 32
    """Pairs per RMSProp step."""
    lr: float = 0.02
    """Peak RMSProp learning rate, also for the SFT start."""
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of an iteration's steps, then linear decay to 0 (as the trainer)."""
    sft_start_epochs: int = 2
    """Epochs of SFT on the real set that make the starting model."""
    policy: str = "tabular"
    """Model family: ``tabular`` or ``factored``."""
    rank: int = 4
    """Rank of the ``factored`` model."""
    init_scale: float = 0.5
    """Standard deviation of the random initial logits (before the SFT start)."""

    def __post_init__(self) -> None:
        for name in ("num_real", "iterations", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sft_start_epochs < 0:
            raise ValueError(f"sft_start_epochs must be >= 0, got {self.sft_start_epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.policy not in POLICY_KINDS:
            raise ValueError(f"policy must be one of {POLICY_KINDS}, got {self.policy!r}")


def train_epochs(
    policy: nn.Module,
    method: Method,
    world: World,
    opponent_logps: Tensor | None,
    pairs: tuple[Tensor, Tensor, Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    warmup_ratio: float,
    generator: torch.Generator,
    proto: Tensor | None = None,
) -> None:
    """E epochs of RMSProp on ``method``'s loss over ``pairs`` = (prompt [B], real [B], synthetic [B, K])
    and, for a method that uses them, the proto-synthetic responses ``proto`` [B].

    A fresh optimiser with linear warm-up and linear decay, like one iteration of ``spaceft.train``
    (and ``transformers``' ``linear`` schedule). A cold RMSProp has no bias correction: its first steps
    are sign steps of up to ~10·lr whatever the gradient's size; the warm-up (whose first step has
    learning rate 0 and only primes the second-moment estimate) and the decay soften them.
    """
    prompt, real, synthetic = pairs
    total = epochs * math.ceil(prompt.shape[0] / batch_size)
    warmup = math.ceil(warmup_ratio * total)

    def schedule(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    optimizer = torch.optim.RMSprop(policy.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for _ in range(epochs):
        order = torch.randperm(prompt.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logps = world.sequence_logps(policy())  # [P, R]
            batch_proto = None if proto is None else proto[idx]
            out = method.outputs(
                logps, opponent_logps, world.lengths, prompt[idx], real[idx], synthetic[idx], batch_proto
            )
            loss = method.reduce(out, world.lengths[real[idx]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def _record(world: World, logps: Tensor, emp_logps: Tensor, real: Tensor, iteration: int) -> Record:
    prompts = torch.arange(world.num_prompts).unsqueeze(-1)
    unseen = torch.isinf(emp_logps)  # [P, R]
    return {
        "iteration": iteration,
        "kl": kl_divergence(world.data_logps, logps).mean().item(),
        "kl_empirical": kl_divergence(emp_logps, logps).mean().item(),
        "tv": total_variation(world.data_logps, logps).mean().item(),
        "unseen_mass": (logps.exp() * unseen).sum(-1).mean().item(),
        "logp_real": logps[prompts, real].mean().item(),
        "kl_from_opponent": None,
        "frac_synthetic_equals_real": None,
        "reward_real": None,
        "reward_synthetic": None,
    }


def run_sampled_seed(
    world: World, methods: list[Method], config: SampledConfig, seed: int, *, keep_models: bool = False
) -> dict:
    """All methods on one seed: ``{"data": facts about the real set, "methods": {key: [Record]}}``.

    With ``keep_models`` the result also holds ``"real"`` (the real set, [P, N] response indices) and
    ``"models"`` (each method's final model), for inspection; they are not JSON.
    """
    # step 1: the fixed real set and its empirical distribution
    g = torch.Generator().manual_seed(seed)
    real = world.sample(world.data_logps, config.num_real, g)  # [P, N]
    emp = empirical_logps(real, world.num_responses)  # [P, R]
    prompt_flat = torch.arange(world.num_prompts).repeat_interleave(config.num_real)  # [P·N]
    real_flat = real.flatten()  # [P·N]
    no_synthetic = torch.empty(len(real_flat), 0, dtype=torch.long)
    data = {
        "kl_empirical_of_data": kl_divergence(emp, world.data_logps).mean().item(),
        "unseen_mass_of_data": (world.data_logps.exp() * torch.isinf(emp)).sum(-1).mean().item(),
        "distinct_real_per_prompt": (~torch.isinf(emp)).sum(-1).double().mean().item(),
    }
    # step 2: the SFT start, shared by every method of this seed
    start = make_policy(world, config.policy, init_scale=config.init_scale, generator=g, rank=config.rank)
    train_epochs(
        start,
        _SFT,
        world,
        None,
        (prompt_flat, real_flat, no_synthetic),
        epochs=config.sft_start_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup_ratio=config.warmup_ratio,
        generator=g,
    )
    results: dict[str, list[Record]] = {}
    models: dict[str, nn.Module] = {}
    for method in methods:
        records, models[method.key] = _run_method(
            world, method, config, seed, start, emp, real, real_flat, prompt_flat
        )
        results[method.key] = records
        logger.info(
            "sampled seed %d %-12s KL %.4f -> %.4f", seed, method.key, records[0]["kl"], records[-1]["kl"]
        )
    out: dict = {"data": data, "methods": results}
    if keep_models:
        out.update(real=real, models=models)
    return out


def _run_method(
    world: World,
    method: Method,
    config: SampledConfig,
    seed: int,
    start: nn.Module,
    emp: Tensor,
    real: Tensor,
    real_flat: Tensor,
    prompt_flat: Tensor,
) -> tuple[list[Record], nn.Module]:
    policy = copy.deepcopy(start)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        records = [_record(world, world.sequence_logps(policy()), emp, real, 0)]
    k = method.num_synthetic
    proto: Tensor | None = None
    for t in range(1, config.iterations + 1):
        # step 1: the opponent is the current model, frozen for the iteration
        with torch.no_grad():
            opponent = world.sequence_logps(policy())  # [P, R]
        # step 2: K synthetic responses per real pair, from the opponent
        if k:
            synthetic = world.sample(opponent, config.num_real * k, g)  # [P, N·K]
            synthetic = synthetic.view(world.num_prompts * config.num_real, k)  # [P·N, K]
        else:
            synthetic = torch.empty(len(real_flat), 0, dtype=torch.long)
        if method.loss_type.uses_proto and proto is None:
            proto = synthetic[:, 0].clone()  # y0 ~ p_θ0, the start model, kept across iterations
        pairs = (prompt_flat, real_flat, synthetic)
        # step 3: E epochs on the method's loss
        train_epochs(
            policy,
            method.at_iteration(t),
            world,
            opponent if method.loss_type.needs_opponent else None,
            pairs,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            warmup_ratio=config.warmup_ratio,
            generator=g,
            proto=proto,
        )
        # step 4: exact metrics of the new model, rewards of this iteration's pairs
        with torch.no_grad():
            logps = world.sequence_logps(policy())
            rec = _record(world, logps, emp, real, t)
            # how far this iteration moved the model
            rec["kl_from_opponent"] = kl_divergence(opponent, logps).mean().item()
            if method.loss_type.uses_synthetic:
                out = method.outputs(logps, opponent, world.lengths, *pairs, proto)
                rec["frac_synthetic_equals_real"] = (
                    (synthetic == real_flat.unsqueeze(-1)).double().mean().item()
                )
                rec["reward_real"] = out.real_rewards.mean().item()
                rec["reward_synthetic"] = out.synthetic_rewards.mean().item()
        records.append(rec)
    return records, policy
