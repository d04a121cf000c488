"""Where a spaceft training step's time goes: torch.profiler over a few optimizer steps.

Same set-up as benchmarks/vs_trl.py (SmolLM2-135M, pairs of ~151 tokens, 4 pairs per step, RMSprop, SPACE
with mu = 1): prints the share of forward, backward and optimizer, and the operators with the most
self CPU time.

    nice -n 19 python benchmarks/profile_train.py --precision fp32 --steps 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--precision", default="fp32", choices=["fp32", "amp", "pure"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--shared-prompt", action="store_true", help="shared-prompt rows (train.shared_prompt)")
    p.add_argument("--logps-path", default="auto", choices=["auto", "chunked", "logits"])
    p.add_argument("--vocab-share", action="store_true",
                   help="also the share of matrix products with a vocabulary-wide dimension")  # fmt: skip
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from vs_trl import PRECISIONS, make_rows, model_path, token_items

    from spaceft.config import ModelConfig
    from spaceft.losses import compute_loss
    from spaceft.microbatch import TrainItem, forward_batch
    from spaceft.models import load_model, load_tokenizer
    from spaceft.token_logps import autocast

    dtype, mixed, *_ = PRECISIONS[args.precision]
    path = model_path(args.model)
    tok = load_tokenizer(path)
    n = args.steps * args.pairs_per_step
    triples = token_items(tok, make_rows(tok, n, 75, 76, 0))
    items = [TrainItem(tuple(pr), tuple(c), (tuple(rs[0]),), -100.0, (-100.0,)) for pr, c, rs in triples]
    model = load_model(path, ModelConfig(dtype=dtype, attn_implementation="sdpa")).train()
    opt = torch.optim.RMSprop(model.parameters(), lr=5e-7)
    cpu = torch.device("cpu")

    def step(batch: list[TrainItem]) -> None:
        with record_function("forward"), autocast(mixed, cpu):
            out = forward_batch(model, batch, tok.pad_token_id, cpu, shared=args.shared_prompt,
                                path=args.logps_path)  # fmt: skip
            logps = {f"{who}_{kind}_logps": out[f"{who}_{kind}"] for who in ("policy", "opponent")
                     for kind in ("real", "synthetic")}  # fmt: skip
            loss = compute_loss("space", **logps, mu=1.0, beta=1.0)
        with record_function("backward"):
            loss.losses.mean().backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    step(items[: args.pairs_per_step])  # warm-up, not profiled
    tic = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.vocab_share) as prof:
        for s in range(1, args.steps):
            step(items[s * args.pairs_per_step : (s + 1) * args.pairs_per_step])
    wall = time.perf_counter() - tic
    events = prof.key_averages()
    total = sum(e.cpu_time_total for e in events if e.key in ("forward", "backward", "optimizer"))
    print(f"{args.steps - 1} profiled steps, {args.precision}, {wall:.1f} s wall")
    for key in ("forward", "backward", "optimizer"):
        t = sum(e.cpu_time_total for e in events if e.key == key)
        print(f"  {key:10s} {t / 1e6:7.2f} s  {100 * t / max(total, 1):5.1f} %")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.vocab_share:
        vocab = model.get_output_embeddings().weight.shape[0]
        mm = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm")]
        head = sum(e.self_cpu_time_total for e in mm if any(vocab in shape for shape in e.input_shapes))
        every = sum(e.self_cpu_time_total for e in mm)
        print(f"matrix products with a {vocab}-wide dimension (the vocabulary head): {head / 1e6:.2f} s, "
              f"{100 * head / every:.1f} % of all matrix products, "
              f"{100 * head / max(total, 1):.1f} % of the steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
