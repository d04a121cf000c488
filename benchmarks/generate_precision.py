"""The HF generation backend in float32 and under bf16 autocast (`train.mixed_precision=bf16`).

    python benchmarks/generate_precision.py --prompts 32 --new-tokens 64 --repeats 2

Samples one response for each of the demo recipe's first N training prompts with the embedded default
model, as the generate stage does (each prompt's own seed, temperature 1, the stop rule), alternately
in float32 and under bf16 autocast, in one process with the same thread count, and prints the sampling
time of each (best of the repeats), sampled tokens per second and the ratio. The ratio is the result:
on shared machines the seconds move with the load, the ratio much less. Where bf16 matmuls are fast
(AMX or AVX-512 bf16 CPUs, any recent GPU) the autocast side is faster; elsewhere it may be slower.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from spaceft.configfile import load_config
    from spaceft.generate import HFGenerator, prompt_seed
    from spaceft.recipes import shipped_recipe
    from spaceft.workspace import loaded_model, prepare

    out = Path(tempfile.mkdtemp(prefix="generate-precision-"))
    overrides = [f"output_dir={out}", f"data.train_size={args.prompts}", "logging.progress=false",
                 f"generation.max_new_tokens={args.new_tokens}", f"generation.batch_size={args.prompts}",
                 "eval.enabled=false"]  # fmt: skip
    ws = prepare(load_config(shipped_recipe("demo"), overrides))
    prompts = [list(t.prompt_ids) for t in ws.train_tok]
    seeds = [prompt_seed(ws.cfg.generation.seed, 0, t.index) for t in ws.train_tok]
    model = loaded_model(ws, ws.start_model)
    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats + 1):  # the first round warms both up and is not counted
        for precision in ("no", "bf16"):
            gen = HFGenerator(model, ws.cfg.generation, stop_ids=ws.stop_ids,
                              pad_id=ws.tokenizer.pad_token_id, device=ws.device,
                              mixed_precision=precision)  # fmt: skip
            start = time.perf_counter()
            sampled = [c for group in gen.generate(prompts, num_samples=1, seeds=seeds) for c in group]
            seconds = time.perf_counter() - start
            if precision in tokens:
                best[precision] = min(best.get(precision, float("inf")), seconds)
            tokens[precision] = sum(len(c.response_ids) for c in sampled)
    print(f"{len(prompts)} prompts, one sample each, max {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s), best of {args.repeats}")  # fmt: skip
    print("| precision | sampling s | sampled tokens | tokens/s |\n|---|---|---|---|")
    for precision, label in (("no", "float32"), ("bf16", "bf16 autocast")):
        print(f"| {label} | {best[precision]:.2f} | {tokens[precision]} | "
              f"{tokens[precision] / best[precision]:.1f} |")  # fmt: skip
    print(f"bf16 autocast / float32 tokens per second: "
          f"{(tokens['bf16'] / best['bf16']) / (tokens['no'] / best['no']):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
