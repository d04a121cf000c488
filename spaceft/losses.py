"""Objectives of self-play fine-tuning: SPACE, SPIN, S-IPO, S-SimPO, T-SPIN and SFT.

Every loss is a pure function on flat tensors of *summed* sequence log-probabilities (prompt tokens
masked), with K synthetic responses per prompt:

    real       [B]      log p(y | x) of the real (SFT) response of each prompt
    synthetic  [B, K]   log p(y'_j | x) of the K responses sampled from the opponent p_θt
    proto      [B]      log p(y0 | x) of a proto-synthetic response, drawn once from the start model
                        p_θ0 and kept across iterations (T-SPIN only)

Each returns a :class:`LossOutput` holding the per-prompt loss ``[B]`` (the caller reduces, so the
reduction is explicit and the same however a batch is split across ranks or accumulation steps) and
the detached rewards. The reward of a response is r(u|x) = β·(log p_θ(u|x) − log p_θt(u|x)), except for
S-SimPO and T-SPIN, which are reference-free.

Departures from the papers, all deliberate:

* SPACE (arXiv 2512.07175) has no β; here ``beta`` scales the log-ratio and defaults to 1, which *is*
  the paper's objective. With β ≠ 1 the population optimum of one iteration is no longer p_data (the
  unconstrained optimum r = log(p_data / p_θt) is then not a normalised log-ratio), though p_data
  stays a fixed point.
* With K > 1 synthetic responses, SPIN, S-IPO and S-SimPO average the pairwise loss over the K pairs
  (real, y'_j); SPACE averages its noise term over j, which is the NCE estimator with noise ratio μ
  when K = μ; T-SPIN averages both of its terms over j (the paper uses K = 1).
* T-SPIN's α is ``beta`` here (the reward scale, as every other loss's), and its β is
  ``history_weight``.
* SFT in :func:`compute_loss` is the mean token NLL *per sequence*. Averaging that over sequences
  weights short responses more than maximum likelihood does; a caller that wants the maximum
  likelihood estimate weights each sequence by its length when reducing (see ``compute_loss``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "LossOutput",
    "LossType",
    "compute_loss",
    "ipo_loss",
    "sft_loss",
    "simpo_loss",
    "space_loss",
    "spin_loss",
    "tspin_loss",
]


class LossType(StrEnum):
    """The objective a self-play iteration optimises."""

    SPACE = "space"
    SPIN = "spin"
    SPIN_HINGE = "spin_hinge"
    IPO = "ipo"
    SIMPO = "simpo"
    TSPIN = "tspin"
    SFT = "sft"

    @property
    def needs_opponent(self) -> bool:
        """Whether the loss needs the opponent's log-probs of real and synthetic responses."""
        return self in (LossType.SPACE, LossType.SPIN, LossType.SPIN_HINGE, LossType.IPO)

    @property
    def uses_synthetic(self) -> bool:
        """Whether the loss needs synthetic responses sampled from the opponent."""
        return self is not LossType.SFT

    @property
    def uses_proto(self) -> bool:
        """Whether the loss needs a proto-synthetic response per prompt, drawn once from the start model."""
        return self is LossType.TSPIN

    @property
    def length_normalized(self) -> bool:
        """Whether the loss needs response lengths (number of response tokens)."""
        return self is LossType.SIMPO

    @property
    def default_beta(self) -> float | None:
        """β used by :func:`compute_loss` when none is given (None: the loss has no β)."""
        return _DEFAULT_BETA.get(self)


# SPACE: the paper's objective has no β (β = 1).
# SPIN: λ = 0.1, the value of its experiments (arXiv 2401.01335).
# S-SimPO: β = 2.0 and γ = 1.0 (γ/β = 0.5), the Llama-3-Base setting of SimPO (arXiv 2405.14734,
# training_configs/llama-3-8b-base-simpo.yaml in the authors' repository).
# T-SPIN: α = 1.0, the default of its experiments (arXiv 2601.08198, Sec. 4.3).
_DEFAULT_BETA: dict[LossType, float] = {
    LossType.SPACE: 1.0,
    LossType.SPIN: 0.1,
    LossType.SPIN_HINGE: 0.1,
    LossType.SIMPO: 2.0,
    LossType.TSPIN: 1.0,
}

DEFAULT_HISTORY_WEIGHT = 0.1
"""T-SPIN's β, the weight of the historical advantage: 0.1 in the paper's experiments (Sec. 4.3)."""


