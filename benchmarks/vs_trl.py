"""spaceft against TRL's DPOTrainer: speed, MFU and peak memory on the same work, and the losses checked
against TRL's as an independent implementation.

Both systems get the same model, the same prompts with a chosen and K rejected responses, tokenized the
same way (TRL's rule: the completion starts where tokenize(prompt) and tokenize(prompt + completion)
diverge), the same prompts per optimizer step, RMSprop, SDPA attention and the same precision:

* spaceft: the score stage (the opponent forwards training's own micro-batches, no gradients) +
  `train_iteration` (SPACE, μ = 1), either on separate rows ("spaceft": each prompt forwarded 1 + K
  times) or on shared-prompt rows ("shared", `train.shared_prompt`: each prompt forwarded once);
* TRL: `DPOTrainer(precompute_ref_log_probs=True)` (reference log-probs precomputed, no second model)
  + `train()`, loss `bco_pair` (the same objective as SPACE with μ = 1, β = 1), with TRL's own default
  log-prob path (its fused LM head, the full logits never held). TRL's DPO takes pairs, so K rejected
  responses are K pairs, the prompt and the chosen response forwarded K times.

Every measurement runs in a fresh process, so its peak RSS is its own; "net" memory is the peak less the
RSS right after the imports (TRL imports more than spaceft before any work). The systems alternate
(TRL, spaceft, shared, TRL, ...) so that drift on a shared machine hits all alike. "train step" is the
summed optimizer-step time, "end to end" adds the precompute (spaceft: the score pass; TRL: dataset
tokenization and the reference pass). MFU is 6·N·(the pairs' tokens) / train-step time / the matmul
peak measured by this script in the same run (square GEMMs in the precision's matmul dtype, best of
several); shared rows are credited the pairs' tokens, so their MFU is work done per second, not tokens
forwarded. The goals table is issue 26's (shared vs TRL at K = 1). The loss check runs TRL's own loss
code on one batch with given reference log-probs and compares spaceft's SPIN, SPIN-hinge, IPO and
SPACE(μ=1) at β = 1 with TRL's sigmoid, hinge, ipo and bco_pair.

    pip install -e '.[bench]'         # TRL is a benchmark extra, never a runtime dependency
    nice -n 19 python benchmarks/vs_trl.py --sweep     # fp32 and amp, checkpointing off and on, + K x prompt
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
from dataclasses import replace
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


def make_rows(
    tokenizer: Any, n: int, prompt_tokens: int, response_tokens: int, seed: int, k: int = 1
) -> list[dict]:
    """n prompts of about the requested token lengths (random common words, seeded), each with a chosen
    and K rejected responses."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    eos = tokenizer.eos_token
    return [{"prompt": text(prompt_tokens) + "\n", "chosen": text(response_tokens) + eos,
             "rejected": [text(response_tokens) + eos for _ in range(k)]} for _ in range(n)]  # fmt: skip


def trl_rows(rows: list[dict]) -> list[dict]:
    """TRL's DPO takes pairs: a prompt with K rejected responses is K (prompt, chosen, rejected_j) pairs,
    the prompt and the chosen response forwarded K times."""
    return [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": x} for r in rows for x in r["rejected"]
    ]


