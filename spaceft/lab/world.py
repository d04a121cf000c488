"""A world small enough to enumerate: every response, every probability, every divergence exact.

There are P prompts. A response is a string over an alphabet of A letters that ends with the end token
``$`` or is cut at ``max_len`` letters (like ``max_new_tokens``), so the set of responses is finite:
R = Σ_{n=0}^{max_len} A^n strings. An autoregressive model is a table of next-token logits over the
V = A + 1 tokens at every *node* (a prefix shorter than ``max_len``), per prompt: logits ``[P, Nn, V]``.
The log-probability of a response is the sum of its tokens' log-softmax entries, so the whole
distribution ``[P, R]`` is one gather away from the logits and differentiable.

The true distribution p_data is such a table (the *teacher*), drawn once from ``WorldConfig.seed``:
either a free table (``teacher_rank = 0``) or one that shares a rank-r structure across prompts, where a
model with shared parameters can generalise from one prompt to another.

Token 0 is the end token; letters are 1..A. A response's *length* is its number of generated tokens
(letters, plus the end token unless it was cut), the |y| of S-SimPO and of mean-token SFT.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

END = 0
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class WorldConfig:
    """Shape and teacher of the toy world."""

    num_prompts: int = 8
    """P, number of prompts."""
    alphabet_size: int = 3
    """A, number of letters (the vocabulary is A + 1 with the end token)."""
    max_len: int = 3
    """Responses are cut after this many letters."""
    teacher_scale: float = 1.5
    """Standard deviation of the teacher's logits; larger is a more peaked p_data."""
    teacher_rank: int = 0
    """0: a free logit table per prompt; r > 0: logits = bias + rank-r prompt × node interaction."""
    seed: int = 0
    """Seed of the teacher (the world); sampling seeds are separate."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not 1 <= self.alphabet_size <= len(_LETTERS):
            raise ValueError(f"alphabet_size must be in 1..{len(_LETTERS)}, got {self.alphabet_size}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        size = sum(self.alphabet_size**n for n in range(self.max_len + 1))
        if size > 20_000:
            raise ValueError(
                f"{size} responses per prompt is too many to enumerate; lower max_len or alphabet_size"
            )
        if not (math.isfinite(self.teacher_scale) and self.teacher_scale >= 0):
            raise ValueError(f"teacher_scale must be finite and >= 0, got {self.teacher_scale}")
        if self.teacher_rank < 0:
            raise ValueError(f"teacher_rank must be >= 0, got {self.teacher_rank}")


class World:
    """The enumerated response set, the teacher p_data, exact sequence log-probs and exact sampling."""

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        a, n_max = config.alphabet_size, config.max_len
        self.vocab_size = a + 1
        # step 1: nodes are the prefixes shorter than max_len, in order of length then lexicographic
        prefixes = [p for n in range(n_max) for p in itertools.product(range(1, a + 1), repeat=n)]
        node_of = {p: i for i, p in enumerate(prefixes)}
        self.num_nodes = len(prefixes)
        # step 2: responses: every prefix followed by the end token, and every cut string of max_len letters
        responses: list[tuple[int, ...]] = [(*p, END) for p in prefixes]
        responses += list(itertools.product(range(1, a + 1), repeat=n_max))
        self.responses = responses
        self.num_responses = len(responses)
        # step 3: each response as (node, token) steps, flattened to node * V + token, padded and masked
        steps = torch.zeros(self.num_responses, n_max, dtype=torch.long)  # [R, max_len]
        mask = torch.zeros(self.num_responses, n_max, dtype=torch.bool)
        for r, tokens in enumerate(responses):
            for i, tok in enumerate(tokens):
                steps[r, i] = node_of[tokens[:i]] * self.vocab_size + tok
                mask[r, i] = True
        self._steps, self._mask = steps, mask
        self.lengths = mask.sum(-1).to(torch.float64)  # [R] generated tokens per response
        self.teacher_logits = self._draw_teacher()  # [P, Nn, V]
        self.data_logps = self.sequence_logps(self.teacher_logits)  # [P, R]
        logger.debug(
            "world: %d prompts, %d nodes, %d responses", config.num_prompts, self.num_nodes, len(responses)
        )

    @property
    def num_prompts(self) -> int:
        return self.config.num_prompts

    def _draw_teacher(self) -> Tensor:
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (cfg.num_prompts, self.num_nodes, self.vocab_size)
        if cfg.teacher_rank == 0:
            return cfg.teacher_scale * torch.randn(shape, generator=g, dtype=torch.float64)
        r = cfg.teacher_rank
        u = torch.randn(cfg.num_prompts, r, generator=g, dtype=torch.float64)
        w = torch.randn(self.num_nodes, r, self.vocab_size, generator=g, dtype=torch.float64)
        bias = torch.randn(self.num_nodes, self.vocab_size, generator=g, dtype=torch.float64)
        # unit variance per entry before scaling: bias ~ N(0, 1/2), interaction ~ N(0, 1/2)
        logits = bias / math.sqrt(2) + torch.einsum("pd,ndv->pnv", u, w) / math.sqrt(2 * r)
        return cfg.teacher_scale * logits

    def sequence_logps(self, logits: Tensor) -> Tensor:
        """Exact summed log-probs of every response: logits [P, Nn, V] → [P, R] (differentiable)."""
        if logits.shape[1:] != (self.num_nodes, self.vocab_size):
            raise ValueError(
                f"logits must have shape [P, {self.num_nodes}, {self.vocab_size}], got {tuple(logits.shape)}"
            )
        token_logps = torch.log_softmax(logits, dim=-1).flatten(1)  # [P, Nn * V]
        per_step = token_logps[:, self._steps]  # [P, R, max_len]
        return torch.where(self._mask, per_step, torch.zeros_like(per_step)).sum(-1)

    def sample(self, logps: Tensor, num: int, generator: torch.Generator) -> Tensor:
        """Draw ``num`` responses per prompt from exp(logps) [P, R]: indices [P, num].

        Sampling the enumerated distribution is the same law as token-by-token ancestral sampling.
        """
        probs = logps.detach().exp()
        return torch.multinomial(probs, num, replacement=True, generator=generator)

    def render(self, response: int) -> str:
        """A response as text, e.g. ``ab$`` (``$`` is the end token)."""
        return "".join("$" if tok == END else _LETTERS[tok - 1] for tok in self.responses[response])


def kl_divergence(p_logps: Tensor, q_logps: Tensor) -> Tensor:
    """KL(p‖q) = Σ_y p(y)(log p(y) − log q(y)) per prompt, [P, R] × [P, R] → [P]; 0·log 0 = 0."""
    p = p_logps.exp()
    diff = torch.where(p > 0, p_logps - q_logps, torch.zeros_like(p_logps))
    return (p * diff).sum(-1)


def total_variation(p_logps: Tensor, q_logps: Tensor) -> Tensor:
    """TV(p, q) = ½ Σ_y |p(y) − q(y)| per prompt, [P, R] × [P, R] → [P]."""
    return 0.5 * (p_logps.exp() - q_logps.exp()).abs().sum(-1)


def empirical_logps(samples: Tensor, num_responses: int) -> Tensor:
    """Log of the empirical distribution of samples [P, N] over R responses: [P, R], −inf where unseen."""
    counts = torch.zeros(samples.shape[0], num_responses, dtype=torch.float64)
    counts.scatter_add_(1, samples, torch.ones_like(samples, dtype=torch.float64))
    return (counts / samples.shape[1]).log()
