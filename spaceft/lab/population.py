"""Population mode: the self-play objectives with exact expectations, no sampling at all.

For an opponent p_θt, the population objective of a method is

    J_t(θ) = E_{y ~ p_data} E_{y' ~ p_θt} [ L(y, y') ],

which every loss here reduces to, whatever K (each averages a per-pair term over j). It is computed as
the method's real loss (:func:`spaceft.losses.compute_loss`) on all R × R pairs of every prompt,
weighted by p_data(y)·p_θt(y'). T-SPIN's J_t adds y0 ~ p_θ0, the start model, fixed for the whole run
(:func:`tspin_objective`). Each iteration minimises J_t with L-BFGS (float64, strong-Wolfe line search)
for up to ``max_steps`` iterations, then sets θt+1 ← θ.

What the SPACE paper proves, and what the tests check with the tabular model: from any start, the
minimiser of J_t for SPACE (β = 1, any μ > 0) is p_θ = p_data (Theorem 2); started at p_data, the
gradient is zero and the model stays there (Theorem 3). SPIN's J_t has no minimiser when p_θt ≠
p_data (the logistic loss only approaches 0 as the reward gap grows without bound), so its iterate
depends on the step budget; the lab reports what it does.

T-SPIN's J_t depends on θ only through the scores s = α·log p_θ, and only through their differences.
Its minimiser s* (a Bradley-Terry fit with wins p_data(y)·p_θt(y') and β·p_θt(y')·p_θ0(y0)) does not
depend on α, so p_θt+1 ∝ exp(s*/α): α is a temperature. With p_θt = p_data the current term is
symmetric and pulls s towards a constant, i.e. p_θ towards the uniform distribution, so p_data is not a
fixed point (docs/THEORY_LAB.md gives the numbers).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from spaceft.lab.methods import Method
from spaceft.lab.policies import TabularPolicy
from spaceft.lab.world import World, kl_divergence, total_variation

logger = logging.getLogger(__name__)

Record = dict[str, float | int | None]
STARTS = ("random", "data")


@dataclass(frozen=True)
class PopulationConfig:
    """Settings of the population-mode runs."""

    iterations: int = 3
    """Self-play iterations (SPACE needs one; the rest show it stays)."""
    max_steps: int = 200
    """L-BFGS iterations per self-play iteration (each minimises J_t for a fixed opponent)."""
    start: str = "random"
    """``random``: logits ~ N(0, init_scale²); ``data``: the teacher itself (Theorem 3)."""
    init_scale: float = 1.0
    """Standard deviation of the random start's logits."""

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.max_steps < 1:
            raise ValueError("iterations and max_steps must be >= 1")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")


def _pairs(table: Tensor) -> tuple[Tensor, Tensor]:
    """[P, R] → every (y, y') pair of every prompt: real [P·R·R] (y), synthetic [P·R·R, 1] (y').

    Broadcast views rather than index gathers: their backward is a sum, far cheaper than a scatter.
    """
    p, r = table.shape
    return table[:, :, None].expand(p, r, r).reshape(-1), table[:, None, :].expand(p, r, r).reshape(-1, 1)


def population_objective(
    method: Method,
    world: World,
    policy_logps: Tensor,
    opponent_logps: Tensor,
    proto_logps: Tensor | None = None,
) -> Tensor:
    """J_t(θ): the method's loss averaged exactly over y ~ p_data, y' ~ p_θt (y0 ~ p_θ0 for a method
    that uses proto-synthetic responses, whose log-probs ``proto_logps`` [P, R] it then needs), and
    over prompts."""
    if method.loss_type.uses_proto:
        if proto_logps is None:
            raise ValueError(f"method {method.key} needs the proto-synthetic model's log-probs")
        return tspin_objective(method, world, policy_logps, opponent_logps, proto_logps)
    policy_real, policy_syn = _pairs(policy_logps)
    opp_real, opp_syn = _pairs(opponent_logps)
    lengths = world.lengths.expand(world.num_prompts, -1)
    real_len, syn_len = _pairs(lengths)
    out = method.loss(policy_real, policy_syn, opp_real, opp_syn, real_len, syn_len)
    data_real, _ = _pairs(world.data_logps)
    weights = (data_real + opp_syn[:, 0]).exp()  # p_data(y)·p_θt(y'), sums to P
    return method.reduce(out, real_len, weights)