def token_items(tokenizer: Any, rows: list[dict]) -> list[tuple[list[int], list[int], list[list[int]]]]:
    """(prompt, chosen, [rejected ...]) ids, split where TRL splits them (the common prefix of the
    prompt's encoding and each prompt + response encoding; the shortest over a prompt's responses)."""
    out = []
    for r in rows:
        p = tokenizer(r["prompt"])["input_ids"]
        full = [tokenizer(r["prompt"] + x)["input_ids"] for x in [r["chosen"], *r["rejected"]]]
        cut = min(_common(p, f) for f in full)
        out.append((p[:cut], full[0][cut:], [f[cut:] for f in full[1:]]))
    return out


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def rss_mb() -> float:
    """This process's resident memory now (MB): read after the imports, it is the footprint that the
    peak is taken net of, since TRL and spaceft import different libraries before any work."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


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
    from spaceft.microbatch import TrainItem, compose, forward_batch
    from spaceft.models import load_model, load_tokenizer
    from spaceft.token_logps import autocast
    from spaceft.train import train_iteration

    import_mb = rss_mb()
    dtype, mixed, *_ = PRECISIONS[args.precision]
    tok = load_tokenizer(path)
    rows = make_rows(tok, args.pairs, args.prompt_tokens, args.response_tokens, args.seed, args.k)
    triples = token_items(tok, rows)
    model = load_model(path, ModelConfig(dtype=dtype, attn_implementation="sdpa"))
    cpu = torch.device("cpu")
    items = [TrainItem(tuple(p), tuple(c), tuple(tuple(r) for r in rs)) for p, c, rs in triples]
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
        model_cfg = {
            "dtype": dtype,
            "attn_implementation": "sdpa",
            "gradient_checkpointing": args.checkpointing,
        }
        cfg = config_from_dict({"name": "bench", "output_dir": tmp, "data": {"train": "x"}, "train": train,
                                "model": model_cfg, "logging": {"progress": False}})  # fmt: skip
        # the score stage's work: the opponent forwards training's own micro-batches in eval mode
        tic = time.perf_counter()
        model.eval()
        opp_real, opp_syn = [0.0] * len(items), [()] * len(items)
        with torch.no_grad(), autocast(mixed, cpu):
            for group in compose(items, cfg, 0, 1):
                out = forward_batch(model, [items[i] for i in group], tok.pad_token_id, cpu,
                                    shared=args.shared_prompt)  # fmt: skip
                for j, i in enumerate(group):
                    opp_real[i], opp_syn[i] = (
                        float(out["policy_real"][j]),
                        tuple(out["policy_synthetic"][j].tolist()),
                    )
        score_s = time.perf_counter() - tic
        scored = [
            replace(it, opponent_real=opp_real[i], opponent_synthetic=opp_syn[i])
            for i, it in enumerate(items)
        ]
        info = train_iteration(model, tok, scored, cfg, iteration=0, iter_dir=Path(tmp) / "it")
        lines = [json.loads(x) for x in (Path(tmp) / "it" / "metrics.jsonl").read_text().splitlines()]
    step_s = [m["step_s"] for m in lines]
    return {"total_s": score_s + info["train_s"], "precompute_s": score_s, "steps": info["steps"],
            "step_s": step_s, "n_params": sum(p.numel() for p in model.parameters()), "import_mb": import_mb,
            "first_reward": lines[0]["rewards/abs_mean"]}  # fmt: skip


def run_trl(args: argparse.Namespace, path: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    import_mb = rss_mb()
    _, _, load_dtype, bf16, _ = PRECISIONS[args.precision]
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as spaceft's load_tokenizer does
    rows = trl_rows(make_rows(tok, args.pairs, args.prompt_tokens, args.response_tokens, args.seed, args.k))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, load_dtype), attn_implementation="sdpa"
    )
    step_s: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.tic = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step_s.append(time.perf_counter() - self.tic)

    with tempfile.TemporaryDirectory() as tmp:
        # a step takes the same prompts and responses as spaceft's: pairs_per_step prompts, K pairs each,
        # in K micro-batches of pairs_per_step pairs (one micro-batch of all K pairs of 4 prompts with
        # 300-token prompts would not fit in 24 GiB)
        config = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.pairs_per_step,
            gradient_accumulation_steps=args.k, num_train_epochs=1, learning_rate=5e-7,
            lr_scheduler_type="constant", optim="rmsprop", loss_type=["bco_pair"], beta=1.0,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=args.pairs_per_step * args.k, gradient_checkpointing=args.checkpointing,
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
            "n_params": sum(p.numel() for p in model.parameters()), "import_mb": import_mb}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_path(args.model)
    result = (run_trl if args.child == "trl" else run_spaceft)(args, path)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


SYSTEMS = {"trl": ("trl", False), "spaceft": ("spaceft", False), "shared": ("spaceft", True)}
"""name -> (child, train.shared_prompt): TRL, spaceft on separate rows, spaceft on shared-prompt rows."""


def spawn(args: argparse.Namespace, system: str, precision: str, *, k: int, prompt_tokens: int,
          steps: int, checkpointing: bool) -> dict[str, Any]:  # fmt: skip
    kind, shared = SYSTEMS[system]
    cmd = [sys.executable, __file__, "--child", kind, "--precision", precision, "--model", args.model,
           "--pairs", str(steps * args.pairs_per_step), "--pairs-per-step", str(args.pairs_per_step),
           "--seed", str(args.seed), "--k", str(k), "--prompt-tokens", str(prompt_tokens),
           "--response-tokens", str(args.response_tokens)]  # fmt: skip
    cmd += ["--shared-prompt"] if shared else []
    cmd += ["--activation-checkpointing"] if checkpointing else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:  # recorded, not raised: one failed setting must not lose the others
        print(f"{system} {precision} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        oom = " (killed: out of memory?)" if proc.returncode == -9 else ""
        return {"failed": f"rc {proc.returncode}{oom}"}
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
    rows = trl_rows(make_rows(tok, n, 12, 8, seed))
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
    p.add_argument("--pairs-per-step", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--prompt-tokens", type=int, default=75)
    p.add_argument("--response-tokens", type=int, default=76)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (TRL, spaceft, shared) per setting")
    p.add_argument("--precisions", nargs="+", default=["fp32", "amp"], choices=list(PRECISIONS))
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="activation checkpointing, on both sides")  # fmt: skip
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument(
        "--sweep", action="store_true", help="also K in --sweep-ks x prompt length in --sweep-prompts"
    )
    p.add_argument("--sweep-ks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--sweep-prompts", type=int, nargs="+", default=[75, 300])
    p.add_argument("--sweep-precision", default="amp", choices=list(PRECISIONS))
    p.add_argument("--sweep-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-check-only", action="store_true")
    p.add_argument("--json", type=Path, help="also write the raw measurements here (after every setting)")
    p.add_argument("--tables-from", type=Path, help="print the tables of a --json file and exit")
    p.add_argument("--child", choices=["trl", "spaceft"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--shared-prompt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--activation-checkpointing", dest="checkpointing_on", action="store_true",
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args()
    if args.tables_from:
        saved = json.loads(args.tables_from.read_text())
        tables(saved["settings"], saved["prompt_tokens"])
        return 0
    if args.child:
        args.checkpointing = args.checkpointing_on
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
    settings = [(prec, ck == "on", 1, args.prompt_tokens, args.steps, args.repeats)
                for prec in args.precisions for ck in args.checkpointing]  # fmt: skip
    if args.sweep:
        settings += [(args.sweep_precision, False, k, pt, args.sweep_steps, 1)
                     for k in args.sweep_ks for pt in args.sweep_prompts]  # fmt: skip
    raw: list[dict[str, Any]] = []
    for precision, ckpt, k, prompt_tokens, steps, repeats in settings:
        gemm = PRECISIONS[precision][4]
        peaks = [peak_in_child(gemm)]
        runs: dict[str, list[dict]] = {s: [] for s in args.systems}
        for rep in range(repeats):
            for system in args.systems:  # A B C A B C: drift on a shared machine hits all alike
                r = spawn(args, system, precision, k=k, prompt_tokens=prompt_tokens, steps=steps,
                          checkpointing=ckpt)  # fmt: skip
                runs[system].append(r)
                where = f"{precision} ckpt {'on' if ckpt else 'off'} K={k} prompt {prompt_tokens} rep {rep}"
                done = "FAILED " + r["failed"] if "failed" in r else (
                    f"{r['steps']} steps, train {sum(r['step_s']):.1f} s + precompute "
                    f"{r['precompute_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                    f"(imports {r['import_mb']:.0f})")  # fmt: skip
                print(f"  [{where}] {system}: {done}", flush=True)
        peaks.append(peak_in_child(gemm))
        tokens = _tokens(args, path, k, prompt_tokens, steps)
        raw.append({"precision": precision, "checkpointing": ckpt, "k": k, "prompt_tokens": prompt_tokens,
                    "steps": steps, "tokens": tokens, "runs": runs, "matmul_peak_flops": peaks})  # fmt: skip
        if args.json:  # after every setting, so that a stopped run keeps what it measured
            args.json.write_text(json.dumps({"prompt_tokens": args.prompt_tokens, "settings": raw}, indent=1))
    tables(raw, args.prompt_tokens)
    return 0


def tables(raw: list[dict[str, Any]], prompt_tokens: int) -> None:
    summary = [summarize(r) for r in raw]
    report(summary)
    if all({"trl", "shared"} <= set(s["systems"]) for s in summary):
        goals(summary, prompt_tokens)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _tokens(args: argparse.Namespace, path: str, k: int, prompt_tokens: int, steps: int) -> int:
    """Non-pad tokens of the pairs' work in one epoch: per prompt, K pairs of prompt + chosen and prompt
    + rejected (what TRL forwards; shared-prompt rows forward fewer and are credited the same work)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    rows = make_rows(tok, steps * args.pairs_per_step, prompt_tokens, args.response_tokens, args.seed, k)
    return sum(
        len(rs) * (2 * len(p) + len(c)) + sum(len(r) for r in rs) for p, c, rs in token_items(tok, rows)
    )


