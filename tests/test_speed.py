"""bf16 mixed precision (rewards start at 0, float32 master weights), the warm-up that wastes no step,
and length-grouped micro-batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spaceft.config import ModelConfig
from spaceft.configfile import config_from_dict
from spaceft.microbatch import TrainItem, compose, forward_batch
from spaceft.models import load_model
from spaceft.token_logps import autocast, pack, score_sequences
from spaceft.train import train_iteration, warmup_then_decay
from tests.test_train import _cfg, _items, _Tok

CPU = torch.device("cpu")


def _rescored(model: torch.nn.Module, items: list[TrainItem], mixed_precision: str) -> list[TrainItem]:
    """The same items with opponent log-probs scored under `mixed_precision`, batched unlike training."""
    k = len(items[0].synthetic_ids)
    kw = {"pad_id": 0, "device": CPU, "progress": False, "mixed_precision": mixed_precision}
    prompts = [i.prompt_ids for i in items]
    real = score_sequences(model, prompts, [i.real_ids for i in items], batch_size=3, **kw)
    syn = score_sequences(model, [i.prompt_ids for i in items for _ in i.synthetic_ids],
                          [s for i in items for s in i.synthetic_ids], batch_size=5, **kw)  # fmt: skip
    return [
        TrainItem(it.prompt_ids, it.real_ids, it.synthetic_ids, real[n], tuple(syn[n * k : (n + 1) * k]))
        for n, it in enumerate(items)
    ]


def _step1_rewards(model: torch.nn.Module, items: list[TrainItem]) -> torch.Tensor:
    model.train()
    with autocast("bf16", CPU):
        out = forward_batch(model, items, pad_id=0, device=CPU)
    real = out["policy_real"] - out["opponent_real"]
    syn = out["policy_synthetic"] - out["opponent_synthetic"]
    return torch.cat([real, syn.flatten()]).detach().abs()


def test_bf16_autocast_scoring_makes_rewards_start_at_zero(tiny_model_dir: Path) -> None:
    """Training under bf16 autocast against opponent scores made under the same autocast: rewards are
    float32 noise (< 1e-5 on sums of ~25 nats); against float32 scores they are the bf16 rounding of
    the forward (the refusal's reason), here > 1e-4 on average."""
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items(model)
    same = _step1_rewards(model, _rescored(model, items, "bf16"))
    mixed = _step1_rewards(model, _rescored(model, items, "no"))
    assert same.mean() < 1e-5 and same.max() < 2e-5
    assert mixed.mean() > 1e-4 and mixed.mean() > 50 * same.mean()


def test_bf16_mixed_precision_keeps_float32_master_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _rescored(model, _items(model), "bf16")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(tmp_path, mixed_precision="bf16", global_batch_size=4, micro_batch_size=2, lr=1e-4)
    info = train_iteration(model, _Tok(), items, cfg, iteration=0, iter_dir=tmp_path / "it")
    assert info["steps"] == 2
    first = json.loads((tmp_path / "it" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/real"]) < 1e-5 and abs(first["rewards/synthetic"]) < 1e-5
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the weights moved, by float32 steps: some change is not a multiple of a bf16 spacing (on the GPU if any)
    moved = [(p.detach().cpu() - before[n]).flatten() for n, p in model.named_parameters()]
    delta = torch.cat(moved)
    assert delta.abs().max() > 0
    assert not torch.equal(delta, delta.to(torch.bfloat16).float())


def test_mixed_precision_needs_float32_weights() -> None:
    with pytest.raises(ValueError, match=r"model.dtype=float32 \(model.dtype=bfloat16 on its own is pure"):
        config_from_dict({"data": {"train": "x"}, "model": {"dtype": "bfloat16"},
                          "train": {"mixed_precision": "bf16"}})  # fmt: skip
    with pytest.raises(ValueError, match=r"train\.mixed_precision must be 'no' or 'bf16'"):
        config_from_dict({"data": {"train": "x"}, "train": {"mixed_precision": "fp16"}})


def test_warmup_starts_above_zero_and_ends_above_zero() -> None:
    """warmup 2 of 8 steps: (s+1)/3 for s = 0, 1, then (8-s)/6 for s = 2..7:
    1/3, 2/3, 6/6, 5/6, 4/6, 3/6, 2/6, 1/6 of the peak — no step at lr 0."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.6)
    sched = warmup_then_decay(opt, warmup=2, total=8)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    want = [0.2, 0.4, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert lrs == pytest.approx(want, abs=1e-12)


def test_length_grouping_keeps_the_step_and_cuts_padding() -> None:
    lengths = [40, 3, 38, 5, 36, 4, 2, 39]  # long and short prompts
    items = [TrainItem(tuple(range(n)), (1, 2), ((3,), (4, 5, 6))) for n in lengths]

    def padded(groups: list[tuple[int, ...]]) -> int:
        total = 0
        for grp in groups:
            mb = [items[i] for i in grp]
            b = pack([it.prompt_ids for it in mb for _ in range(3)],
                     [r for it in mb for r in (it.real_ids, *it.synthetic_ids)], pad_id=0)  # fmt: skip
            total += b.input_ids.numel() - b.num_tokens
        return total

    cfg = _cfg(Path("unused"), micro_batch_size=2)
    grouped = compose(items, cfg, 0, world=1)
    cfg.train.group_by_length = False
    plain = compose(items, cfg, 0, world=1)
    assert sorted(i for grp in plain for i in grp) == list(range(8))  # every prompt once
    assert [[lengths[i] for i in grp] for grp in grouped] == [[2, 3], [4, 5], [36, 38], [39, 40]]
    assert padded(grouped) < padded(plain) / 5
    assert compose(items, cfg, 0, world=1) == plain  # a pure function of (data, settings, seed, iteration)
    assert compose(items, cfg, 1, world=1) != plain  # each iteration has its own groups


@pytest.mark.parametrize(
    ("launch", "dtype", "ours", "message"),
    [
        (("FSDP", "bf16", False), "float32", "bf16", "under FSDP, accelerate mixed_precision=bf16 casts"),
        (("DEEPSPEED", "bf16", True), "float32", "no", "DeepSpeed with bf16 trains bf16 copies"),
        (("FSDP", "no", False), "float32", "bf16", None),  # autocast over float32 shards, as scoring does
        (("DEEPSPEED", "bf16", True), "bfloat16", "no", None),  # the shipped zero3.yaml + paper_space
    ],
)
def test_sharded_launches_whose_forward_differs_from_scoring_are_refused(
    tiny_model_dir: Path,
    tmp_path: Path,
    launch: tuple[str, str, bool],
    dtype: str,
    ours: str,
    message: str | None,
) -> None:
    """FSDP's param_dtype and DeepSpeed's bf16 engine cast the weights themselves: if the score stage
    does not read the same precision, rewards cannot start at 0, so the run stops before training."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from spaceft.train import _check_precision

    kind, launched, deepspeed = launch
    accelerator = SimpleNamespace(
        mixed_precision=launched,
        distributed_type=DistributedType[kind],
        state=SimpleNamespace(deepspeed_plugin=object() if deepspeed else None),
    )
    cfg = _cfg(tmp_path, mixed_precision=ours)
    cfg.model = ModelConfig(dtype=dtype)
    model = load_model(str(tiny_model_dir), cfg.model)
    if message is None:
        _check_precision(model, accelerator, cfg)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match=message):
            _check_precision(model, accelerator, cfg)  # type: ignore[arg-type]