def tspin_objective(
    method: Method, world: World, policy_logps: Tensor, opponent_logps: Tensor, proto_logps: Tensor
) -> Tensor:
    """T-SPIN's J_t = E_{y ~ p_data, y' ~ p_θt, y0 ~ p_θ0}[ℓ(c(y) − c(y')) + β·ℓ(c(y') − c(y0))].

    Each term involves two of the three responses, so two R × R grids replace the R³ triplets: the
    library's loss on (y, y', ·) with β = 0 is the current term alone, and on (y', y', y0) it is
    ℓ(0) = log 2 (a constant with zero gradient, subtracted) plus β times the historical term. Equal
    to the triplet sum to rounding (tests/test_lab.py) at 1/R of the work.
    """
    real_len, syn_len = _pairs(world.lengths.expand(world.num_prompts, -1))
    real, syn = _pairs(policy_logps)  # log p_θ of the first and of the second response of each pair
    # current term, (y, y') ~ p_data × p_θt
    current = replace(method, history_weight=0.0).loss(real, syn, None, None, real_len, syn_len, syn[:, 0])
    data_first, _ = _pairs(world.data_logps)
    _, opponent_second = _pairs(opponent_logps)
    current_weights = (data_first + opponent_second[:, 0]).exp()  # p_data(y)·p_θt(y'), sums to P
    # historical term, (y', y0) ~ p_θt × p_θ0, with y' in the real slot too
    history = method.loss(real, real.unsqueeze(-1), None, None, real_len, real_len.unsqueeze(-1), syn[:, 0])
    opponent_first, _ = _pairs(opponent_logps)
    _, proto_second = _pairs(proto_logps)
    history_weights = (opponent_first + proto_second[:, 0]).exp()  # p_θt(y')·p_θ0(y0), sums to P
    total = (current_weights * current.losses).sum()
    total = total + (history_weights * (history.losses - math.log(2.0))).sum()
    return total / world.num_prompts


def minimise(
    method: Method,
    world: World,
    policy: nn.Module,
    opponent_logps: Tensor,
    max_steps: int,
    proto_logps: Tensor | None = None,
) -> float:
    """Minimise J_t over the policy's parameters with L-BFGS; returns the final J_t."""
    optimizer = torch.optim.LBFGS(
        policy.parameters(),
        lr=1.0,
        max_iter=max_steps,
        max_eval=2 * max_steps,
        tolerance_grad=1e-13,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        logps = world.sequence_logps(policy())
        return population_objective(method, world, logps, opponent_logps, proto_logps)

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(objective())


def _grad_norm(
    method: Method, world: World, policy: nn.Module, opponent_logps: Tensor, proto_logps: Tensor | None
) -> float:
    policy.zero_grad(set_to_none=True)
    logps = world.sequence_logps(policy())
    population_objective(method, world, logps, opponent_logps, proto_logps).backward()
    norms = [p.grad.norm() for p in policy.parameters() if p.grad is not None]
    policy.zero_grad(set_to_none=True)
    return float(torch.stack(norms).norm()) if norms else 0.0


def run_population_seed(
    world: World, methods: list[Method], config: PopulationConfig, seed: int
) -> dict[str, list[Record]]:
    """Every method from the same start (drawn from ``seed``): ``{key: [Record per iteration]}``.

    A record holds the exact KL(p_data‖p_θ) and TV, the objective J_t reached, the gradient norm of J_t
    at the iteration's start (0 at a fixed point), and the expected rewards E_{p_data}[r(y)] and
    E_{p_θt}[r(y')]. The proto-synthetic model of T-SPIN is the start, p_θ0.
    """
    results: dict[str, list[Record]] = {}
    for base in methods:
        policy = _start(world, config, seed)
        with torch.no_grad():
            logps = world.sequence_logps(policy())
        proto = logps.detach() if base.loss_type.uses_proto else None
        records: list[Record] = [_record(world, logps, 0)]
        for t in range(1, config.iterations + 1):
            method = base.at_iteration(t)
            opponent = logps.detach()
            grad_norm = _grad_norm(method, world, policy, opponent, proto)
            objective = minimise(method, world, policy, opponent, config.max_steps, proto)
            with torch.no_grad():
                logps = world.sequence_logps(policy())
                rec = _record(world, logps, t)
                rec.update(objective=objective, grad_norm_at_start=grad_norm)
                if method.loss_type.uses_synthetic:
                    rec["reward_real"], rec["reward_synthetic"] = _expected_rewards(
                        method, world, logps, opponent
                    )
            records.append(rec)
        logger.info(
            "population seed %d %-12s KL %.3g -> %.3g", seed, base.key, records[0]["kl"], records[-1]["kl"]
        )
        results[base.key] = records
    return results


def _start(world: World, config: PopulationConfig, seed: int) -> TabularPolicy:
    if config.start == "data":
        return TabularPolicy(world.teacher_logits)
    g = torch.Generator().manual_seed(seed)
    shape = (world.num_prompts, world.num_nodes, world.vocab_size)
    return TabularPolicy(config.init_scale * torch.randn(shape, generator=g, dtype=torch.float64))


def _record(world: World, logps: Tensor, iteration: int) -> Record:
    return {
        "iteration": iteration,
        "kl": kl_divergence(world.data_logps, logps).mean().item(),
        "tv": total_variation(world.data_logps, logps).mean().item(),
        "objective": None,
        "grad_norm_at_start": None,
        "reward_real": None,
        "reward_synthetic": None,
    }


def _expected_rewards(method: Method, world: World, logps: Tensor, opponent: Tensor) -> tuple[float, float]:
    """E_{y~p_data}[r(y)] and E_{y'~p_θt}[r(y')] with the method's own reward, averaged over prompts."""
    p, r = world.num_prompts, world.num_responses
    prompt = torch.arange(p).repeat_interleave(r)
    resp = torch.arange(r).repeat(p)
    out = method.outputs(logps, opponent, world.lengths, prompt, resp, resp.unsqueeze(-1), resp)
    data_w = world.data_logps.flatten().exp()
    opp_w = opponent.flatten().exp()
    return float((data_w * out.real_rewards).sum() / p), float(
        (opp_w * out.synthetic_rewards[:, 0]).sum() / p
    )