def summarize(setting: dict[str, Any]) -> dict[str, Any]:
    """Medians over repeats per system: end-to-end steps/s, train-step time, tokens/s, MFU, memory."""
    peak = max(setting["matmul_peak_flops"])
    out = {key: setting[key] for key in ("precision", "checkpointing", "k", "prompt_tokens", "tokens")}
    out["systems"] = {}
    for system, all_runs in setting["runs"].items():
        runs = [r for r in all_runs if "failed" not in r]
        if not runs:
            out["systems"][system] = {"failed": all_runs[0]["failed"]}
            continue
        train_s = statistics.median(sum(r["step_s"]) for r in runs)
        out["systems"][system] = {
            "steps_per_s": statistics.median(r["steps"] / r["total_s"] for r in runs),
            "train_s": train_s,
            "precompute_s": statistics.median(r["precompute_s"] for r in runs),
            "tokens_per_s": setting["tokens"] / train_s,
            "mfu": 6 * runs[0]["n_params"] * setting["tokens"] / train_s / peak,
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "net_rss_mb": statistics.median(r["peak_rss_mb"] - r["import_mb"] for r in runs),
            "first_reward": runs[0].get("first_reward"),
        }
    return out


def report(summary: list[dict[str, Any]]) -> None:
    """One table; each spaceft row carries its ratio to TRL (higher is better, except memory)."""
    print("\nmedians over repeats; MFU = 6·N·(pairs' tokens) / summed train-step time / measured matmul peak;"
          " net memory = peak RSS − RSS after the imports")  # fmt: skip
    print("| precision | ckpt | K | prompt | system | train step (s) | end to end steps/s | MFU "
          "| peak RSS, net (MB) | train ×TRL | end to end ×TRL | net memory ×TRL "
          "| train ×unshared |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        ckpt = "on" if s["checkpointing"] else "off"
        where = f"| {s['precision']} | {ckpt} | {s['k']} | {s['prompt_tokens']}"
        trl, plain = s["systems"].get("trl", {}), s["systems"].get("spaceft", {})
        for system, m in s["systems"].items():
            if "failed" in m:
                print(f"{where} | {system} | failed: {m['failed']} |||||||")
                continue
            cols = ["", "", "", ""]
            if system != "trl" and "train_s" in trl:
                cols[:3] = [f"**{trl['train_s'] / m['train_s']:.2f}×**",
                            f"{m['steps_per_s'] / trl['steps_per_s']:.2f}×",
                            f"{m['net_rss_mb'] / trl['net_rss_mb']:.2f}×"]  # fmt: skip
            if system == "shared" and "train_s" in plain:
                cols[3] = f"{plain['train_s'] / m['train_s']:.2f}×"
            print(f"{where} | {system} | {m['train_s']:.1f} | {m['steps_per_s']:.4f} | {m['mfu']:.2f} "
                  f"| {m['peak_rss_mb']:.0f}, {m['net_rss_mb']:.0f} | {' | '.join(cols)} |")  # fmt: skip


GOALS = [  # (what, precision, checkpointing, measure, goal, higher is better)
    ("training steps", "fp32", False, "train", 1.6, True),
    ("training steps", "amp", False, "train", 2.2, True),
    ("score + train end to end", "fp32", False, "e2e", 1.5, True),
    ("score + train end to end", "amp", False, "e2e", 2.0, True),
    ("peak memory net of imports", "fp32", True, "memory", 0.6, False),
    ("peak memory net of imports", "amp", True, "memory", 0.6, False),
]  # fmt: skip
"""Issue 26's goals for shared-prompt spaceft against TRL at K = 1 and the default prompt length."""


def goals(summary: list[dict[str, Any]], prompt_tokens: int) -> None:
    print("\n| goal (spaceft shared / TRL, K = 1) | precision | checkpointing | goal | measured | met? |")
    print("|---|---|---|---|---|---|")
    for what, precision, ckpt, measure, goal, higher in GOALS:
        found = [s for s in summary if (s["precision"], s["checkpointing"], s["k"], s["prompt_tokens"])
                 == (precision, ckpt, 1, prompt_tokens)]  # fmt: skip
        if not found:
            continue
        trl, ours = found[0]["systems"]["trl"], found[0]["systems"]["shared"]
        if "failed" in trl or "failed" in ours:
            continue
        value = {"train": trl["train_s"] / ours["train_s"], "e2e": ours["steps_per_s"] / trl["steps_per_s"],
                 "memory": ours["net_rss_mb"] / trl["net_rss_mb"]}[measure]  # fmt: skip
        met = value >= goal if higher else value <= goal
        print(
            f"| {what} | {precision} | {'on' if ckpt else 'off'} | {'≥' if higher else '≤'} {goal}× "
            f"| {value:.2f}× | {'yes' if met else 'no'} |"
        )


if __name__ == "__main__":
    sys.exit(main())
