"""Two measurements benchmarks/gpu_check.py adds to its self-play iteration, each on the model alone.

`train_step_probe`: a plain causal-LM train step (forward, backward, AdamW) on random token ids, eager
and, with `compile=True`, under `torch.compile`, with its MFU: 6 × matmul parameters × tokens per second
over the peak (attention's own FLOPs are left out, as in the iteration's MFU). spaceft has no compile
setting, so this is where the compile speed-up is measured before anyone adds one.

`generation_probe`: the HF backend (spaceft.generate.HFGenerator, the generate stage's own sampler) on
random prompts: sampled tokens per second, then a short second run under torch.profiler whose top
operators by device time (CPU time without a GPU) show whether the model or the sampler bounds decoding.
The sampler's calls run inside a `spaceft.RowSampler` range, so its share is one row of the table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

H100_SXM_BF16_PEAK = 989e12
"""NVIDIA's dense bf16 tensor-core peak of an H100 SXM (FLOP/s), the same figure for an H200; every
MFU here divides by it. A measured 8192³ bf16 matrix product reaches about 790e12 on the lent H200."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_probe_model(model_dir: str, precision: str, attn: str | None, device: torch.device) -> Any:
    """The model as gpu_check's precision trains it: bf16 weights for `bf16`, float32 ones otherwise."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return model.to(device)


def train_step_probe(
    model: Any, *, precision: str, matmul_params: int, device: torch.device, micro_batch: int = 16,
    seq_len: int = 512, steps: int = 5, compile: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Seconds per train step of `micro_batch` × `seq_len` random tokens, eager then (if asked) compiled;
    the compiled row also gives its first step's seconds (the compilation)."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (micro_batch, seq_len), generator=gen).to(device)
    amp = precision == "amp"
    result: dict[str, Any] = {"micro_batch": micro_batch, "seq_len": seq_len, "steps": steps,
                              "peak_flops": H100_SXM_BF16_PEAK}  # fmt: skip
    variants = [("eager", model)] + ([("compiled", torch.compile(model))] if compile else [])
    for name, net in variants:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
        model.train()

        def step(net: Any = net, opt: torch.optim.Optimizer = opt) -> None:
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
            with ctx:
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        tic = time.perf_counter()
        step()  # warm-up: allocations, kernel choice, and for `compiled` the compilation
        _sync(device)
        first = time.perf_counter() - tic
        tic = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - tic) / steps
        tokens = micro_batch * seq_len / seconds
        result[name] = {"first_step_s": round(first, 3), "step_s": round(seconds, 4),
                        "tokens_per_s": round(tokens, 1),
                        "mfu": round(6 * matmul_params * tokens / H100_SXM_BF16_PEAK, 4)}  # fmt: skip
        del opt
    return result


def _ops_table(prof: Any, device: torch.device, top: int) -> list[dict[str, Any]]:
    """The profile's top operators by self time on the device (on the CPU without a GPU), in ms."""

    def self_ms(e: Any, kind: str) -> float:
        return getattr(e, f"self_{kind}_time_total", 0.0) / 1000

    def total_ms(e: Any, kind: str) -> float:
        return getattr(e, f"{kind}_time_total", 0.0) / 1000

    kind = "device" if device.type == "cuda" else "cpu"
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: self_ms(e, kind), reverse=True)[:top]
    table = [{"op": e.key, "calls": e.count, f"self_{kind}_ms": round(self_ms(e, kind), 3),
              "self_cpu_ms": round(self_ms(e, "cpu"), 3)} for e in rows]  # fmt: skip
    for e in events:  # the sampler's whole range, children included
        if e.key == "spaceft.RowSampler":
            table.append({"op": e.key, "calls": e.count, f"total_{kind}_ms": round(total_ms(e, kind), 3),
                          "total_cpu_ms": round(total_ms(e, "cpu"), 3)})  # fmt: skip
    return table


def generation_probe(
    model: Any, *, prompts: int, samples: int, prompt_len: int, max_new_tokens: int, stop_ids: Sequence[int],
    pad_id: int, device: torch.device, mixed_precision: str = "no", profile_tokens: int = 16, top: int = 15,
) -> dict[str, Any]:  # fmt: skip
    """Sampled tokens/s of the HF backend for `prompts` random prompts × `samples` at temperature 1, then
    a `profile_tokens`-token run of the same batch under torch.profiler."""
    from spaceft import generate
    from spaceft.config import GenerationConfig

    gen = torch.Generator().manual_seed(1)
    # ids below the stop ids' neighbourhood are ordinary pieces in both tokenizers gpu_check uses
    pool = model.config.vocab_size
    batch = [torch.randint(10, pool, (prompt_len,), generator=gen).tolist() for _ in range(prompts)]
    seeds = list(range(prompts))

    def run(tokens: int) -> tuple[float, int]:
        cfg = GenerationConfig(num_samples=samples, max_new_tokens=tokens)
        hf = generate.HFGenerator(model, cfg, stop_ids=stop_ids, pad_id=pad_id, device=device,
                                  mixed_precision=mixed_precision)  # fmt: skip
        _sync(device)
        tic = time.perf_counter()
        out = hf.generate(batch, num_samples=samples, seeds=seeds)
        _sync(device)
        return time.perf_counter() - tic, sum(len(c.response_ids) for group in out for c in group)

    run(2)  # warm-up
    seconds, sampled = run(max_new_tokens)
    result: dict[str, Any] = {
        "rows": prompts * samples, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
        "mixed_precision": mixed_precision, "seconds": round(seconds, 3), "sampled_tokens": sampled,
        "tokens_per_s": round(sampled / seconds, 1),
    }  # fmt: skip

    class RangedSampler(generate.RowSampler):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            with torch.profiler.record_function("spaceft.RowSampler"):
                return super().__call__(input_ids, scores)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    plain, generate.RowSampler = generate.RowSampler, RangedSampler  # what HFGenerator.generate builds
    try:
        with torch.profiler.profile(activities=activities) as prof:
            seconds, sampled = run(profile_tokens)
    finally:
        generate.RowSampler = plain
    result["profile"] = {"tokens": profile_tokens, "seconds": round(seconds, 3), "sampled_tokens": sampled,
                         "ops": _ops_table(prof, device, top)}  # fmt: skip
    return result
