"""Decoding batch size: tokens/s of one cached decoding step, of `generate`, and of the eval stage.

    python benchmarks/decode_batch.py --batches 16 64        # the embedded default model, fp32

Measured in one process, one batch size after the other, on the demo's held-out prompts (the numbers
in docs/PERFORMANCE.md). Ratios between batch sizes are the result; the seconds depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from spaceft.configfile import load_config
from spaceft.evaluate import write_eval_parts
from spaceft.recipes import shipped_recipe
from spaceft.workspace import loaded_model, prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--problems", type=int, default=64, help="held-out problems for the eval stage")
    p.add_argument("--new-tokens", type=int, default=80)
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="decode-batch-"))
    recipe = shipped_recipe("demo")
    overrides = [f"output_dir={out}", f"data.eval_size={args.problems}", "logging.progress=false",
                 f"eval.max_new_tokens={args.new_tokens}"]  # fmt: skip
    cfg = load_config(recipe, overrides)
    ws = prepare(cfg)
    model = loaded_model(ws, ws.start_model).eval()
    print("| batch | decoding step | generate | eval stage |\n|---|---|---|---|")
    for batch in args.batches:
        ids = torch.tensor([list(ws.eval_tok[i % len(ws.eval_tok)].prompt_ids[-40:]) for i in range(batch)])
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
            step = ids[:, -1:]
            start = time.perf_counter()
            for _ in range(20):
                cache = model(step, past_key_values=cache, use_cache=True).past_key_values
            step_s = (time.perf_counter() - start) / 20
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
            gen_s = time.perf_counter() - start
        eval_dir = out / f"eval-{batch}"
        eval_dir.mkdir()
        start = time.perf_counter()
        settings = replace(cfg.eval, batch_size=batch)
        write_eval_parts(model, ws.tokenizer, ws.eval_examples, ws.eval_tok, settings, eval_dir,
                         stop_ids=ws.stop_ids, device=ws.device, progress=False)  # fmt: skip
        eval_s = time.perf_counter() - start
        gen_rate = batch * args.new_tokens / gen_s
        print(f"| {batch} | {step_s * 1000:.0f} ms = {batch / step_s:.0f} tok/s | {gen_s:.2f} s = "
              f"{gen_rate:.0f} tok/s | {eval_s:.1f} s for {len(ws.eval_tok)} problems |")  # fmt: skip


if __name__ == "__main__":
    main()
