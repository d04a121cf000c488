"""Padding with variable-length data: `train.group_by_length` off (the step's seeded order) vs on.

Real data has sequences from tens to hundreds of tokens. Each optimizer step's prompts are cut into
micro-batches that are padded to their longest sequence; sorting the step's prompts by length first
puts similar lengths together. This script builds one step of such data, runs forward + backward of
every micro-batch through a small Llama both ways (interleaved, repeated) and prints the padded-token
fraction and real tokens/s.

    nice -n 19 python benchmarks/padding.py
    nice -n 19 python benchmarks/padding.py --prompts 64 --max-len 1000 --hidden 512 --layers 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="prompts in the step")
    p.add_argument("--micro", type=int, default=4, help="prompts per micro-batch")
    p.add_argument("--min-len", type=int, default=10)
    p.add_argument(
        "--max-len", type=int, default=300, help="prompt and response lengths are drawn up to this"
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spaceft.configfile import config_from_dict
    from spaceft.microbatch import TrainItem, compose, forward_batch
    from spaceft.token_logps import pack

    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, args.vocab, (n,), generator=g).tolist())

    def length() -> int:  # log-uniform: many short sequences, a few long ones, like chat data
        lo, hi = torch.log(torch.tensor(float(args.min_len))), torch.log(torch.tensor(float(args.max_len)))
        return int(torch.exp(lo + (hi - lo) * torch.rand(1, generator=g)))

    items = [
        TrainItem(ids(length()), ids(length()), (ids(length()),), 0.0, (0.0,)) for _ in range(args.prompts)
    ]
    torch.manual_seed(0)
    cfg_model = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                            num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                            tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg_model).train()
    cpu = torch.device("cpu")
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for grouped in (False, True):
            cfg = config_from_dict(
                {
                    "data": {"train": "x"},
                    "train": {
                        "micro_batch_size": args.micro,
                        "global_batch_size": args.prompts,
                        "group_by_length": grouped,
                    },
                }
            )
            micro = [[items[i] for i in grp] for grp in compose(items, cfg, 0, world=1)]
            real = padded = 0
            tic = time.perf_counter()
            for mb in micro:
                out = forward_batch(model, mb, pad_id=0, device=cpu)
                (out["policy_real"].sum() + out["policy_synthetic"].sum()).backward()
                b = pack([it.prompt_ids for it in mb] * 2, [it.real_ids for it in mb] +
                         [it.synthetic_ids[0] for it in mb], pad_id=0)  # fmt: skip
                real += b.num_tokens
                padded += b.input_ids.numel()
            elapsed = time.perf_counter() - tic
            model.zero_grad(set_to_none=True)
            results[grouped].append((1 - real / padded, real / elapsed))
            print(f"  group_by_length={grouped}: padded fraction {1 - real / padded:.3f}, "
                  f"{real / elapsed:.0f} real tokens/s", flush=True)  # fmt: skip
    print(f"\n{args.prompts} prompts, micro-batch {args.micro} (x2 sequences), lengths {args.min_len}-"
          f"{args.max_len} log-uniform, Llama {args.hidden} x {args.layers} layers; medians")  # fmt: skip
    print("| micro-batches | padded-token fraction | real tokens/s |")
    print("|---|---|---|")
    med = {
        k: (statistics.median(f for f, _ in v), statistics.median(t for _, t in v))
        for k, v in results.items()
    }
    for grouped, name in ((False, "seeded order (before)"), (True, "grouped by length (after)")):
        print(f"| {name} | {med[grouped][0]:.3f} | {med[grouped][1]:.0f} |")
    print(f"speed-up {med[True][1] / med[False][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
