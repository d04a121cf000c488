"""The first step's rewards on real-length responses, through the score stage and the training step.

Imported by tests/test_exact_start.py for one process, and run by it under
`torchrun --nproc_per_node 2` (gloo, CPU) for two, where it prints one JSON line per setting. Not a test
module itself.

The model is a 3-layer Llama with peaked logits (its output layer scaled so logits span ~±30, as a
trained model's do: where bf16's steps are 0.125 nats), built from a seed on every process alike; the
data are 8 prompts of 5-40 tokens with real responses of 200-260 tokens and K = 2 samples of 180-260.
Shared-prompt batches (`train.shared_prompt`) are checked in every precision at one micro-batch size.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spaceft.configfile import config_from_dict
from spaceft.microbatch import TrainItem, compose
from spaceft.rundir import Shard, read_table
from spaceft.score import merge_score_parts, with_opponent_scores, write_score_parts
from spaceft.token_logps import pack, score_sequences

VOCAB = 512
N = 8  # prompts: one optimizer step of 4 micro-batches of 2, or of 2 of 4
SETTINGS = [  # (precision, micro-batch size, length grouping, shared prompts)
    (precision, micro, grouping, False)
    for precision in ("float32", "bf16-autocast", "bf16")
    for micro in (2, 4)
    for grouping in (True, False)
] + [(precision, 4, True, True) for precision in ("float32", "bf16-autocast", "bf16")]


def peaked_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(150.0)
    return model.to(dtype)


def long_items(n: int = N, k: int = 2) -> list[TrainItem]:
    g = torch.Generator().manual_seed(1)

    def ids(lo: int, hi: int) -> tuple[int, ...]:
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return tuple(torch.randint(3, VOCAB, (length,), generator=g).tolist())

    return [TrainItem(ids(5, 40), ids(200, 260), tuple(ids(180, 260) for _ in range(k))) for _ in range(n)]


def _cfg(out: Path, precision: str, micro: int, grouping: bool, shared: bool = False):
    return config_from_dict({
        "name": "exact", "output_dir": str(out), "data": {"train": "x"},
        "model": {"dtype": "bfloat16" if precision == "bf16" else "float32"},
        "train": {"lr": 1e-5, "epochs": 1, "global_batch_size": N, "micro_batch_size": micro,
                  "save_every": 0, "warmup_ratio": 0.0, "group_by_length": grouping, "shared_prompt": shared,
                  "mixed_precision": "bf16" if precision == "bf16-autocast" else "no"},
        "logging": {"progress": False},
    })  # fmt: skip


def logits_positions(micro: int, grouping: bool) -> list[int]:
    """Per micro-batch of the float32 run on one process: the positions its logits path would project
    (`token_logps.sequence_logps`: every row from the first response target on), in scoring order."""
    items, sizes = long_items(), []
    for grp in compose(items, _cfg(Path("unused"), "float32", micro, grouping), 0, 1):
        rows = [(items[i].prompt_ids, r) for i in grp for r in (items[i].real_ids, *items[i].synthetic_ids)]
        mask = pack([p for p, _ in rows], [r for _, r in rows], pad_id=0).response_mask  # [N, L-1]
        sizes.append(mask[:, int(mask.any(0).float().argmax()) :].numel())
    return sizes


def first_step_abs_reward(precision: str, micro: int, grouping: bool, shared: bool, out: Path) -> float:
    """Mean |r| of the first training step, every process taking part (`spaceft.microbatch`)."""
    from spaceft import train as train_mod
    from spaceft.distributed import init_processes

    state = init_processes(600)  # joins the torchrun group on CPU (gloo), or one process
    cfg = _cfg(out, precision, micro, grouping, shared)
    items = long_items()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    groups = compose(items, cfg, 0, state.num_processes)
    table = out / f"{precision}-{micro}-{grouping}-{shared}" / "opponent_logps.parquet"
    kw = {"opponent": "o", "composition": "c"}
    shard = Shard(state.process_index, state.num_processes)
    write_score_parts(peaked_llama(dtype), items, groups, [(i, 0) for i in range(len(items))], table,
                      pad_id=0, device=torch.device("cpu"), shard=shard, progress=False,
                      mixed_precision=cfg.train.mixed_precision, shared=shared, **kw)  # fmt: skip
    state.wait_for_everyone()
    if state.is_main_process:
        merge_score_parts(table, groups, **kw)
    state.wait_for_everyone()
    scored = with_opponent_scores(items, read_table(table), "o", str(table))
    tr = train_mod.setup(peaked_llama(dtype), scored, cfg, iteration=0, iter_dir=table.parent)
    metrics = train_mod.train_step(tr, scored, cfg, 0, 0, 0)
    tr.accelerator.free_memory()
    return metrics["rewards/abs_mean"]


def other_batches_abs_reward(precision: str, micro: int) -> float:
    """The same, with the opponent scored in length-sorted batches of its own (not training's): the
    arrangement that left tenths of a nat under bf16."""
    items = long_items()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mixed = "bf16" if precision == "bf16-autocast" else "no"
    opponent = peaked_llama(dtype)
    kw = {"pad_id": 0, "batch_size": micro * 3, "device": torch.device("cpu"), "progress": False,
          "mixed_precision": mixed}  # fmt: skip
    real = score_sequences(opponent, [it.prompt_ids for it in items], [it.real_ids for it in items], **kw)
    syn = score_sequences(opponent, [it.prompt_ids for it in items for _ in it.synthetic_ids],
                          [s for it in items for s in it.synthetic_ids], **kw)  # fmt: skip
    scored = [TrainItem(it.prompt_ids, it.real_ids, it.synthetic_ids, real[i], tuple(syn[2 * i : 2 * i + 2]))
              for i, it in enumerate(items)]  # fmt: skip
    from spaceft import train as train_mod

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(Path(tmp), precision, micro, True)
        tr = train_mod.setup(peaked_llama(dtype), scored, cfg, iteration=0, iter_dir=Path(tmp) / "it")
        return train_mod.train_step(tr, scored, cfg, 0, 0, 0)["rewards/abs_mean"]


if __name__ == "__main__":  # under torchrun: every setting, one JSON line each from the main process
    from spaceft.distributed import init_processes

    out = Path(sys.argv[1])
    for precision, micro, grouping, shared in SETTINGS:
        value = first_step_abs_reward(precision, micro, grouping, shared, out)
        state = init_processes(600)
        if state.is_main_process:
            line = {"setting": [precision, micro, grouping, shared], "abs_mean": value}
            line["processes"] = state.num_processes
            print(json.dumps(line), flush=True)
