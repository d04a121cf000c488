"""spaceft against TRL's DPOTrainer: speed, MFU and peak memory on the same pairs, and the losses checked
against TRL's as an independent implementation.

Both systems get the same model, the same (prompt, chosen, rejected) pairs, tokenized the same way
(TRL's rule: the completion starts where tokenize(prompt) and tokenize(prompt + completion) diverge),
the same pairs per optimizer step, RMSprop and the same precision:

* spaceft: the score stage (opponent log-probs, cached) + `train_iteration` (SPACE, μ = 1)
* TRL: `DPOTrainer(precompute_ref_log_probs=True)` (reference log-probs precomputed, no second model)
  + `train()`, loss `bco_pair` (the same objective as SPACE with μ = 1, β = 1)

Every measurement runs in a fresh process, so its peak RSS is its own, and the systems alternate
(TRL, spaceft, TRL, spaceft, ...) so that drift on a shared machine hits both alike. MFU is
6·N·tokens / train-step time / the matmul peak measured by this script in the same run (square GEMMs in
the precision's matmul dtype, best of several). The loss check runs TRL's own loss code on one batch
with given reference log-probs and compares spaceft's SPIN, SPIN-hinge, IPO and SPACE(μ=1) at β = 1 with
TRL's sigmoid, hinge, ipo and bco_pair.

    pip install -e '.[bench]'         # TRL is a benchmark extra, never a runtime dependency
    nice -n 19 python benchmarks/vs_trl.py --steps 3 --repeats 2          # fp32 and bf16 autocast
    nice -n 19 python benchmarks/vs_trl.py --shared-prompt                # spaceft forwards each prompt once

With --shared-prompt spaceft trains on shared-prompt rows (`train.shared_prompt`, each prompt forwarded
once for its two responses); tokens/s and MFU still count the pairs' tokens (2 prompts + 2 responses per
pair), so they are the work done per second, not the tokens forwarded. The sweep over K and prompt
length is benchmarks/shared_prompt.py (TRL's DPO takes pairs only).
    python benchmarks/vs_trl.py --loss-check-only --model tiny
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = (
    "the a of to and in is it that for on with as was he be at by this had not are but from or have "
    "an they which one you were her all she there would their we him been has when who will more no "
    "if out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three"
).split()

# precision -> (spaceft model.dtype, spaceft train.mixed_precision, TRL load dtype, TRL bf16 flag, GEMM dtype)
PRECISIONS = {
    "fp32": ("float32", "no", "float32", False, "float32"),
    "amp": ("float32", "bf16", "float32", True, "bfloat16"),  # bf16 autocast, fp32 master weights
    "pure": ("bfloat16", "no", "bfloat16", False, "bfloat16"),  # bf16 weights and optimizer state
}


# ------------------------------------------------------------------------------------------------ data


def make_rows(tokenizer: Any, n: int, prompt_tokens: int, response_tokens: int, seed: int) -> list[dict]:
    """n text pairs of about the requested token lengths (random common words, seeded)."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    eos = tokenizer.eos_token
    return [{"prompt": text(prompt_tokens) + "\n", "chosen": text(response_tokens) + eos,
             "rejected": text(response_tokens) + eos} for _ in range(n)]  # fmt: skip


