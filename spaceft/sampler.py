"""What a generation backend is and what it returns, shared by every backend and the generate stage.

A backend satisfies `Generator` (load, generate, sleep, close) and gives K `Completion`s per prompt,
each ended by the one stop rule, `cut_at_stop`, so that every backend's samples mean the same thing to
scoring and training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Completion:
    response_ids: tuple[int, ...]
    hit_cap: bool  # True when generation stopped at max_new_tokens without an end-of-turn token


class Sampler(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], *, num_samples: int, seeds: Sequence[int]
    ) -> list[list[Completion]]:
        """K completions for each prompt (prompt i sampled under seeds[i]), in input order."""
        ...


class Generator(Sampler, Protocol):
    """A generation backend, as `open_generator` builds it for the generate stage."""

    kept: bool
    """It stays alive between generate steps: `sleep` after one, `load` the next opponent into it."""

    def load(self, model_path: str) -> None:
        """Sample from the weights saved in `model_path` from now on."""
        ...

    def sleep(self) -> None:
        """Free what memory it can for scoring and training until the next `load`."""
        ...

    def close(self) -> None:
        """Release it for good."""
        ...


def cut_at_stop(ids: Sequence[int], stop_ids: set[int]) -> Completion:
    """Keep tokens up to and including the first stop token; what follows is padding.

    A sequence without a stop token ran to max_new_tokens and is kept whole: HF pads only finished
    sequences, so every token of an unfinished one was sampled (even if it equals the pad id).
    """
    out: list[int] = []
    for tok in ids:
        out.append(int(tok))
        if tok in stop_ids:
            return Completion(tuple(out), hit_cap=False)
    return Completion(tuple(out), hit_cap=True)
