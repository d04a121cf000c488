"""The theory lab: self-play objectives in a toy world where every probability is exact.

A world of P prompts whose responses (short strings with an end token) can all be enumerated, a known
teacher distribution p_data, and small autoregressive models p_θ (a logit table, or a rank-d model
shared across prompts). Two modes, both driven by the library's own losses (:mod:`spaceft.losses`):

* population mode (:mod:`spaceft.lab.population`): exact expectations, no sampling — checks SPACE's
  Theorem 2 (the minimiser is p_data from any start) and Theorem 3 (p_data is a fixed point), and
  T-SPIN's iteration map (it has neither property);
* sampled mode (:mod:`spaceft.lab.sampled`): N fixed real samples per prompt, K synthetic samples per
  iteration, E epochs of RMSProp — what practitioners run, with exact KL bookkeeping.

``spaceft lab`` (:func:`spaceft.lab.cli.main`) runs the default grid and writes lab.json, lab.md and
lab.png. No Hugging Face model is involved; everything runs on CPU in float64.
"""

from spaceft.lab.grid import LabConfig, run_lab
from spaceft.lab.methods import Method, build_methods
from spaceft.lab.population import PopulationConfig, population_objective, run_population_seed
from spaceft.lab.sampled import SampledConfig, run_sampled_seed
from spaceft.lab.world import World, WorldConfig, empirical_logps, kl_divergence, total_variation

__all__ = [
    "LabConfig",
    "Method",
    "PopulationConfig",
    "SampledConfig",
    "World",
    "WorldConfig",
    "build_methods",
    "empirical_logps",
    "kl_divergence",
    "population_objective",
    "run_lab",
    "run_population_seed",
    "run_sampled_seed",
    "total_variation",
]
