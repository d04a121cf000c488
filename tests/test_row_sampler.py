"""The HF backend's counter-based exponential race (spaceft.generate.race_noise, RowSampler).

Batch independence at the generate level and the per-step frequencies over many rows are in
tests/test_distributed.py; these check the noise itself and the sampler over the decoding steps of one row.
"""

from __future__ import annotations

import pytest
import torch

from spaceft.config import GenerationConfig
from spaceft.generate import RowSampler, race_noise

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


def test_noise_is_splitmix64_of_the_row_key_and_step() -> None:
    """Entry [r, v] is -log((2k + 1) / 2^53), k the top 52 bits of output v + 1 of the splitmix64 stream
    started at mix(seed_r · 2^32 + step), where mix is splitmix64's output function (its first output
    from state s - golden): all worked in Python integers and float64 here."""
    seeds, step, vocab = [0, 7, 2**32 - 1], 5, 6
    noise = race_noise(torch.tensor(seeds), step, vocab)
    for r, seed in enumerate(seeds):
        start = ((seed << 32) + step - 0x9E3779B97F4A7C15) & M64
        key = splitmix64(start, 1)[0]
        for v, bits in enumerate(splitmix64(key, vocab)):
            u = (2 * (bits >> 12) + 1) / 2**53
            expected = torch.tensor(-torch.log(torch.tensor(u, dtype=torch.float64)).item()).float()
            assert noise[r, v] == expected, (r, v)


def test_noise_depends_only_on_the_row_seed_and_step() -> None:
    """A row's noise is the same alone or among other rows, changes with the step, and is Exp(1):
    mean 1 and variance 1 within 5 standard errors over 200k draws."""
    together = race_noise(torch.tensor([3, 11, 5]), 4, 1000)
    assert torch.equal(race_noise(torch.tensor([11]), 4, 1000)[0], together[1])
    assert not torch.equal(race_noise(torch.tensor([11]), 5, 1000)[0], together[1])
    draws = race_noise(torch.arange(200), 0, 1000).double().flatten()
    assert bool((draws > 0).all() and draws.isfinite().all())
    n = draws.numel()
    assert abs(draws.mean().item() - 1) < 5 * (1 / n) ** 0.5
    assert abs(draws.var().item() - 1) < 5 * (8 / n) ** 0.5  # Var of (E - 1)^2 for Exp(1) is 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_bits_are_the_same_on_cuda() -> None:
    """int64 wrap-around and shifts give the same bits on CUDA as on CPU, so a sample does not depend on
    the device either (up to the logits' own rounding)."""
    seeds = torch.tensor([0, 1, 2**31, 2**32 - 1, 123456789])
    cpu = race_noise(seeds, 17, 49152)
    assert torch.equal(race_noise(seeds.cuda(), 17, 49152).cpu(), cpu)


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
