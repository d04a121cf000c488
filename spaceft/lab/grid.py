"""The lab's grid: every method × seed in population and/or sampled mode, gathered into one result.

The result is a plain JSON-able dict (the content of ``lab.json``)::

    {"config": {...}, "world": {...}, "methods": [...], "versions": {...}, "wall_time_s": ...,
     "population": {"seeds": {"0": {method_key: [record per iteration]}}},
     "sampled": {"seeds": {"0": {"data": {...}, "methods": {method_key: [record per iteration]}}}}}

Iteration 0 is the starting model in both modes.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from spaceft.lab.methods import DEFAULT_METHODS, Method, build_methods
from spaceft.lab.population import PopulationConfig, run_population_seed
from spaceft.lab.sampled import SampledConfig, run_sampled_seed
from spaceft.lab.world import World, WorldConfig

logger = logging.getLogger(__name__)

MODES = ("both", "population", "sampled")


@dataclass(frozen=True)
class LabConfig:
    """Everything a lab run depends on."""

    world: WorldConfig = field(default_factory=WorldConfig)
    """The toy world and its teacher."""
    sampled: SampledConfig = field(default_factory=SampledConfig)
    """Sampled-mode settings (N, T, E, lr, model)."""
    population: PopulationConfig = field(default_factory=PopulationConfig)
    """Population-mode settings (iterations, L-BFGS steps, start)."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    """Method families; ``space`` expands to one run per μ."""
    mus: tuple[float, ...] = (1.0, 3.0, 7.0)
    """SPACE noise ratios μ."""
    num_synthetic: int | None = None
    """K for every method; None: round(μ) for SPACE, 1 for the pairwise losses."""
    spin_beta: float = 0.1
    """SPIN's λ (β)."""
    space_beta: float = 1.0
    """SPACE's β (1 is the paper's objective)."""
    tau: float = 0.1
    """S-IPO's τ."""
    simpo_beta: float = 2.0
    """S-SimPO's β."""
    gamma: float = 1.0
    """S-SimPO's margin γ."""
    tspin_alpha: float = 1.0
    """T-SPIN's α, the reward scale of c = α·log p_θ (the paper's 1.0)."""
    tspin_beta: float = 0.1
    """T-SPIN's β, the weight of the historical term (the paper's 0.1; 0 from the first iteration)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the real set, the synthetic draws and the initial model (the world has its own)."""
    mode: str = "both"
    """``both``, ``population`` or ``sampled``."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if any(not mu > 0 for mu in self.mus):
            raise ValueError(f"every μ must be > 0, got {self.mus}")
        if not (self.tspin_alpha > 0 and self.tspin_beta >= 0):
            raise ValueError(f"T-SPIN needs α > 0 and β >= 0, got {self.tspin_alpha} and {self.tspin_beta}")
        self.build_methods()  # validates names, K and duplicates early

    def build_methods(self) -> list[Method]:
        return build_methods(
            self.methods,
            mus=self.mus,
            num_synthetic=self.num_synthetic,
            spin_beta=self.spin_beta,
            space_beta=self.space_beta,
            tau=self.tau,
            simpo_beta=self.simpo_beta,
            gamma=self.gamma,
            tspin_alpha=self.tspin_alpha,
            tspin_beta=self.tspin_beta,
        )


def run_lab(config: LabConfig) -> dict:
    """Run the grid of ``config``; returns the lab.json content."""
    start = time.perf_counter()
    world = World(config.world)
    methods = config.build_methods()
    result: dict = {
        "config": asdict(config),
        "world": {
            "num_prompts": world.num_prompts,
            "vocab_size": world.vocab_size,
            "num_nodes": world.num_nodes,
            "num_responses": world.num_responses,
            "mean_entropy_of_data": float(-(world.data_logps.exp() * world.data_logps).sum(-1).mean()),
            "mean_length_of_data": float((world.data_logps.exp() * world.lengths).sum(-1).mean()),
        },
        "methods": [
            {
                "key": m.key,
                "label": m.label,
                "loss_type": str(m.loss_type),
                "num_synthetic": m.num_synthetic,
                "mu": m.mu,
                "beta": m.beta if m.beta is not None else m.loss_type.default_beta,
                "tau": m.tau,
                "gamma": m.gamma,
                **({"history_weight": m.history_weight} if m.loss_type.uses_proto else {}),
            }
            for m in methods
        ],
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    modes = (
        ("population", run_population_seed, config.population),
        ("sampled", run_sampled_seed, config.sampled),
    )
    for mode, run_seed, mode_config in modes:
        if config.mode in ("both", mode):
            seeds = {str(seed): run_seed(world, methods, mode_config, seed) for seed in config.seeds}
            result[mode] = {"seeds": seeds}
            logger.info("%s mode done after %.1f s", mode, time.perf_counter() - start)
    result["wall_time_s"] = time.perf_counter() - start
    return result
