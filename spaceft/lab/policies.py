"""The models p_θ of the lab: a next-token logit table, or a small model shared across prompts.

Both map nothing to logits ``[P, Nn, V]`` (the world has a fixed, enumerable input set), so
:meth:`spaceft.lab.world.World.sequence_logps` turns them into exact response log-probs.

* ``tabular``: one free logit per (prompt, prefix, token). It can represent any autoregressive
  p_data exactly, which is what Theorems 2 and 3 assume; it cannot generalise from one prompt to
  another, or from a visited prefix to an unvisited one.
* ``factored``: logits = b[node] + Σ_d u[prompt, d] · W[node, d, :], a rank-d model whose
  parameters are shared across prompts, so real samples of one prompt move the others.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from spaceft.lab.world import World

POLICY_KINDS = ("tabular", "factored")


class TabularPolicy(nn.Module):
    """A free logit table ``[P, Nn, V]``."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self) -> Tensor:
        return self.logits


class FactoredPolicy(nn.Module):
    """logits[p, n, v] = bias[n, v] + Σ_d prompt[p, d] · node[n, d, v]."""

    def __init__(
        self,
        num_prompts: int,
        num_nodes: int,
        vocab_size: int,
        rank: int,
        init_scale: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        f64 = torch.float64
        self.bias = nn.Parameter(
            init_scale * torch.randn(num_nodes, vocab_size, generator=generator, dtype=f64)
        )
        self.prompt = nn.Parameter(torch.randn(num_prompts, rank, generator=generator, dtype=f64))
        node = torch.randn(num_nodes, rank, vocab_size, generator=generator, dtype=f64)
        self.node = nn.Parameter(init_scale * node / math.sqrt(rank))

    def forward(self) -> Tensor:
        return self.bias + torch.einsum("pd,ndv->pnv", self.prompt, self.node)


def make_policy(
    world: World, kind: str, *, init_scale: float, generator: torch.Generator, rank: int = 4
) -> nn.Module:
    """A fresh model for ``world``: logits ~ N(0, init_scale²) (0 gives the uniform next-token model)."""
    shape = (world.num_prompts, world.num_nodes, world.vocab_size)
    if kind == "tabular":
        return TabularPolicy(init_scale * torch.randn(shape, generator=generator, dtype=torch.float64))
    if kind == "factored":
        if rank < 1:
            raise ValueError(f"factored policy needs rank >= 1, got {rank}")
        return FactoredPolicy(*shape, rank=rank, init_scale=init_scale, generator=generator)
    raise ValueError(f"unknown policy kind {kind!r}; choose one of {', '.join(POLICY_KINDS)}")
