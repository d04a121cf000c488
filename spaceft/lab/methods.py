"""The methods the lab compares, and their objectives on the lab's exact log-prob tables.

A :class:`Method` is a :class:`~spaceft.losses.LossType` plus its hyper-parameters and K. Its
:meth:`Method.outputs` gathers the log-probs of a batch of (prompt, real, synthetic[, proto]) response
indices from full ``[P, R]`` tables and calls :func:`spaceft.losses.compute_loss`, so the lab exercises
the library's real losses. The reduction is a weighted mean: weights 1 in sampled mode, the exact
probabilities p_data(y)·p_θt(y') (times p_θ0(y0) for T-SPIN) in population mode; SFT weights each
sequence by its length as well,
which makes it token-averaged, i.e. maximum likelihood (the per-sequence mean token NLL alone would
favour short responses and miss p_data even with infinite data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import Tensor

from spaceft.losses import LossOutput, LossType, compute_loss

METHOD_NAMES = ("sft", "spin", "spin_hinge", "ipo", "simpo", "space", "tspin")
DEFAULT_METHODS = ("sft", "spin", "ipo", "simpo", "space", "tspin")


@dataclass(frozen=True)
class Method:
    """One objective with its settings."""

    key: str
    """Identifier in lab.json, e.g. ``space_mu3``."""
    label: str
    """Name in tables and plots, e.g. ``SPACE μ=3``."""
    loss_type: LossType
    """The objective (:mod:`spaceft.losses`)."""
    num_synthetic: int = 1
    """K, synthetic responses per real one (0 for SFT)."""
    mu: float = 1.0
    """SPACE's noise ratio μ."""
    beta: float | None = None
    """β (None: the loss's default, :attr:`~spaceft.losses.LossType.default_beta`)."""
    tau: float = 0.1
    """S-IPO's τ."""
    gamma: float = 1.0
    """S-SimPO's margin γ."""
    history_weight: float = 0.1
    """T-SPIN's β, the weight of its historical term."""
    history_start: int = 2
    """First iteration (1-based, as the lab counts) whose T-SPIN loss has the historical term: the
    paper sets β = 0 in its first iteration, where y' and y0 both come from the start model."""

    def at_iteration(self, iteration: int) -> Method:
        """The method as lab iteration ``iteration`` (1-based) runs it: T-SPIN has β = 0 before
        ``history_start``."""
        if self.loss_type.uses_proto and iteration < self.history_start:
            return replace(self, history_weight=0.0)
        return self

    def outputs(
        self,
        policy_logps: Tensor,
        opponent_logps: Tensor | None,
        lengths: Tensor,
        prompt: Tensor,
        real: Tensor,
        synthetic: Tensor,
        proto: Tensor | None = None,
    ) -> LossOutput:
        """The loss of each (prompt, real, synthetic[, proto]) item.

        Args:
            policy_logps: [P, R] log p_θ of every response.
            opponent_logps: [P, R] log p_θt (detached), or None for methods that need no opponent.
            lengths: [R] generated tokens per response.
            prompt: [B] prompt index; real: [B] real response index; synthetic: [B, K] response indices.
            proto: [B] proto-synthetic response index (methods that use one; see ``LossType.uses_proto``).
        """
        rows = prompt.unsqueeze(-1)  # [B, 1]
        opp_real = opp_syn = None
        if self.loss_type.needs_opponent:
            if opponent_logps is None:
                raise ValueError(f"method {self.key} needs the opponent's log-probs")
            opp_real, opp_syn = opponent_logps[prompt, real], opponent_logps[rows, synthetic]
        policy_proto = None
        if self.loss_type.uses_proto:
            if proto is None:
                raise ValueError(f"method {self.key} needs proto-synthetic responses")
            policy_proto = policy_logps[prompt, proto]  # [B]
        return self.loss(
            policy_logps[prompt, real],  # [B]
            policy_logps[rows, synthetic],  # [B, K]
            opp_real,
            opp_syn,
            lengths[real],
            lengths[synthetic],
            policy_proto,
        )

    def loss(
        self,
        policy_real: Tensor,
        policy_synthetic: Tensor,
        opponent_real: Tensor | None,
        opponent_synthetic: Tensor | None,
        real_lengths: Tensor,
        synthetic_lengths: Tensor,
        policy_proto: Tensor | None = None,
    ) -> LossOutput:
        """:func:`spaceft.losses.compute_loss` with this method's settings, on gathered log-probs."""
        return compute_loss(
            self.loss_type,
            policy_real_logps=policy_real,
            policy_synthetic_logps=policy_synthetic,
            opponent_real_logps=opponent_real,
            opponent_synthetic_logps=opponent_synthetic,
            real_lengths=real_lengths,
            synthetic_lengths=synthetic_lengths,
            policy_proto_logps=policy_proto,
            mu=self.mu,
            beta=self.beta,
            tau=self.tau,
            gamma=self.gamma,
            history_weight=self.history_weight,
        )

    def reduce(self, out: LossOutput, real_lengths: Tensor, weights: Tensor | None = None) -> Tensor:
        """Weighted mean of the per-example losses (token-weighted for SFT); a scalar."""
        w = out.losses.new_ones(out.losses.shape) if weights is None else weights
        if self.loss_type is LossType.SFT:
            w = w * real_lengths
        return (w * out.losses).sum() / w.sum()


def build_methods(
    names: Sequence[str] = DEFAULT_METHODS,
    *,
    mus: Sequence[float] = (1.0, 3.0, 7.0),
    num_synthetic: int | None = None,
    spin_beta: float = 0.1,
    space_beta: float = 1.0,
    tau: float = 0.1,
    simpo_beta: float = 2.0,
    gamma: float = 1.0,
    tspin_alpha: float = 1.0,
    tspin_beta: float = 0.1,
) -> list[Method]:
    """Methods in the order given; ``space`` expands to one method per μ.

    K defaults to 1 for the pairwise losses (SPIN's one synthetic response per prompt) and to
    round(μ) for SPACE (the seed's K = μ); ``num_synthetic`` overrides it for all.
    """
    methods: list[Method] = []
    for name in names:
        if name not in METHOD_NAMES:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
        k = 1 if num_synthetic is None else num_synthetic
        if name == "space":
            for mu in mus:
                k_mu = max(1, round(mu)) if num_synthetic is None else num_synthetic
                tag = f"{mu:g}"
                methods.append(
                    Method(f"space_mu{tag}", f"SPACE μ={tag}", LossType.SPACE, k_mu, mu=mu, beta=space_beta)
                )
        elif name == "sft":
            methods.append(Method("sft", "SFT", LossType.SFT, 0))
        elif name in ("spin", "spin_hinge"):
            label = "SPIN" if name == "spin" else "SPIN (hinge)"
            methods.append(Method(name, label, LossType(name), k, beta=spin_beta))
        elif name == "ipo":
            methods.append(Method("ipo", "S-IPO", LossType.IPO, k, tau=tau))
        elif name == "tspin":
            tspin = Method("tspin", "T-SPIN", LossType.TSPIN, k, beta=tspin_alpha, history_weight=tspin_beta)
            methods.append(tspin)
        else:
            methods.append(Method("simpo", "S-SimPO", LossType.SIMPO, k, beta=simpo_beta, gamma=gamma))
    keys = [m.key for m in methods]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate methods: {keys}")
    if any(m.num_synthetic < 1 for m in methods if m.loss_type.uses_synthetic):
        raise ValueError("num_synthetic (K) must be >= 1")
    return methods