@dataclass(frozen=True)
class LossOutput:
    """Per-prompt losses and detached rewards of one batch."""

    losses: Tensor
    """[B] loss of each prompt; the caller reduces."""
    real_rewards: Tensor
    """[B] reward of the real response (detached)."""
    synthetic_rewards: Tensor
    """[B, K] rewards of the synthetic responses (detached)."""
    proto_rewards: Tensor | None = None
    """[B] rewards of the proto-synthetic responses (detached); None for losses without them."""


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _check_pair_shapes(real: Tensor, synthetic: Tensor, what: str) -> None:
    if real.dim() != 1:
        raise ValueError(f"{what}: real tensor must have shape [B], got {tuple(real.shape)}")
    if synthetic.dim() != 2:
        raise ValueError(f"{what}: synthetic tensor must have shape [B, K], got {tuple(synthetic.shape)}")
    if synthetic.shape[0] != real.shape[0]:
        raise ValueError(
            f"{what}: batch sizes differ: real has B={real.shape[0]}, synthetic has B={synthetic.shape[0]}"
        )
    if synthetic.shape[1] == 0:
        raise ValueError(f"{what}: synthetic tensor has K=0; this loss needs at least one synthetic response")


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def _check_finite(**tensors: Tensor) -> None:
    # One host sync per call; cheap next to a forward pass, and a NaN/inf log-prob would otherwise
    # silently turn into a NaN loss (or worse, a finite loss with a NaN gradient).
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or ±inf)")


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v}")


def _check_lengths(lengths: Tensor, name: str) -> None:
    if not bool((lengths > 0).all()):
        raise ValueError(f"{name} must be > 0 everywhere (number of response tokens)")


def _check_opponent_inputs(
    what: str,
    policy_real: Tensor,
    policy_synthetic: Tensor,
    opponent_real: Tensor,
    opponent_synthetic: Tensor,
) -> None:
    """Shapes ([B] and [B, K], policy and opponent alike) and finiteness of a reward-based loss's inputs."""
    _check_pair_shapes(policy_real, policy_synthetic, f"{what}(policy)")
    _check_same_shape(policy_real, opponent_real, "policy_real_logps", "opponent_real_logps")
    _check_same_shape(
        policy_synthetic, opponent_synthetic, "policy_synthetic_logps", "opponent_synthetic_logps"
    )
    _check_finite(
        policy_real_logps=policy_real,
        policy_synthetic_logps=policy_synthetic,
        opponent_real_logps=opponent_real,
        opponent_synthetic_logps=opponent_synthetic,
    )


def _softplus(z: Tensor) -> Tensor:
    """log(1 + e^z), exact and stable for any |z| (no threshold switch as in ``F.softplus``)."""
    return -F.logsigmoid(-z)


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------


def space_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_synthetic_logps: Tensor,
    *,
    mu: float = 1.0,
    beta: float = 1.0,
) -> LossOutput:
    """SPACE: self-play as noise-contrastive estimation (arXiv 2512.07175, the SPACE objective).

    With σ_μ(z) = 1 / (1 + μ·e^(−z)) and r = β·(log p_θ − log p_θt), per prompt

        L = −log σ_μ(r_real) − μ · mean_j log(1 − σ_μ(r_syn_j))
          = softplus(log μ − r_real) + μ · mean_j softplus(r_syn_j − log μ)

    The real and synthetic terms are optimised independently; for the population objective with
    β = 1 the minimiser is p_θ = p_data whatever the opponent (Theorem 2), and p_θt = p_data is a
    fixed point (Theorem 3). Stable for |r| in the thousands: no exponential is ever formed.

    Args:
        policy_real_logps: [B] summed log p_θ(y|x).
        policy_synthetic_logps: [B, K] summed log p_θ(y'_j|x).
        opponent_real_logps: [B] summed log p_θt(y|x).
        opponent_synthetic_logps: [B, K] summed log p_θt(y'_j|x).
        mu: noise ratio μ > 0 (the seed recommends 1; K = μ samples per prompt by default).
        beta: scale of the log-ratio, > 0 (1 is the paper's objective).
    """
    _check_positive(mu=mu, beta=beta)
    _check_opponent_inputs(
        "space_loss", policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps
    )
    real_rewards = beta * (policy_real_logps - opponent_real_logps)  # [B]
    synthetic_rewards = beta * (policy_synthetic_logps - opponent_synthetic_logps)  # [B, K]
    log_mu = math.log(mu)
    # SPACE objective, softplus form: softplus(log μ − r_real) + μ · mean_j softplus(r_syn_j − log μ)
    losses = _softplus(log_mu - real_rewards) + mu * _softplus(synthetic_rewards - log_mu).mean(dim=-1)
    return LossOutput(losses, real_rewards.detach(), synthetic_rewards.detach())


