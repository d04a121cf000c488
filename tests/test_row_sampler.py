"""The HF backend's sampler: inversion with a counter-based uniform per row and step (RowSampler).

Batch independence at the generate level and the per-step frequencies over many rows are in
tests/test_distributed.py; these check the uniforms themselves and the sampler over the decoding steps
of one row.
"""

from __future__ import annotations

import pytest
import torch

from spaceft.config import GenerationConfig
from spaceft.generate import RowSampler, mix64, row_uniforms

CPU = torch.device("cpu")
M64 = (1 << 64) - 1


def splitmix64(seed: int, n: int) -> list[int]:
    """The first n outputs of splitmix64 (Steele, Lea & Flood 2014) in plain Python integers."""
    out, state = [], seed
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def test_reference_splitmix64_matches_its_published_outputs() -> None:
    """The reference below is splitmix64: seed 1234567 starts 6457827717110365317, 3203168211198807973
    (the values Vigna's C code prints); seed 0 starts 0xE220A8397B1DCDAF."""
    assert splitmix64(1234567, 2) == [6457827717110365317, 3203168211198807973]
    assert splitmix64(0, 1) == [0xE220A8397B1DCDAF]


def test_uniforms_are_splitmix64_of_the_row_key_and_step() -> None:
    """Row r's U at step t is k / 2^52, k the top 52 bits of output t + 1 of the splitmix64 stream seeded
    with mix(seed_r), where mix is splitmix64's output function (its first output from state
    seed - golden): all worked in Python integers here."""
    seeds, steps = [0, 7, 2**32 - 1], 6
    keys = mix64(torch.tensor(seeds))
    got = torch.stack([row_uniforms(keys, t) for t in range(steps)], 1)  # [R, T]
    for r, seed in enumerate(seeds):
        key = splitmix64((seed - 0x9E3779B97F4A7C15) & M64, 1)[0]
        assert int(keys[r]) & M64 == key
        for t, bits in enumerate(splitmix64(key, steps)):
            assert got[r, t].item() == (bits >> 12) / 2**52, (r, t)


def test_uniforms_depend_only_on_the_row_key_and_step() -> None:
    """A row's U is the same alone or among other rows and changes with the step; over 4 × 50k draws
    U is uniform on [0, 1): mean 1/2 and variance 1/12 within 5 standard errors, none outside [0, 1)."""
    keys = mix64(torch.tensor([3, 11, 5]))
    assert row_uniforms(keys[1:2], 4).item() == row_uniforms(keys, 4)[1].item()
    assert row_uniforms(keys[1:2], 5).item() != row_uniforms(keys, 4)[1].item()
    draws = torch.cat([row_uniforms(mix64(torch.arange(50_000)), t) for t in range(4)])
    assert bool((draws >= 0).all() and (draws < 1).all())
    n = draws.numel()
    assert abs(draws.mean().item() - 1 / 2) < 5 * (1 / 12 / n) ** 0.5
    assert abs(draws.var().item() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # Var((U - 1/2)^2) = 1/180


def test_a_zero_probability_token_is_never_drawn_at_the_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inversion at U's extremes: U = 0 draws the first token of positive probability (not the -inf
    ones before it) and U = 1 - 2^-52 the last (not the -inf ones after it)."""
    sampler = RowSampler([0, 1], GenerationConfig(), CPU, prompt_width=1)
    logits = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf")]] * 2)
    extremes = torch.tensor([0.0, 1 - 2.0**-52], dtype=torch.float64)
    monkeypatch.setattr("spaceft.generate.row_uniforms", lambda keys, step: extremes)
    assert sampler(torch.zeros(2, 1, dtype=torch.long), logits).argmax(-1).tolist() == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uniforms_and_samples_are_the_same_on_cuda() -> None:
    """int64 wrap-around and shifts give the same bits on CUDA as on CPU, so a sample does not depend on
    the device either (up to the logits' own rounding)."""
    keys = mix64(torch.tensor([0, 1, 2**31, 2**32 - 1, 123456789]))
    assert torch.equal(row_uniforms(keys.cuda(), 17).cpu(), row_uniforms(keys, 17))
    logits = torch.randn(64, 49152, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(64, 9, dtype=torch.long)
    cpu = RowSampler(range(64), GenerationConfig(), CPU, prompt_width=4)(ids, logits).argmax(-1)
    cuda = RowSampler(range(64), GenerationConfig(), torch.device("cuda"), prompt_width=4)
    assert torch.equal(cuda(ids.cuda(), logits.cuda()).argmax(-1).cpu(), cpu)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 0.8)])
def test_one_rows_steps_sample_the_tempered_truncated_softmax(
    temperature: float, top_k: int, top_p: float
) -> None:
    """One row over 10000 decoding steps (input_ids one column longer each step): token frequencies
    match the warped softmax within 4 standard errors. Logits [0, 0.5, 1, 1.5, -1] at T = 1 give
    p ∝ [1, 1.649, 2.718, 4.482, 0.368] = [0.098, 0.161, 0.266, 0.439, 0.036]; top-3 keeps tokens 1-3
    ([0.186, 0.307, 0.506] after renormalising) and top-p 0.8 then keeps 3 and 2 (mass before token 1:
    0.506 + 0.307 = 0.814 >= 0.8), so p = [0, 0, 2.718, 4.482, 0] / 7.200 = [0, 0, 0.378, 0.622, 0]."""
    logits = torch.tensor([[0.0, 0.5, 1.0, 1.5, -1.0]])
    cfg = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = RowSampler([42], cfg, CPU, prompt_width=3)
    n = 10000
    picks = torch.tensor(
        [int(sampler(torch.zeros(1, 3 + t, dtype=torch.long), logits.clone()).argmax()) for t in range(n)]
    )
    freq = torch.bincount(picks, minlength=5).double() / n
    probs = torch.softmax(logits[0].double() / temperature, -1)
    if top_k:
        kept = torch.tensor([0, 0, 1.0, 1.5, 0], dtype=torch.float64).exp() * torch.tensor([0, 0, 1, 1, 0])
        probs = kept / kept.sum()
    stderr = (probs * (1 - probs) / n).sqrt()
    assert bool(((freq - probs).abs() <= 4 * stderr + 1e-9).all()), (freq, probs)