def token_pairs(tokenizer: Any, rows: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids, split where TRL splits them (common prefix of the two encodings)."""
    out = []
    for r in rows:
        p = tokenizer(r["prompt"])["input_ids"]
        pc = tokenizer(r["prompt"] + r["chosen"])["input_ids"]
        pr = tokenizer(r["prompt"] + r["rejected"])["input_ids"]
        cut = min(_common(p, pc), _common(p, pr))
        out.append((p[:cut], pc[cut:], pr[cut:]))
    return out


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def model_path(spec: str) -> str:
    from spaceft.models import resolve_model_path

    return resolve_model_path(spec)


# --------------------------------------------------------------------------------------- measurements


def matmul_peak(dtype_name: str, seconds: float = 3.0, size: int = 1536) -> float:
    """Best FLOP/s of square GEMMs in `dtype_name` on this process's threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        tic = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - tic))
    return best


def run_spaceft(args: argparse.Namespace, path: str) -> dict[str, Any]:
    import torch

    from spaceft.config import ModelConfig
    from spaceft.configfile import config_from_dict
    from spaceft.microbatch import TrainItem
    from spaceft.models import load_model, load_tokenizer
    from spaceft.token_logps import score_sequences
    from spaceft.train import train_iteration

    dtype, mixed, *_ = PRECISIONS[args.precision]
    tok = load_tokenizer(path)
    pairs = token_pairs(tok, make_rows(tok, args.pairs, args.prompt_tokens, args.response_tokens, args.seed))
    model = load_model(path, ModelConfig(dtype=dtype))
    cpu = torch.device("cpu")
    tic = time.perf_counter()
    kw = {"pad_id": tok.pad_token_id, "batch_size": 2 * args.pairs_per_step, "device": cpu, "progress": False,
          "mixed_precision": mixed}  # fmt: skip
    opp_c = score_sequences(model, [p for p, _, _ in pairs], [c for _, c, _ in pairs], **kw)
    opp_r = score_sequences(model, [p for p, _, _ in pairs], [r for _, _, r in pairs], **kw)
    score_s = time.perf_counter() - tic
    items = [
        TrainItem(tuple(p), tuple(c), (tuple(r),), opp_c[i], (opp_r[i],)) for i, (p, c, r) in enumerate(pairs)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        train = {
            "loss": "space",
            "mu": 1.0,
            "beta": 1.0,
            "optimizer": "rmsprop",
            "lr": 5e-7,
            "lr_after": None,
            "epochs": 1,
            "global_batch_size": args.pairs_per_step,
            "warmup_ratio": 0.0,
            "save_every": 0,
            "micro_batch_size": args.pairs_per_step,
            "max_grad_norm": 1.0,
            "mixed_precision": mixed,
            "shared_prompt": args.shared_prompt,
        }
        cfg = config_from_dict({"name": "bench", "output_dir": tmp, "data": {"train": "x"}, "train": train,
                                "model": {"dtype": dtype}, "logging": {"progress": False}})  # fmt: skip
        info = train_iteration(model, tok, items, cfg, iteration=0, iter_dir=Path(tmp) / "it")
        lines = [json.loads(x) for x in (Path(tmp) / "it" / "metrics.jsonl").read_text().splitlines()]
    step_s = [m["step_s"] for m in lines]
    return {"total_s": score_s + info["train_s"], "precompute_s": score_s, "steps": info["steps"],
            "step_s": step_s, "n_params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def run_trl(args: argparse.Namespace, path: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    _, _, load_dtype, bf16, _ = PRECISIONS[args.precision]
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as spaceft's load_tokenizer does
    rows = make_rows(tok, args.pairs, args.prompt_tokens, args.response_tokens, args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, load_dtype))
    step_s: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.tic = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step_s.append(time.perf_counter() - self.tic)

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.pairs_per_step, gradient_accumulation_steps=1,
            num_train_epochs=1, learning_rate=5e-7, lr_scheduler_type="constant", optim="rmsprop",
            loss_type=["bco_pair"], beta=1.0, precompute_ref_log_probs=True, gradient_checkpointing=False,
            bf16=bf16, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
            max_length=None, seed=args.seed, dataloader_num_workers=0, max_grad_norm=1.0,
        )  # fmt: skip
        tic = time.perf_counter()
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[Timer()])  # fmt: skip
        precompute_s = time.perf_counter() - tic  # tokenization + reference log-probs
        trainer.train()
        total_s = time.perf_counter() - tic
    return {"total_s": total_s, "precompute_s": precompute_s, "steps": len(step_s), "step_s": step_s,
            "n_params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_path(args.model)
    result = (run_trl if args.child == "trl" else run_spaceft)(args, path)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def spawn(args: argparse.Namespace, system: str, precision: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", system, "--precision", precision, "--model", args.model,
           "--pairs", str(args.pairs), "--pairs-per-step", str(args.pairs_per_step), "--seed", str(args.seed),
           "--prompt-tokens", str(args.prompt_tokens),
           "--response-tokens", str(args.response_tokens)]  # fmt: skip
    cmd += ["--shared-prompt"] if args.shared_prompt else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{system} {precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def peak_in_child(dtype_name: str) -> float:
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import vs_trl; " \
           f"print(vs_trl.matmul_peak({dtype_name!r}))"  # fmt: skip
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


# -------------------------------------------------------------------------------------- the loss check


def trl_loss_check(path: str, *, n: int = 4, seed: int = 0) -> dict[str, tuple[float, float]]:
    """spaceft's losses against TRL's on one batch with the same given reference log-probs (β = 1).

    Returns {pair name: (spaceft loss, TRL loss)}. TRL's ipo divides each log-ratio by its completion
    length, so spaceft's S-IPO (τ = 1) is given the per-token log-probs; the others take sums.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from spaceft.losses import compute_loss
    from spaceft.token_logps import pack, sequence_logps

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = make_rows(tok, n, 12, 8, seed)
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=n, beta=1.0, loss_type=["sigmoid"],
                           precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=False,
                           use_cpu=True, report_to="none", max_length=None, disable_tqdm=True)  # fmt: skip
        trainer = DPOTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok
        )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    prompts = [ids[i][(att[i] == 1) & (comp[i] == 0)].tolist() for i in range(2 * n)]
    responses = [ids[i][comp[i] == 1].tolist() for i in range(2 * n)]
    lengths = torch.tensor([float(len(r)) for r in responses])
    with torch.no_grad():
        # [2n]: chosen then rejected, as TRL orders them
        policy, _ = sequence_logps(model, pack(prompts, responses, tok.pad_token_id))
    g = torch.Generator().manual_seed(seed)
    ref = policy - torch.randn(2 * n, generator=g) * 2  # rewards of a few nats, either sign
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:n].clone(), ref[n:].clone()
    pairs = {"spin~sigmoid": ("spin", "sigmoid"), "spin_hinge~hinge": ("spin_hinge", "hinge"),
             "ipo~ipo": ("ipo", "ipo"), "space(mu=1)~bco_pair": ("space", "bco_pair")}  # fmt: skip
    out = {}
    for name, (ours, theirs) in pairs.items():
        trainer.loss_types, trainer.loss_weights = [theirs], [1.0]
        with torch.no_grad():
            trl_loss = float(trainer._compute_loss(trainer.model, dict(batch), return_outputs=False))
        norm = lengths if ours == "ipo" else torch.ones(2 * n)
        res = compute_loss(
            ours,
            policy_real_logps=policy[:n] / norm[:n], policy_synthetic_logps=(policy[n:] / norm[n:])[:, None],
            opponent_real_logps=ref[:n] / norm[:n], opponent_synthetic_logps=(ref[n:] / norm[n:])[:, None],
            beta=1.0, tau=1.0, mu=1.0,
        )  # fmt: skip
        out[name] = (float(res.losses.mean()), trl_loss)
    return out


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="spaceft model spec (default: SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per measurement (one epoch)")
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=75)
    p.add_argument("--response-tokens", type=int, default=76)
    p.add_argument("--repeats", type=int, default=2, help="A B pairs per precision")
    p.add_argument("--precisions", nargs="+", default=["fp32", "amp"], choices=list(PRECISIONS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-check-only", action="store_true")
    p.add_argument("--shared-prompt", action="store_true", help="spaceft: train.shared_prompt=true")
    p.add_argument("--json", type=Path, help="also write the raw measurements here")
    p.add_argument("--child", choices=["trl", "spaceft"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    try:
        import trl
    except ImportError:
        print("TRL is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    path = model_path(args.model)
    print(f"TRL {trl.__version__}; model {path}; {os.cpu_count()} CPUs; torch threads {_threads()}")
    checks = trl_loss_check(path)
    print("\nloss check (beta = 1, same log-probs): spaceft vs TRL")
    for name, (ours, theirs) in checks.items():
        print(f"  {name:24s} {ours:.6f} {theirs:.6f}  |diff| {abs(ours - theirs):.1e}")
    if any(abs(a - b) > 1e-4 * max(1.0, abs(b)) for a, b in checks.values()):
        print("LOSS CHECK FAILED", file=sys.stderr)
        return 1
    if args.loss_check_only:
        return 0
    args.pairs = args.steps * args.pairs_per_step
    raw: dict[str, Any] = {}
    for precision in args.precisions:
        gemm = PRECISIONS[precision][4]
        peaks = [peak_in_child(gemm)]
        runs: dict[str, list[dict]] = {"trl": [], "spaceft": []}
        for rep in range(args.repeats):
            for system in ("trl", "spaceft"):  # A B A B
                r = spawn(args, system, precision)
                runs[system].append(r)
                print(f"  [{precision} rep {rep}] {system}: {r['steps']} steps in {r['total_s']:.1f} s "
                      f"(precompute {r['precompute_s']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB",
                      flush=True)  # fmt: skip
        peaks.append(peak_in_child(gemm))
        raw[precision] = {"runs": runs, "matmul_peak_flops": peaks}
    tokens = _tokens(args, path)
    report(raw, tokens)
    if args.json:
        args.json.write_text(json.dumps({"tokens": tokens, **raw}, indent=1))
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _tokens(args: argparse.Namespace, path: str) -> int:
    """Non-pad tokens of one epoch: every pair's prompt+chosen and prompt+rejected sequences."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    pairs = token_pairs(tok, make_rows(tok, args.pairs, args.prompt_tokens, args.response_tokens, args.seed))
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)


def report(raw: dict[str, Any], tokens: int) -> None:
    """Median over repeats; ratios spaceft / TRL (higher is better for spaceft, except memory)."""
    print(
        f"\n{tokens} tokens per epoch; medians over repeats; MFU = 6·N·tokens / train-step time / matmul peak"
    )
    print("| precision | system | steps/s (precompute + train) | train tokens/s | MFU | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for precision, d in raw.items():
        peak = max(d["matmul_peak_flops"])
        row = {}
        for system, runs in d["runs"].items():
            sps = statistics.median(r["steps"] / r["total_s"] for r in runs)
            train_s = statistics.median(sum(r["step_s"]) for r in runs)
            tps = tokens / train_s
            mfu = 6 * runs[0]["n_params"] * tokens / train_s / peak
            rss = statistics.median(r["peak_rss_mb"] for r in runs)
            row[system] = (sps, tps, mfu, rss)
            print(f"| {precision} | {system} | {sps:.4f} | {tps:.0f} | {mfu:.2f} | {rss:.0f} |")
        (a, b, c, d_), (w, x, y, z) = row["spaceft"], row["trl"]
        print(f"| {precision} | **spaceft / TRL** | **{a / w:.2f}×** | **{b / x:.2f}×** "
              f"| {c:.2f} vs {y:.2f} | **{d_ / z:.2f}×** |")  # fmt: skip
    print(
        "matmul peak (GFLOP/s, before/after): "
        + ", ".join(
            f"{k} {v['matmul_peak_flops'][0] / 1e9:.0f}/{v['matmul_peak_flops'][1] / 1e9:.0f}"
            for k, v in raw.items()
        )
    )


if __name__ == "__main__":
    sys.exit(main())
