"""The training loop: rewards start at 0, reduction independent of micro-batching, loss falls, NaN stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spaceft import train as train_mod
from spaceft.config import ModelConfig
from spaceft.configfile import config_from_dict
from spaceft.losses import LossOutput
from spaceft.microbatch import TrainItem, forward_batch
from spaceft.models import load_model
from spaceft.token_logps import score_sequences
from spaceft.train import NonFiniteLossError, train_iteration

CPU = torch.device("cpu")


def _items(model, n: int = 8, k: int = 2) -> list[TrainItem]:
    g = torch.Generator().manual_seed(1)
    raw = []
    for i in range(n):
        prompt = tuple(torch.randint(3, 250, (3 + i % 3,), generator=g).tolist())
        real = tuple(torch.randint(3, 250, (4 + i % 2,), generator=g).tolist())
        syn = tuple(tuple(torch.randint(3, 250, (2 + j + i % 3,), generator=g).tolist()) for j in range(k))
        raw.append((prompt, real, syn))
    opp_real = score_sequences(model, [p for p, _, _ in raw], [r for _, r, _ in raw], pad_id=0, batch_size=3,
                               device=CPU, progress=False)  # fmt: skip
    opp_syn = score_sequences(model, [p for p, _, s in raw for _ in s], [y for _, _, s in raw for y in s],
                              pad_id=0, batch_size=5, device=CPU, progress=False)  # fmt: skip
    return [
        TrainItem(p, r, s, opp_real[i], tuple(opp_syn[i * k : (i + 1) * k]))
        for i, (p, r, s) in enumerate(raw)
    ]


def _cfg(tmp: Path, **train) -> object:
    t = {"lr": 1e-3, "lr_after": None, "epochs": 1, "global_batch_size": 8, "micro_batch_size": 2,
         "save_every": 0, "max_grad_norm": 1e9, "warmup_ratio": 0.0, **train}  # fmt: skip
    return config_from_dict({"name": "t", "output_dir": str(tmp), "data": {"train": "x"}, "train": t,
                             "logging": {"progress": False}})  # fmt: skip


def test_rewards_start_at_zero(tiny_model_dir: Path) -> None:
    """At the first step the policy IS the opponent: every reward is 0 (to 1e-5 in float32)."""
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items(model)
    model.train()
    out = forward_batch(model, items, pad_id=0, device=CPU)
    real = (out["policy_real"] - out["opponent_real"]).detach()
    syn = (out["policy_synthetic"] - out["opponent_synthetic"]).detach()
    assert real.abs().max() < 1e-5 and syn.abs().max() < 1e-5
    assert out["policy_synthetic"].shape == (8, 2)


def _first_step_grad_norm(tiny_model_dir: Path, tmp: Path, **train) -> float:
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items(model)
    info = train_iteration(model, _Tok(), items, _cfg(tmp, **train), iteration=0, iter_dir=tmp / "it")
    assert info["steps"] == 1
    return info["grad_norm"]


class _Tok:
    pad_token_id = 0

    def save_pretrained(self, path: str) -> None:
        Path(path, "tokenizer_stub.json").write_text("{}")


def test_sft_reduction_is_maximum_likelihood(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SFT: the step's gradient is that of (total response-token NLL) / (number of tokens), for any split."""
    norms = [
        _first_step_grad_norm(tiny_model_dir, tmp_path / f"m{m}", micro_batch_size=m, loss="sft")
        for m in (1, 8)
    ]
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items(model)
    out = forward_batch(model, items, 0, CPU)
    (-out["policy_real"].sum() / out["real_lengths"].sum()).backward()
    direct = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert norms[0] == pytest.approx(float(direct), rel=1e-4)
    assert norms[1] == pytest.approx(float(direct), rel=1e-4)


