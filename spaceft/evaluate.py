"""Per-iteration evaluation: held-out NLL, a verifiable task metric, and lm-evaluation-harness.

* NLL: mean token negative log-likelihood of the held-out real responses (teacher forced, summed over
  all response tokens then divided by their number — the per-token NLL of the held-out set).
* Task metric: greedy decoding of each held-out prompt, the answer parsed with
  `tasks.parse_answer` and compared by exact match with the row's `answer` (or the answer parsed from
  the reference response). Used when the held-out rows carry answers (`eval.task_metric=auto`).
* lm-eval: `eval.lm_eval_tasks` run offline through lm-evaluation-harness on the saved model
  directory, on every process (`spaceft.lmeval`): metrics under "lm_eval", harness version and
  task/data hashes under "lm_eval_provenance", which the manifest records with the stage.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from spaceft.batching import concrete
from spaceft.bench.in_run import lm_eval_for_run
from spaceft.chat import TokenizedExample
from spaceft.config import EvalConfig, GenerationConfig, ModelConfig
from spaceft.data import Example
from spaceft.generate import HFGenerator
from spaceft.rundir import ONE_PROCESS, Shard, atomic_path, merge_parts, write_json, write_parts
from spaceft.tasks import exact_match, parse_answer
from spaceft.token_logps import score_sequences

log = logging.getLogger(__name__)


def reference_answer(example: Example) -> str | None:
    return example.answer if example.answer is not None else parse_answer(example.response)


Metric = Callable[[str, Example], bool]


def answer_exact_match(output: str, example: Example) -> bool:
    """The default task metric: the parsed final answer equals the reference answer."""
    pred, ref = parse_answer(output), reference_answer(example)
    return pred is not None and ref is not None and exact_match(pred, ref)


def resolve_metric(name: str) -> Metric | None:
    """'exact_match' | 'none' | 'package.module:function' (a callable (output_text, Example) -> bool)."""
    if name in ("auto", "exact_match"):
        return answer_exact_match
    if name == "none":
        return None
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"eval.task_metric={name!r}: cannot import {attr!r} from {module!r} ({e})") from None
    if not callable(fn):
        raise ValueError(f"eval.task_metric={name!r} is not callable")
    return fn


def run_benchmarks(
    cfg: EvalConfig, model_cfg: ModelConfig | None, out_dir: Path, *, model_dir: str | None,
    every_rank: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """`eval.lm_eval_tasks` through lm-eval, offline (`spaceft.lmeval`); {} when none are configured.

    With `every_rank`, every process calls this and the harness shards the requests across them; the
    main process gets the results, the others {}.
    """
    if not cfg.lm_eval_tasks:
        return {}
    if model_dir is None:
        raise ValueError("lm-eval needs a saved model directory")
    return lm_eval_for_run(model_dir, cfg, model_cfg, out_dir, every_rank=every_rank)


def _task_metric(
    examples: Sequence[Example], tokenized: Sequence[TokenizedExample], cfg: EvalConfig
) -> Metric | None:
    answers = [reference_answer(examples[t.index]) for t in tokenized]
    if cfg.task_metric == "auto" and not (answers and all(a is not None for a in answers)):
        return None  # no verifiable answers in the held-out rows
    return resolve_metric(cfg.task_metric)


def _chunks(tokenized: Sequence[TokenizedExample], cfg: EvalConfig) -> list[list[int]]:
    """Positions of held-out examples in batches of similar prompt length (the same for any process count)."""
    order = sorted(range(len(tokenized)), key=lambda i: (len(tokenized[i].prompt_ids), i))
    size = concrete(cfg.batch_size)
    return [order[s : s + size] for s in range(0, len(order), size)] or [[]]


def write_eval_parts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    tokenized: Sequence[TokenizedExample],
    cfg: EvalConfig,
    out_dir: Path,
    *,
    stop_ids: Sequence[int],
    device: torch.device,
    shard: Shard = ONE_PROCESS,
    progress: bool = True,
    tag: str = "",
) -> None:
    """This shard's batches: each example's held-out log-prob and (with a task metric) greedy output."""
    pad_id = tokenizer.pad_token_id
    generate = _task_metric(examples, tokenized, cfg) is not None
    greedy = GenerationConfig(temperature=0.0, num_samples=1, max_new_tokens=cfg.max_new_tokens)
    gen = HFGenerator(model, greedy, stop_ids=stop_ids, pad_id=pad_id, device=device)
    chunks = _chunks(tokenized, cfg)
    bar = tqdm(total=sum(len(chunks[c]) for c in shard.units(len(chunks))), desc="eval",
               disable=not progress, leave=False)  # fmt: skip

    def make_chunk(c: int) -> list[dict[str, Any]]:
        idx = chunks[c]
        prompts = [tokenized[i].prompt_ids for i in idx]
        logps = score_sequences(model, prompts, [tokenized[i].response_ids for i in idx], pad_id=pad_id,
                                batch_size=len(idx), device=device, progress=False)  # fmt: skip
        outputs: list[str | None] = [None] * len(idx)
        if generate:
            comps = gen.generate(prompts, num_samples=1, seeds=[0] * len(idx))
            outputs = [tokenizer.decode(c[0].response_ids, skip_special_tokens=True) for c in comps]
        bar.update(len(idx))
        return [
            {"position": i, "logp": lp, "output": o} for i, lp, o in zip(idx, logps, outputs, strict=True)
        ]

    write_parts(out_dir / "eval_outputs.parquet", len(chunks), make_chunk, stage="eval", tag=tag, shard=shard)
    bar.close()


def finish_eval(
    examples: Sequence[Example],
    tokenized: Sequence[TokenizedExample],
    cfg: EvalConfig,
    out_dir: Path,
    *,
    lm_eval: dict[str, Any] | None = None,
    tag: str = "",
) -> dict[str, Any]:
    """Join the parts; held-out NLL, task accuracy (and `lm_eval`, the results and provenance of
    `run_benchmarks`) into out_dir/eval.json."""
    rows = merge_parts(out_dir / "eval_outputs.parquet", len(_chunks(tokenized, cfg)), tag=tag)
    by_position = {r["position"]: r for r in rows}
    result: dict[str, Any] = {"n": len(tokenized)}
    # held-out NLL: summed over every response token, divided by their number
    tokens = sum(len(t.response_ids) for t in tokenized)
    result["nll"] = -sum(r["logp"] for r in rows) / max(tokens, 1)
    # task metric on the greedy outputs
    metric = _task_metric(examples, tokenized, cfg)
    if metric is not None:
        correct = 0
        with atomic_path(out_dir / "eval_samples.jsonl") as tmp, tmp.open("w", encoding="utf-8") as fh:
            for i in range(len(tokenized)):
                output = by_position[i]["output"]
                example = examples[tokenized[i].index]
                ok = bool(metric(output, example))
                correct += ok
                # logp and tokens per problem let a bootstrap over problems give the NLL an interval
                fh.write(json.dumps({"index": i, "output": output, "parsed": parse_answer(output),
                                     "answer": reference_answer(example), "correct": ok,
                                     "logp": by_position[i]["logp"],
                                     "tokens": len(tokenized[i].response_ids)}) + "\n")  # fmt: skip
        result["accuracy"] = correct / max(len(tokenized), 1)
    result.update(lm_eval or {})
    write_json(out_dir / "eval.json", result)
    return result
