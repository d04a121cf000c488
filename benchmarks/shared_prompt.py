"""Shared-prompt batches against unshared ones: tokens forwarded, training-step and scoring time.

One process, one model; the two paths alternate (unshared, shared, unshared, ...) on the same
micro-batch, so drift on a shared machine hits both alike; each ratio is the median over repeats of
unshared time / shared time measured back to back. A training step here is what `train.shared_prompt`
changes: `forward_batch` in train mode, a loss, backward (the optimizer step is the same on both
sides and left out); scoring is `forward_batch` in eval mode without gradients.

    nice -n 5 python benchmarks/shared_prompt.py --repeats 3                 # SmolLM2-135M, fp32
    python benchmarks/shared_prompt.py --model tiny --ks 1 --prompt-lengths 8 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch


def items_for(k: int, prompt_tokens: int, response_tokens: int, n: int, vocab: int, seed: int) -> list[Any]:
    """n prompts of about `prompt_tokens` ids (±10 %) with a real and K synthetic responses of about
    `response_tokens`: random ids, which cost what text does."""
    from spaceft.microbatch import TrainItem

    g = torch.Generator().manual_seed(seed)

    def ids(length: int) -> tuple[int, ...]:
        spread = max(length // 10, 1)
        m = length + int(torch.randint(-spread, spread + 1, (1,), generator=g))
        return tuple(torch.randint(10, vocab, (max(m, 1),), generator=g).tolist())

    return [TrainItem(ids(prompt_tokens), ids(response_tokens), tuple(ids(response_tokens) for _ in range(k)),
                      0.0, (0.0,) * k) for _ in range(n)]  # fmt: skip


def timed(model: torch.nn.Module, items: list[Any], shared: bool, train: bool) -> tuple[float, int]:
    from spaceft.microbatch import forward_batch

    cpu = torch.device("cpu")
    model.train(train)
    tic = time.perf_counter()
    if train:
        model.zero_grad(set_to_none=True)
        out = forward_batch(model, items, 0, cpu, shared=shared)
        (out["policy_real"].sum() - out["policy_synthetic"].mean(-1).sum()).backward()
    else:
        with torch.no_grad():
            out = forward_batch(model, items, 0, cpu, shared=shared)
    return time.perf_counter() - tic, int(out["num_tokens"])


def measure(model: torch.nn.Module, items: list[Any], repeats: int) -> dict[str, Any]:
    row: dict[str, Any] = {}
    small = items_for(len(items[0].synthetic_ids), 8, 8, 1, model.config.vocab_size, 0)
    for stage, train in (("train", True), ("score", False)):
        timed(model, small, False, train)  # warm-up of both paths (first-call costs, the head check)
        timed(model, small, True, train)
        ratios, times = [], {False: [], True: []}
        for _ in range(repeats):
            plain, row["tokens_unshared"] = timed(model, items, False, train)
            tree, row["tokens_shared"] = timed(model, items, True, train)
            times[False].append(plain)
            times[True].append(tree)
            ratios.append(plain / tree)
        row[f"{stage}_s_unshared"] = statistics.median(times[False])
        row[f"{stage}_s_shared"] = statistics.median(times[True])
        row[f"{stage}_speedup"] = statistics.median(ratios)
    row["token_ratio"] = row["tokens_unshared"] / row["tokens_shared"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="spaceft model spec (default: SmolLM2-135M-Instruct)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[75, 300])
    p.add_argument("--response-tokens", type=int, default=76)
    p.add_argument("--prompts", type=int, default=1, help="prompts per micro-batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from spaceft.config import ModelConfig
    from spaceft.models import load_model, resolve_model_path

    path = resolve_model_path(args.model)
    model = load_model(path, ModelConfig(dtype="float32", attn_implementation="sdpa"))
    vocab = model.config.vocab_size
    print(f"model {path}; torch threads {torch.get_num_threads()}; {args.prompts} prompts per micro-batch, "
          f"responses ~{args.response_tokens} tokens, fp32, median of {args.repeats}")  # fmt: skip
    print("| K | prompt | tokens unshared → shared | train step (s) unshared → shared | speed-up "
          "| score speed-up |\n|---|---|---|---|---|---|")
    for k in args.ks:
        for prompt_tokens in args.prompt_lengths:
            items = items_for(k, prompt_tokens, args.response_tokens, args.prompts, vocab, args.seed)
            r = measure(model, items, args.repeats)
            print(f"| {k} | {prompt_tokens} | {r['tokens_unshared']} → {r['tokens_shared']} "
                  f"({r['token_ratio']:.2f}×) | {r['train_s_unshared']:.2f} → {r['train_s_shared']:.2f} | "
                  f"{r['train_speedup']:.2f}× | {r['score_speedup']:.2f}× |", flush=True)  # fmt: skip
            print(json.dumps({"k": k, "prompt_tokens": prompt_tokens, **r}), flush=True)


if __name__ == "__main__":
    main()
