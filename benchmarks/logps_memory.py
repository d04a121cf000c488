"""Peak memory and time of the sequence log-prob computation (forward + backward, as in training).

Three paths, each in a fresh subprocess so its peak RSS is its own:
* naive: every position projected to the vocabulary, a full float32 log_softmax ([N, L, V] twice over);
* logits: `train.logps_path=logits` — the model returns hidden states, every kept position
  (`logits_to_keep`) is projected at once in float32, `selective_log_softmax` one sequence at a time;
* chunked: `train.logps_path=chunked` — only response tokens are projected, a chunk at a time,
  recomputed in backward (`token_logps.chunked_token_logps`).
The report gives the extra RSS over the loaded model and ratios against naive. With a 128k vocabulary
(Llama-3's) the chunked path's extra memory stays that of the 49k one; the others grow with V.
`--sweep` times the logits and chunked paths over vocabularies x response lengths x precision (float32,
bf16 autocast) and prints what `token_logps.choose_path` ("auto") picks at each point.

    python benchmarks/logps_memory.py                       # SmolLM2-135M-sized: V=49152, hidden 576
    python benchmarks/logps_memory.py --vocab 128256 --hidden 256
    python benchmarks/logps_memory.py --sweep --hidden 256 --prompt 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spaceft.token_logps import autocast, pack, sequence_logps

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg).train()
    prompts = [list(range(3, 3 + args.prompt))] * args.batch
    responses = [list(range(5, 5 + args.response))] * args.batch
    batch = pack(prompts, responses, pad_id=0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats):  # the fastest repeat: the first also pays one-off allocations
        model.zero_grad(set_to_none=True)
        tic = time.perf_counter()
        with autocast(args.precision, torch.device("cpu")):
            if args.variant == "naive":
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                full = torch.log_softmax(logits[:, :-1].float(), -1)  # the float32 [N, L, V] copy
                logp = full.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
                out = (logp * batch.response_mask).sum(-1)
                del logits, full, logp
            else:
                out, _ = sequence_logps(model, batch, path=args.variant)
        out.sum().backward()
        times.append(time.perf_counter() - tic)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": args.variant, "seconds": min(times), "peak_rss_mb": peak / 1024,
                      "extra_mb": (peak - base) / 1024, "sum": float(out.sum())}))  # fmt: skip


def run_child(argv: list[str]) -> dict[str, float]:
    cmd = [sys.executable, __file__, *argv]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def sweep(args: argparse.Namespace) -> None:
    """Both head paths over vocabularies x response lengths x precisions, and what `choose_path` picks."""
    from spaceft.token_logps import choose_path

    print(f"batch {args.batch} x ({args.prompt} prompt + R response) tokens, hidden {args.hidden}, "
          f"{args.layers} layers, forward + backward, fastest of {args.repeats}")  # fmt: skip
    print("| precision | V | R | positions | float32 logits + grad (MiB) | logits: s, MB | chunked: s, MB "
          "| chunked / logits time | choose_path |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for precision in ("no", "bf16"):
        for vocab in args.vocabs:
            for response in args.responses:
                common = ["--vocab", vocab, "--hidden", args.hidden, "--layers", args.layers, "--batch",
                          args.batch, "--prompt", args.prompt, "--response", response, "--precision",
                          precision, "--repeats", args.repeats]  # fmt: skip
                r = {v: run_child([*map(str, common), "--variant", v]) for v in ("logits", "chunked")}
                positions = args.batch * response  # the kept positions the logits path projects
                mib = 2 * 4 * positions * vocab / 2**20
                pick, lg, ch = choose_path(vocab, positions, "cpu"), r["logits"], r["chunked"]
                cells = [precision, vocab, response, positions, f"{mib:.0f}"]
                cells += [f"{x['seconds']:.2f}, {x['extra_mb']:.0f}" for x in (lg, ch)]
                cells += [f"{ch['seconds'] / lg['seconds']:.2f}", pick]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=120)
    p.add_argument("--response", type=int, default=60)
    p.add_argument("--variant", choices=["naive", "logits", "chunked", "auto"])
    p.add_argument("--precision", choices=["no", "bf16"], default="no", help="bf16: autocast")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--sweep", action="store_true", help="logits vs chunked over --vocabs x --responses")
    p.add_argument("--vocabs", type=int, nargs="+", default=[49152, 128256])
    p.add_argument("--responses", type=int, nargs="+", default=[16, 64, 256])
    args = p.parse_args()
    if args.variant:
        child(args)
        return 0
    if args.sweep:
        sweep(args)
        return 0
    results = {v: run_child([*sys.argv[1:], "--variant", v]) for v in ("naive", "logits", "chunked")}
    n = results["naive"]
    for name, r in results.items():
        assert abs(n["sum"] - r["sum"]) <= 1e-3 * abs(n["sum"]), f"{name} disagrees with naive"
    print(f"batch {args.batch} x ({args.prompt} prompt + {args.response} response) tokens, V={args.vocab}, "
          f"hidden {args.hidden}, forward + backward")  # fmt: skip
    print("| path | time (s) | extra RSS over the loaded model (MB) | vs naive: time, memory |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['extra_mb']:.0f} | {r['seconds'] / n['seconds']:.2f}, "
              f"{r['extra_mb'] / max(n['extra_mb'], 1e-9):.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