def spin_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_synthetic_logps: Tensor,
    *,
    beta: float = 0.1,
    kind: str = "sigmoid",
) -> LossOutput:
    """SPIN (arXiv 2401.01335, the L_SPIN objective of Sec. 4): mean_j ℓ(r_real − r_syn_j).

    r = β·(log p_θ − log p_θt) with β = λ = 0.1 (the paper's setting). ℓ(z) = −log σ(z) (``kind="sigmoid"``,
    the paper's logistic loss) or max(0, 1 − z) (``kind="hinge"``). The loss depends on the rewards only
    through their difference, so a synthetic response identical to the real one gives a constant loss and
    a zero gradient.

    Args:
        policy_real_logps: [B] summed log p_θ(y|x).
        policy_synthetic_logps: [B, K] summed log p_θ(y'_j|x).
        opponent_real_logps: [B] summed log p_θt(y|x).
        opponent_synthetic_logps: [B, K] summed log p_θt(y'_j|x).
        beta: λ > 0.
        kind: ``"sigmoid"`` or ``"hinge"``.
    """
    if kind not in ("sigmoid", "hinge"):
        raise ValueError(f"spin_loss: kind must be 'sigmoid' or 'hinge', got {kind!r}")
    _check_positive(beta=beta)
    _check_opponent_inputs(
        "spin_loss", policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps
    )
    real_rewards = beta * (policy_real_logps - opponent_real_logps)  # [B]
    synthetic_rewards = beta * (policy_synthetic_logps - opponent_synthetic_logps)  # [B, K]
    margins = real_rewards.unsqueeze(-1) - synthetic_rewards  # [B, K]
    # L_SPIN: ℓ(λ log p_θ(y)/p_θt(y) − λ log p_θ(y')/p_θt(y'))
    pair_losses = -F.logsigmoid(margins) if kind == "sigmoid" else F.relu(1.0 - margins)
    return LossOutput(pair_losses.mean(dim=-1), real_rewards.detach(), synthetic_rewards.detach())


def ipo_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_synthetic_logps: Tensor,
    *,
    tau: float = 0.1,
) -> LossOutput:
    """S-IPO: IPO (arXiv 2310.12036, Eq. 17) with the opponent as reference and y' as the loser.

    h_j = (log p_θ(y) − log p_θt(y)) − (log p_θ(y'_j) − log p_θt(y'_j)),  L = mean_j (h_j − 1/(2τ))².
    τ = 0.1 (a target margin of 5 nats) is the value most used with IPO in practice; the rewards are the
    unscaled log-ratios.

    Args:
        policy_real_logps: [B] summed log p_θ(y|x).
        policy_synthetic_logps: [B, K] summed log p_θ(y'_j|x).
        opponent_real_logps: [B] summed log p_θt(y|x).
        opponent_synthetic_logps: [B, K] summed log p_θt(y'_j|x).
        tau: regularisation τ > 0.
    """
    _check_positive(tau=tau)
    _check_opponent_inputs(
        "ipo_loss", policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps
    )
    real_rewards = policy_real_logps - opponent_real_logps  # [B]
    synthetic_rewards = policy_synthetic_logps - opponent_synthetic_logps  # [B, K]
    h = real_rewards.unsqueeze(-1) - synthetic_rewards  # [B, K]
    # IPO Eq. 17: (h − 1/(2τ))²
    losses = ((h - 1.0 / (2.0 * tau)) ** 2).mean(dim=-1)
    return LossOutput(losses, real_rewards.detach(), synthetic_rewards.detach())


def simpo_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    real_lengths: Tensor,
    synthetic_lengths: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> LossOutput:
    """S-SimPO: SimPO (arXiv 2405.14734, Eq. 6) with y' from the opponent as the loser; reference-free.

    L = mean_j −log σ(β/|y|·log p_θ(y) − β/|y'_j|·log p_θ(y'_j) − γ), with |·| the number of response
    tokens, so the reward is the β-scaled *average* token log-prob (not TRL's ``sigmoid_norm``).
    Defaults β = 2.0, γ = 1.0 (γ/β = 0.5) are the SimPO authors' Llama-3-Base setting.

    Args:
        policy_real_logps: [B] summed log p_θ(y|x).
        policy_synthetic_logps: [B, K] summed log p_θ(y'_j|x).
        real_lengths: [B] number of response tokens of y (> 0).
        synthetic_lengths: [B, K] number of response tokens of each y'_j (> 0).
        beta: reward scale β > 0.
        gamma: target reward margin γ.
    """
    _check_pair_shapes(policy_real_logps, policy_synthetic_logps, "simpo_loss(policy)")
    _check_same_shape(policy_real_logps, real_lengths, "policy_real_logps", "real_lengths")
    _check_same_shape(
        policy_synthetic_logps, synthetic_lengths, "policy_synthetic_logps", "synthetic_lengths"
    )
    _check_positive(beta=beta)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    _check_finite(policy_real_logps=policy_real_logps, policy_synthetic_logps=policy_synthetic_logps)
    _check_lengths(real_lengths, "real_lengths")
    _check_lengths(synthetic_lengths, "synthetic_lengths")
    real_rewards = beta * policy_real_logps / real_lengths.to(policy_real_logps.dtype)  # [B]
    synthetic_rewards = beta * policy_synthetic_logps / synthetic_lengths.to(policy_synthetic_logps.dtype)
    # SimPO Eq. 6: −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ)
    pair_losses = -F.logsigmoid(real_rewards.unsqueeze(-1) - synthetic_rewards - gamma)  # [B, K]
    return LossOutput(pair_losses.mean(dim=-1), real_rewards.detach(), synthetic_rewards.detach())