def test_loss_reduction_does_not_depend_on_micro_batching(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One optimizer step over 8 prompts: micro-batches of 1, 2 or 8 give the same gradient."""
    norms = [_first_step_grad_norm(tiny_model_dir, tmp_path / f"m{m}", micro_batch_size=m) for m in (1, 2, 8)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and norms[1] == pytest.approx(norms[2], rel=1e-5)
    # and it is the gradient of the MEAN per-prompt loss (a sum would be 8x larger)
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items(model)
    cfg = _cfg(tmp_path)
    loss = train_mod.loss_from_batch(forward_batch(model, items, 0, CPU), cfg, iteration=0).losses.mean()
    loss.backward()
    direct = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert norms[0] == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("loss", ["space", "spin", "ipo", "simpo", "sft"])
def test_training_loss_falls(tiny_model_dir: Path, tmp_path: Path, loss: str) -> None:
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items(model)
    cfg = _cfg(tmp_path, loss=loss, epochs=6, global_batch_size=4, lr=3e-3)
    info = train_iteration(model, _Tok(), items, cfg, iteration=0, iter_dir=tmp_path / "it")
    lines = [json.loads(x) for x in (tmp_path / "it" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == info["steps"] == 12
    first = (lines[0]["loss"] + lines[1]["loss"]) / 2
    last = (lines[-1]["loss"] + lines[-2]["loss"]) / 2
    assert last < first, (loss, first, last)
    assert (tmp_path / "it" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "it" / "train_state").exists()


def test_non_finite_loss_stops_with_a_clear_message(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items(model)

    def nan_loss(out, cfg, **_) -> LossOutput:
        b = out["policy_real"].shape[0]
        return LossOutput(out["policy_real"] * float("nan"), torch.zeros(b), torch.zeros(b, 2))

    monkeypatch.setattr(train_mod, "loss_from_batch", nan_loss)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 0, step 1"):
        train_iteration(model, _Tok(), items, _cfg(tmp_path), iteration=0, iter_dir=tmp_path / "it")
    assert not (tmp_path / "it" / "model").exists()


def test_nan_weights_stop_through_the_real_loss_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    """NaN log-probs are rejected by the losses' own validation and reported as a training stop."""
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items(model)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 0, step 1"):
        train_iteration(model, _Tok(), items, _cfg(tmp_path), iteration=0, iter_dir=tmp_path / "it")


def test_every_epoch_visits_the_same_micro_batches_in_its_own_order(tmp_path: Path) -> None:
    from spaceft.microbatch import compose, step_groups

    items = [TrainItem((1,) * (1 + i), (2,), ((3,),)) for i in range(10)]
    cfg = _cfg(tmp_path, global_batch_size=4, micro_batch_size=2, epochs=2)
    groups = compose(items, cfg, 0, world=1)
    assert [len(g) for g in groups] == [2, 2, 2, 2, 2]
    assert sorted(i for g in groups for i in g) == list(range(10))  # a partition of the items
    steps = step_groups(groups, cfg, 0)
    assert [len(s) for s in steps] == [2, 2, 1, 2, 2, 1]  # 4 prompts a step; an epoch's last step is short
    first, second = steps[:3], steps[3:]
    assert sorted(g for s in first for g in s) == sorted(g for s in second for g in s) == list(range(5))
    assert first != second  # the same groups, another order
    # when a step holds fewer prompts per process than a micro-batch, the micro-batch shrinks
    two_processes = compose(items, _cfg(tmp_path, global_batch_size=4, micro_batch_size=4), 0, world=2)
    assert [len(g) for g in two_processes] == [2, 2, 2, 2, 2]


def test_stand_ins_keep_the_processes_in_step() -> None:
    """Three processes, a step of 4 groups: every process runs 2 micro-batches; the 2 stand-ins count 0."""
    from spaceft.microbatch import rank_groups

    ranks = [rank_groups([7, 3, 5, 1], r, 3) for r in range(3)]
    assert ranks == [[(7, True), (1, True)], [(3, True), (3, False)], [(5, True), (5, False)]]
    assert sorted(g for r in ranks for g, counts in r if counts) == [1, 3, 5, 7]  # each group counts once
    assert rank_groups([4, 2], 1, 2) == [(2, True)]  # divisible: no stand-in
    assert rank_groups([4], 1, 2) == [(4, False)]  # fewer groups than processes


def test_tensorboard_receives_the_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = load_model(str(tiny_model_dir), ModelConfig())
    cfg = _cfg(tmp_path, epochs=2, global_batch_size=4)
    cfg.logging.report_to = "tensorboard"
    train_iteration(model, _Tok(), _items(model), cfg, iteration=0, iter_dir=tmp_path / "it")
    events = list((tmp_path / "t" / "logs").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"loss", "rewards/real", "rewards/synthetic"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("loss")) == 4


def test_lora_trains_and_saves_a_merged_plain_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = load_model(str(tiny_model_dir), ModelConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items = _items(model)
    cfg = _cfg(tmp_path, epochs=2, global_batch_size=4)
    cfg.model.lora.r = 4
    cfg.model.lora.alpha = 8
    train_iteration(model, _Tok(), items, cfg, iteration=0, iter_dir=tmp_path / "it")
    saved = load_file(tmp_path / "it" / "model" / "model.safetensors")
    assert not any("lora" in k for k in saved), "adapter weights must be merged, not saved separately"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "it" / "model")
    changed = [k for k, v in reloaded.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = _first_step_grad_norm(tiny_model_dir, tmp_path / "plain")
    model = load_model(str(tiny_model_dir), ModelConfig())
    cfg = _cfg(tmp_path / "ckpt")
    cfg.model.gradient_checkpointing = True
    info = train_iteration(model, _Tok(), _items(model), cfg, iteration=0, iter_dir=tmp_path / "ckpt" / "it")
    assert info["grad_norm"] == pytest.approx(plain, rel=1e-5)


def _scored_in_training_batches(model, items: list[TrainItem], cfg) -> list[TrainItem]:
    """The items with the model's own log-probs as the opponent's, computed as the score stage does: in
    the micro-batches training will use, in eval mode without gradients."""
    from dataclasses import replace

    from spaceft.microbatch import compose

    model.eval()
    out = list(items)
    with torch.no_grad():
        for grp in compose(items, cfg, 0, world=1):
            res = forward_batch(model, [items[i] for i in grp], 0, CPU)
            for b, i in enumerate(grp):
                out[i] = replace(items[i], opponent_real=float(res["policy_real"][b]),
                                 opponent_synthetic=tuple(res["policy_synthetic"][b].tolist()))  # fmt: skip
    model.train()
    return out


def test_first_step_reward_bias_is_recorded_and_warned(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mean |reward| at step 1 is logged every iteration. Scores from the training's own micro-batches
    give exactly 0 and no warning; scores off by 0.5 nats, or a model with dropout left on (noise only
    training mode has), are reported with the causes that remain."""
    import logging
    from dataclasses import replace

    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _scored_in_training_batches(model, _items(model), _cfg(tmp_path / "ok"))
    with caplog.at_level(logging.WARNING, logger="spaceft.train"):
        info = train_iteration(
            model, _Tok(), items, _cfg(tmp_path / "ok"), iteration=0, iter_dir=tmp_path / "a"
        )
    first = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/abs_mean"] == 0.0 and "rewards/abs_mean" in info
    assert not [r for r in caplog.records if "first step" in r.getMessage()]
    model = load_model(str(tiny_model_dir), ModelConfig())
    shifted = [
        replace(
            it,
            opponent_real=it.opponent_real + 0.5,
            opponent_synthetic=tuple(v - 0.5 for v in it.opponent_synthetic),
        )
        for it in items
    ]
    with caplog.at_level(logging.WARNING, logger="spaceft.train"):
        train_iteration(model, _Tok(), shifted, _cfg(tmp_path / "bad"), iteration=3, iter_dir=tmp_path / "b")
    first = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/abs_mean"] - 0.5) < 1e-4
    [warning] = [r.getMessage() for r in caplog.records if "first step" in r.getMessage()]
    assert "iteration 3" in warning and "0.5 nats" in warning and "dropout" in warning
    caplog.clear()
    model = load_model(str(tiny_model_dir), ModelConfig())
    for module in model.modules():  # a dropout the loader did not know about
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.2
    with caplog.at_level(logging.WARNING, logger="spaceft.train"):
        train_iteration(model, _Tok(), items, _cfg(tmp_path / "drop"), iteration=1, iter_dir=tmp_path / "c")
    [warning] = [r.getMessage() for r in caplog.records if "first step" in r.getMessage()]
    assert "iteration 1" in warning and "training mode" in warning


def test_the_start_reward_check_divides_out_beta_only_where_the_rewards_carry_it() -> None:
    from spaceft.config import TrainConfig
    from spaceft.train import reward_scale

    assert reward_scale(TrainConfig(loss="spin")) == 0.1  # SPIN's default λ
    assert reward_scale(TrainConfig(loss="spin", beta=0.5)) == 0.5
    assert reward_scale(TrainConfig(loss="space")) == 1.0
    assert reward_scale(TrainConfig(loss="ipo")) == 1.0  # S-IPO's rewards are unscaled
    for loss in ("ipo", "sft"):  # a β these losses would ignore is refused, not divided out
        with pytest.raises(ValueError, match=r"train.beta=100.0 has no effect on the .* loss"):
            TrainConfig(loss=loss, beta=100.0)


def _naive_logp(model: torch.nn.Module, prompt: tuple[int, ...], response: tuple[int, ...]) -> torch.Tensor:
    """Σ log p(response | prompt) from one unpadded full-logits forward (no spaceft code)."""
    ids = torch.tensor([list(prompt) + list(response)])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(response))


def _formula_loss(model: torch.nn.Module, items: list[TrainItem], loss: str, mu: float) -> torch.Tensor:
    """DESIGN.md's objectives, written out per prompt from the formulas (default β, τ = 0.1, γ = 1)."""
    total, tokens = torch.tensor(0.0), 0
    for it in items:
        real = _naive_logp(model, it.prompt_ids, it.real_ids)
        h_real = real - it.opponent_real
        if loss == "sft":
            total, tokens = total - real, tokens + len(it.real_ids)
            continue
        syn = torch.stack([_naive_logp(model, it.prompt_ids, s) for s in it.synthetic_ids])
        h_syn = syn - torch.tensor(it.opponent_synthetic)
        if loss == "space":  # σ_μ(r) = 1 / (1 + μ e^{-r}); -log σ_μ(r_real) - μ · mean_k log(1 - σ_μ(r_k))
            sigma = lambda r: 1 / (1 + mu * torch.exp(-r))  # noqa: E731
            per = -torch.log(sigma(h_real)) - mu * torch.log(1 - sigma(h_syn)).mean()
        elif loss == "spin":  # λ = 0.1
            per = -torch.nn.functional.logsigmoid(0.1 * (h_real - h_syn)).mean()
        elif loss == "ipo":  # τ = 0.1: target margin 1/(2τ) = 5
            per = ((h_real - h_syn - 5.0) ** 2).mean()
        elif loss == "tspin":  # Eq. 7 with α = 1 and, from iteration 1, β = 0.1; no opponent
            proto = _naive_logp(model, it.prompt_ids, it.proto_ids)
            per = (-torch.nn.functional.logsigmoid(real - syn).mean()
                   - 0.1 * torch.nn.functional.logsigmoid(syn - proto).mean())  # fmt: skip
        else:  # simpo, β = 2, γ = 1, lengths in tokens (end-of-turn included)
            lengths = torch.tensor([float(len(s)) for s in it.synthetic_ids])
            margin = 2 * real / len(it.real_ids) - 2 * syn / lengths - 1.0
            per = -torch.nn.functional.logsigmoid(margin).mean()
        total = total + per
    return total / (tokens if loss == "sft" else len(items))


@pytest.mark.parametrize("loss", ["space", "spin", "ipo", "simpo", "tspin", "sft"])
def test_the_gradient_applied_is_the_gradient_of_the_papers_objective(
    tiny_model_dir: Path, tmp_path: Path, loss: str
) -> None:
    """The gradient `train_step` hands to the optimizer, for 7 prompts with K = 3 samples (one equal to
    its real response, prompts and responses of several lengths, rewards away from 0) in micro-batches of
    1 and 7, equals the gradient of the objective written out from the formulas with per-sequence
    unpadded forwards; the loss it logs is that objective's value. T-SPIN trains iteration 1 (its
    historical term is off in iteration 0), each prompt with a proto-synthetic response (one equal to a
    synthetic sample)."""
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = []  # opponent scores moved off the model's own, so that the rewards are not 0
    for i, it in enumerate(_items(model, n=7, k=3)):
        syn, opp = list(it.synthetic_ids), [o + 0.5 * j - 1.0 for j, o in enumerate(it.opponent_synthetic)]
        real = it.opponent_real + 0.3 * (i - 3)
        if i == 2:  # a sample identical to its real response has the real response's opponent score
            syn[1], opp[1] = it.real_ids, real
        items.append(TrainItem(it.prompt_ids, it.real_ids, tuple(syn), real, tuple(opp)))
    if loss == "sft":
        items = [TrainItem(it.prompt_ids, it.real_ids, ()) for it in items]
    if loss == "tspin":
        from dataclasses import replace

        protos = [it.synthetic_ids[0] if i == 3 else tuple(x + 1 for x in it.real_ids) + (7,) * (i % 3)
                  for i, it in enumerate(items)]  # fmt: skip
        # the opponent scores stay: a reference-free loss must ignore them
        items = [replace(it, proto_ids=p) for it, p in zip(items, protos, strict=True)]
    t = 1 if loss == "tspin" else 0
    model.train()
    objective = _formula_loss(model, items, loss, mu=2.0)
    objective.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    for micro in (1, 7):
        cfg = _cfg(tmp_path, loss=loss, mu=2.0, global_batch_size=7, micro_batch_size=micro)
        tr = train_mod.setup(load_model(str(tiny_model_dir), ModelConfig()), items, cfg, iteration=t,
                             iter_dir=tmp_path / f"{loss}-{micro}")  # fmt: skip
        applied = _capture_applied_gradients(tr)
        logged = train_mod.train_step(tr, items, cfg, 0, t, 0)
        assert logged["loss"] == pytest.approx(float(objective), rel=1e-5)
        assert sum(len(tr.groups[g]) for g in tr.steps[0]) == 7 and len(applied) == 1
        assert float((applied[0] - expected).norm() / expected.norm()) < 1e-5, (loss, micro)


def _capture_applied_gradients(tr: train_mod.Trainer) -> list[torch.Tensor]:
    """Replace the optimizer's step by one that records the gradient it would apply."""
    applied: list[torch.Tensor] = []

    def step(*args: object, **kwargs: object) -> None:
        applied.append(torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None]))

    tr.optimizer.step = step  # type: ignore[method-assign]
    return applied
