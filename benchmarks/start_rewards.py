"""The first step's mean |reward| on real-length answers, scored in training's micro-batches or not.

At an iteration's first step the policy is the opponent, so every reward should be 0. This measures
it on a real model and real answers: SmolLM2-135M-Instruct (the embedded default model) on AlpacaEval's
GPT-4 answers cut at 256 tokens (`spaceft bench --fetch` data), K = 1, for each precision:

* `training batches`: the score stage as it is (`spaceft.microbatch`: the opponent is forwarded in the
  micro-batches training will use);
* `own batches`: the opponent scored in length-sorted batches of micro_batch_size·(1+K) sequences, the
  arrangement before that design;

and, with `--heads`, the same with the vocabulary projection in the autocast's bf16 instead of float32
(the rounding the float32 head removes), plus the time of a training step with either head.

The synthetic response of prompt i is the real answer of prompt i+1: the measurement needs
real-length text the model scores with peaked log-probs, not the model's own samples.

    nice -n 5 python benchmarks/start_rewards.py --pairs 8 --heads
    nice -n 5 python benchmarks/start_rewards.py --pairs 8 --timing-only --timing-steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a local model directory; default: the embedded one")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--response-tokens", type=int, default=256)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--precisions", nargs="+", default=["float32", "bf16-autocast", "bf16"])
    p.add_argument(
        "--heads", action="store_true", help="also with a bf16 vocabulary projection, and step times"
    )
    p.add_argument("--timing-steps", type=int, default=2)
    p.add_argument("--timing-only", action="store_true", help="only: step time by head, heads alternating")
    p.add_argument(
        "--head-error",
        action="store_true",
        help="only: each sequence's log-prob error under bf16 autocast against float32, by head",
    )
    args = p.parse_args()

    import torch

    torch.manual_seed(0)
    items = _items(args)
    if args.head_error:
        _head_error(args, items)
        return
    if args.timing_only:
        print(json.dumps(_step_seconds(args, items, args.timing_steps)))
        return
    lengths = [len(it.real_ids) for it in items]
    mean = statistics.mean(lengths)
    print(f"{len(items)} pairs, responses {min(lengths)}-{max(lengths)} tokens (mean {mean:.0f})")
    rows: list[dict[str, Any]] = []
    for precision in args.precisions:
        heads = ("float32", "bf16") if args.heads and precision == "bf16-autocast" else ("float32",)
        for head in heads:
            with _head_dtype(head):
                for scoring in ("training batches", "own batches"):
                    value = _first_step(args, items, precision, scoring)
                    rows.append({"precision": precision, "head": head, "scoring": scoring, "abs_mean": value})
                    print(json.dumps(rows[-1]), flush=True)
    if args.heads:
        for head, secs in _step_seconds(args, items, args.timing_steps).items():
            rows.append({"precision": "bf16-autocast", "head": head, "step_s": secs})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| precision | head | opponent scored in | mean abs reward at step 1 (nats) |")
    print("|---|---|---|---|")
    for r in rows:
        if "abs_mean" in r:
            print(f"| {r['precision']} | {r['head']} | {r['scoring']} | {r['abs_mean']:.3g} |")
    for r in rows:
        if "step_s" in r:
            print(f"bf16 autocast, {r['head']} head: {r['step_s']:.2f} s per training step (median)")


def _items(args: argparse.Namespace) -> list[Any]:
    from spaceft.bench.sources import ensure_alpaca_splits
    from spaceft.config import DataConfig
    from spaceft.default_model import ensure_default_model
    from spaceft.microbatch import TrainItem
    from spaceft.models import load_tokenizer
    from spaceft.rundata import load_split

    model = str(ensure_default_model()) if args.model == "default" else args.model
    args.model_dir = model
    train, _ = ensure_alpaca_splits()
    d = DataConfig(train=str(train), format="prompt_completion", max_response_tokens=args.response_tokens,
                   overlong="truncate", max_prompt_tokens=128)  # fmt: skip
    _, tok, _ = load_split(str(train), d, load_tokenizer(model), split="train", limit=args.pairs * 4)
    tok = sorted(tok, key=lambda t: -len(t.response_ids))[: args.pairs]  # the longest answers
    return [TrainItem(t.prompt_ids, t.response_ids, (tok[(i + 1) % len(tok)].response_ids,))
            for i, t in enumerate(tok)]  # fmt: skip


def _cfg(args: argparse.Namespace, out: Path, precision: str) -> Any:
    from spaceft.configfile import config_from_dict

    return config_from_dict({
        "name": "start", "output_dir": str(out), "data": {"train": "x"},
        "model": {"dtype": "bfloat16" if precision == "bf16" else "float32"},
        "train": {"lr": 1e-5 if precision == "bf16" else 1e-7, "epochs": 1, "global_batch_size": args.pairs,
                  "micro_batch_size": args.micro, "save_every": 0, "warmup_ratio": 0.0,
                  "mixed_precision": "bf16" if precision == "bf16-autocast" else "no"},
        "logging": {"progress": False},
    })  # fmt: skip


def _model(args: argparse.Namespace, precision: str) -> Any:
    from spaceft.config import ModelConfig
    from spaceft.models import load_model

    return load_model(args.model_dir, ModelConfig(dtype="bfloat16" if precision == "bf16" else "float32"))


def _scored(args: argparse.Namespace, items: list[Any], cfg: Any, precision: str, scoring: str) -> list[Any]:
    import torch

    from spaceft.microbatch import TrainItem, compose
    from spaceft.rundir import read_table
    from spaceft.score import merge_score_parts, with_opponent_scores, write_score_parts
    from spaceft.token_logps import score_sequences

    cpu, mixed = torch.device("cpu"), cfg.train.mixed_precision
    opponent = _model(args, precision)
    if scoring == "own batches":
        kw = {
            "pad_id": 0,
            "batch_size": args.micro * 2,
            "device": cpu,
            "progress": False,
            "mixed_precision": mixed,
        }
        real = score_sequences(opponent, [it.prompt_ids for it in items], [it.real_ids for it in items], **kw)
        syn = score_sequences(opponent, [it.prompt_ids for it in items],
                              [it.synthetic_ids[0] for it in items], **kw)  # fmt: skip
        return [TrainItem(it.prompt_ids, it.real_ids, it.synthetic_ids, real[i], (syn[i],))
                for i, it in enumerate(items)]  # fmt: skip
    groups = compose(items, cfg, 0, world=1)
    table = cfg.run_dir / "opponent_logps.parquet"
    origins = [(i, 0) for i in range(len(items))]
    write_score_parts(opponent, items, groups, origins, table, pad_id=0, device=cpu, opponent="o",
                      composition="c", progress=False, mixed_precision=mixed)  # fmt: skip
    merge_score_parts(table, groups, opponent="o", composition="c")
    return with_opponent_scores(items, read_table(table), "o", str(table))


def _first_step(args: argparse.Namespace, items: list[Any], precision: str, scoring: str) -> float:
    from spaceft import train as train_mod

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(args, Path(tmp), precision)
        scored = _scored(args, items, cfg, precision, scoring)
        tr = train_mod.setup(_model(args, precision), scored, cfg, iteration=0, iter_dir=Path(tmp) / "it")
        value = train_mod.train_step(tr, scored, cfg, 0, 0, 0)["rewards/abs_mean"]
        tr.accelerator.free_memory()
        return float(value)


def _step_seconds(args: argparse.Namespace, items: list[Any], steps: int) -> dict[str, float]:
    """Median seconds of a bf16-autocast training step per head dtype: one trainer, the two heads in
    alternate steps (`steps` each, after one warm-up step each), so that load on the machine hits both."""
    from spaceft import train as train_mod

    times: dict[str, list[float]] = {"float32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(args, Path(tmp), "bf16-autocast")
        cfg.train.epochs = 2 * (steps + 1)
        tr = train_mod.setup(
            _model(args, "bf16-autocast"), items, cfg, iteration=0, iter_dir=Path(tmp) / "it"
        )
        for step in range(2 * (steps + 1)):
            head = ("float32", "bf16")[step % 2]
            with _head_dtype(head):
                tic = time.perf_counter()
                train_mod.train_step(tr, items, cfg, 0, 0, step)
            if step >= 2:  # the first step of each warms up
                times[head].append(time.perf_counter() - tic)
        tr.accelerator.free_memory()
    return {head: statistics.median(t) for head, t in times.items()}


def _head_error(args: argparse.Namespace, items: list[Any]) -> None:
    """How far bf16 autocast moves a sequence's log-prob from its float32 value, with the vocabulary
    projection in float32 or in bf16: the rounding every reward carries once policy and opponent differ."""
    import torch

    from spaceft.microbatch import compose, forward_batch
    from spaceft.token_logps import autocast

    cpu = torch.device("cpu")
    model = _model(args, "float32").eval()
    groups = compose(items, _cfg(args, Path("unused"), "float32"), 0, world=1)

    def logps(mixed: str) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for grp in groups:
                with autocast(mixed, cpu):
                    res = forward_batch(model, [items[i] for i in grp], 0, cpu)
                out += [res["policy_real"], res["policy_synthetic"].flatten()]
        return torch.cat(out).double()

    exact = logps("no")
    for head in ("float32", "bf16"):
        with _head_dtype(head):
            err = (logps("bf16") - exact).abs()
        row = {"head": head, "mean_abs_error": float(err.mean()), "max_abs_error": float(err.max())}
        print(json.dumps({**row, "sequences": len(err)}), flush=True)


@contextmanager
def _head_dtype(head: str) -> Iterator[None]:
    """`bf16`: the chunked vocabulary projection in the autocast's dtype, as before the float32 head."""
    from spaceft import token_logps

    if head == "float32":
        yield
        return
    real = token_logps.chunked_token_logps

    def autocast_dtype(*a: Any, **k: Any) -> Any:
        k["dtype"] = None
        return real(*a, **k)

    token_logps.chunked_token_logps = autocast_dtype
    try:
        yield
    finally:
        token_logps.chunked_token_logps = real


if __name__ == "__main__":
    main()