def tspin_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    policy_proto_logps: Tensor,
    *,
    alpha: float = 1.0,
    history_weight: float = DEFAULT_HISTORY_WEIGHT,
) -> LossOutput:
    """T-SPIN: triplet-based self-play (arXiv 2601.08198, Eq. 7); reference-free.

    The reward is the policy's own scaled log-likelihood, c(x, u) = α·log p_θ(u|x) (Eq. 6, from the
    entropy-regularised opponent of Eq. 5 and Proposition 1), and with ℓ(z) = −log σ(z) per prompt

        L = mean_j ℓ(c(y) − c(y'_j)) + β · mean_j ℓ(c(y'_j) − c(y0))

    the current advantage of the real y over the synthetic y'_j ~ p_θt plus β times the historical
    advantage of y'_j over the proto-synthetic y0 ~ p_θ0 (Eq. 4 with the class of Eq. 6). Defaults
    α = 1, β = 0.1 are the paper's (Sec. 4.3). No opponent log-probs enter, so the loss is not stationary
    at p_θ = p_θt: with y' = y the current term is ℓ(0) with zero gradient, but in expectation over
    y, y' from the same distribution it pulls the policy towards the uniform distribution (the lab
    measures this; docs/THEORY_LAB.md).

    Args:
        policy_real_logps: [B] summed log p_θ(y|x).
        policy_synthetic_logps: [B, K] summed log p_θ(y'_j|x).
        policy_proto_logps: [B] summed log p_θ(y0|x) of the proto-synthetic response.
        alpha: reward scale α > 0 (the entropy coefficient of Eq. 5).
        history_weight: β ≥ 0, the weight of the historical advantage.
    """
    _check_pair_shapes(policy_real_logps, policy_synthetic_logps, "tspin_loss(policy)")
    _check_same_shape(policy_real_logps, policy_proto_logps, "policy_real_logps", "policy_proto_logps")
    _check_positive(alpha=alpha)
    if not (math.isfinite(history_weight) and history_weight >= 0):
        raise ValueError(f"history_weight must be a finite number >= 0, got {history_weight}")
    _check_finite(
        policy_real_logps=policy_real_logps,
        policy_synthetic_logps=policy_synthetic_logps,
        policy_proto_logps=policy_proto_logps,
    )
    real_rewards = alpha * policy_real_logps  # [B]  c = α log p_θ (Eq. 6)
    synthetic_rewards = alpha * policy_synthetic_logps  # [B, K]
    proto_rewards = alpha * policy_proto_logps  # [B]
    # Eq. 7, first term: ℓ(α log p_θ(y) − α log p_θ(y'))
    current = -F.logsigmoid(real_rewards.unsqueeze(-1) - synthetic_rewards).mean(dim=-1)  # [B]
    # Eq. 7, second term: β·ℓ(α log p_θ(y') − α log p_θ(y0))
    history = -F.logsigmoid(synthetic_rewards - proto_rewards.unsqueeze(-1)).mean(dim=-1)  # [B]
    return LossOutput(
        current + history_weight * history,
        real_rewards.detach(),
        synthetic_rewards.detach(),
        proto_rewards.detach(),
    )


def sft_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Mean token negative log-likelihood of each sequence.

    Args:
        token_logps: [B, L] log p_θ of each target token (values under ``mask == 0`` are ignored,
            even if non-finite).
        mask: [B, L] 1 for response tokens, 0 for prompt and padding; every row needs a 1.

    Returns:
        [B] −Σ_t mask·log p / Σ_t mask.
    """
    if token_logps.dim() != 2:
        raise ValueError(f"sft_loss: token_logps must have shape [B, L], got {tuple(token_logps.shape)}")
    _check_same_shape(token_logps, mask, "token_logps", "mask")
    keep = mask.bool()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("sft_loss: mask must contain only 0 and 1")
    counts = keep.sum(dim=-1)  # [B]
    if not bool((counts > 0).all()):
        raise ValueError("sft_loss: every sequence needs at least one response token in mask")
    if not bool(torch.isfinite(token_logps[keep]).all()):
        raise ValueError("token_logps contains non-finite values under the mask")
    # where(), not a product: a masked -inf times 0 would be NaN.
    summed = torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)
    return -summed / counts.to(token_logps.dtype)


def compute_loss(
    loss_type: LossType,
    *,
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    opponent_real_logps: Tensor | None = None,
    opponent_synthetic_logps: Tensor | None = None,
    real_lengths: Tensor | None = None,
    synthetic_lengths: Tensor | None = None,
    policy_proto_logps: Tensor | None = None,
    mu: float = 1.0,
    beta: float | None = None,
    tau: float = 0.1,
    gamma: float = 1.0,
    history_weight: float = DEFAULT_HISTORY_WEIGHT,
) -> LossOutput:
    """Dispatch to the loss of ``loss_type``.

    ``beta=None`` means the method's default (:attr:`LossType.default_beta`): 1.0 for SPACE, 0.1 for
    SPIN, 2.0 for S-SimPO, 1.0 for T-SPIN (its α); S-IPO and SFT have no β. T-SPIN needs
    ``policy_proto_logps`` [B] and weighs its historical term by ``history_weight`` (its β). Arguments
    a loss does not use are ignored.

    SFT is the mean token NLL of the real response, −log p_θ(y) / |y|, from the summed log-prob and
    ``real_lengths``; ``policy_synthetic_logps`` may be an empty [B, 0] tensor. Its rewards are
    log p_θ(y) (detached) and an empty [B, 0]. For the maximum-likelihood (token-averaged) reduction,
    reduce as ``(losses * real_lengths).sum() / real_lengths.sum()``.
    """
    loss_type = LossType(loss_type)
    if beta is None:
        beta = loss_type.default_beta if loss_type.default_beta is not None else 1.0
    if loss_type is LossType.SFT:
        return _sft_from_sums(policy_real_logps, real_lengths)
    if loss_type is LossType.SIMPO:
        if real_lengths is None or synthetic_lengths is None:
            raise ValueError("loss simpo: needs real_lengths and synthetic_lengths")
        return simpo_loss(
            policy_real_logps, policy_synthetic_logps, real_lengths, synthetic_lengths, beta=beta, gamma=gamma
        )
    if loss_type is LossType.TSPIN:
        if policy_proto_logps is None:
            raise ValueError("loss tspin: needs policy_proto_logps (the proto-synthetic responses)")
        return tspin_loss(
            policy_real_logps,
            policy_synthetic_logps,
            policy_proto_logps,
            alpha=beta,
            history_weight=history_weight,
        )
    if opponent_real_logps is None or opponent_synthetic_logps is None:
        raise ValueError(f"loss {loss_type}: needs opponent_real_logps and opponent_synthetic_logps")
    logps = (policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps)
    match loss_type:
        case LossType.SPACE:
            return space_loss(*logps, mu=mu, beta=beta)
        case LossType.SPIN:
            return spin_loss(*logps, beta=beta, kind="sigmoid")
        case LossType.SPIN_HINGE:
            return spin_loss(*logps, beta=beta, kind="hinge")
        case LossType.IPO:
            return ipo_loss(*logps, tau=tau)
    raise ValueError(f"unhandled loss type {loss_type}")  # pragma: no cover


def _sft_from_sums(policy_real_logps: Tensor, real_lengths: Tensor | None) -> LossOutput:
    """SFT on summed log-probs: −log p_θ(y) / |y| per prompt."""
    if real_lengths is None:
        raise ValueError("loss sft: needs real_lengths (number of response tokens) to average the NLL")
    if policy_real_logps.dim() != 1:
        shape = tuple(policy_real_logps.shape)
        raise ValueError(f"loss sft: policy_real_logps must have shape [B], got {shape}")
    _check_same_shape(policy_real_logps, real_lengths, "policy_real_logps", "real_lengths")
    _check_finite(policy_real_logps=policy_real_logps)
    _check_lengths(real_lengths, "real_lengths")
    losses = -policy_real_logps / real_lengths.to(policy_real_logps.dtype)
    empty = policy_real_logps.new_zeros(policy_real_logps.shape[0], 0)
    return LossOutput(losses, policy_real_logps.detach(), empty)
