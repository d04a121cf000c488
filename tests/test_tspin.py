"""T-SPIN in the pipeline: the proto-synthetic rows in the one forward, y0 drawn once from the start
model, no opponent and no score stage, and the shipped recipe run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spaceft.config import ModelConfig
from spaceft.microbatch import TrainItem, forward_batch, packed_length
from spaceft.models import load_model

CPU = torch.device("cpu")


def _naive_logp(model: torch.nn.Module, prompt: tuple[int, ...], response: tuple[int, ...]) -> float:
    """Σ log p(response | prompt) from one unpadded full-logits forward of that sequence alone."""
    ids = torch.tensor([list(prompt) + list(response)])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(response)))


def _items() -> list[TrainItem]:
    """Three prompts of 3-5 tokens, K = 2, proto responses of 2, 6 and 3 tokens (the second one the
    longest sequence of the batch, so its rows decide the padding)."""
    return [
        TrainItem((5, 6, 7), (8, 9, 10), ((11, 12), (13,)), proto_ids=(14, 15)),
        TrainItem((20, 21, 22, 23, 24), (25, 26), ((27, 28, 29), (30, 31)), proto_ids=tuple(range(32, 38))),
        TrainItem((40, 41, 42, 43), (44,), ((45,), (46, 47)), proto_ids=(48, 49, 50)),
    ]


def test_forward_batch_adds_the_proto_rows_to_the_one_forward(tiny_model_dir: Path) -> None:
    """policy_proto [B] and proto_lengths [B] equal separate unpadded forwards (float32, 1e-5), and the
    real and synthetic log-probs are those of the same batch without proto rows."""
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items()
    with torch.no_grad():
        out = forward_batch(model, items, pad_id=0, device=CPU)
        without = [TrainItem(it.prompt_ids, it.real_ids, it.synthetic_ids) for it in items]
        plain = forward_batch(model, without, pad_id=0, device=CPU)
        naive = torch.tensor([_naive_logp(model, it.prompt_ids, it.proto_ids) for it in items])
    assert out["policy_proto"].shape == (3,) and out["proto_lengths"].tolist() == [2, 6, 3]
    assert torch.allclose(out["policy_proto"], naive, atol=1e-5, rtol=0)
    assert torch.allclose(out["policy_real"], plain["policy_real"], atol=1e-5, rtol=0)
    assert torch.allclose(out["policy_synthetic"], plain["policy_synthetic"], atol=1e-5, rtol=0)
    assert "policy_proto" not in plain and "proto_lengths" not in plain
    assert int(out["num_tokens"]) == int(plain["num_tokens"]) + sum(len(it.prompt_ids) + len(it.proto_ids)
                                                                    for it in items)  # fmt: skip
    assert packed_length(items[1]) == 5 + 6  # the proto response is the longest


def test_a_batch_where_only_some_prompts_have_a_proto_response_is_refused(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), ModelConfig())
    items = _items()
    items[1] = TrainItem(items[1].prompt_ids, items[1].real_ids, items[1].synthetic_ids)
    with pytest.raises(ValueError, match="proto-synthetic response or none has"):
        forward_batch(model, items, pad_id=0, device=CPU)


def test_tspin_on_fixed_samples_is_refused_unless_the_historical_term_is_off() -> None:
    """With selfplay.resample=false every sample is its own proto response: the historical term is ℓ(0)
    whatever θ, so the run is refused unless it asks for that ablation by name (history_weight=0)."""
    from spaceft.configfile import config_from_dict

    base = {"data": {"train": "x"}, "train": {"loss": "tspin"}, "selfplay": {"resample": False}}
    with pytest.raises(ValueError, match=r"train\.history_weight=0 to run that ablation"):
        config_from_dict(base)
    cfg = config_from_dict({**base, "train": {"loss": "tspin", "history_weight": 0.0}})
    assert cfg.train.history_weight_for(3) == 0.0


def test_the_shipped_recipe_has_the_papers_defaults() -> None:
    """α = 1, β = 0.1 from iteration 1, K = 1 (arXiv 2601.08198, Sec. 4.3); no opponent."""
    from spaceft.configfile import load_config

    cfg = load_config("demo_tspin")
    t = cfg.train
    assert (t.loss, t.beta, cfg.generation.num_samples) == ("tspin", 1.0, 1)
    assert (t.history_weight_for(0), t.history_weight_for(1), t.history_weight_for(4)) == (0.0, 0.1, 0.1)
    assert not t.loss.needs_opponent and t.loss.uses_proto and cfg.selfplay.resample


@pytest.mark.slow
def test_demo_tspin_runs_offline_without_an_opponent_and_trains_on_iteration_0s_first_samples(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`spaceft run demo_tspin` with the tiny model, 2 iterations: no score stage and no
    opponent_logps.parquet; both iterations train every prompt with iteration 0's sample 0 as y0 (in
    iteration 0 it is also the synthetic response, so the proto and synthetic rewards agree); the log and
    the report say the run is reference-free."""
    import logging

    from spaceft import stage_fns
    from spaceft.cli import main
    from spaceft.rundir import read_json, read_jsonl, read_table

    from .conftest import tiny_overrides

    trained: dict[int, list[TrainItem]] = {}
    real_train = stage_fns.train_iteration

    def recording(model, tokenizer, items, cfg, *, iteration, iter_dir):  # what each iteration trains on
        trained[iteration] = list(items)
        return real_train(model, tokenizer, items, cfg, iteration=iteration, iter_dir=iter_dir)

    monkeypatch.setattr(stage_fns, "train_iteration", recording)
    over = tiny_overrides(tmp_path, tiny_model_dir, **{"selfplay.iterations": 2, "data.train_size": 4,
                                                        "data.max_prompt_tokens": 512})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="spaceft"):
        assert main(["run", "demo_tspin", *over]) == 0
    run_dir = tmp_path / "runs" / "demo-tspin"
    manifest = read_json(run_dir / "manifest.json")
    assert manifest["config"]["train"]["loss"] == "tspin"
    for t in (0, 1):
        assert "score" not in manifest["iterations"][str(t)] and manifest["iterations"][str(t)]["train"]
        assert not (run_dir / f"iter_{t}" / "opponent_logps.parquet").exists()
    def samples(t: int) -> list[tuple[int, ...]]:
        rows = read_table(run_dir / f"iter_{t}" / "synthetic.parquet")
        return sorted(tuple(r["response_ids"]) for r in rows if r["sample"] == 0)

    assert len(trained[0]) == len(trained[1]) == len(samples(0)) == 4
    # iteration 0: each prompt's y0 is its own (only) synthetic response, sample 0 of iteration 0
    assert all(it.synthetic_ids == (it.proto_ids,) for it in trained[0])
    assert sorted(it.proto_ids for it in trained[0]) == samples(0)
    # iteration 1: the synthetic responses are its own samples, each prompt keeps iteration 0's y0
    proto = {it.prompt_ids: it.proto_ids for it in trained[0]}
    assert all(it.proto_ids == proto[it.prompt_ids] for it in trained[1])
    assert sorted(it.synthetic_ids[0] for it in trained[1]) == samples(1) != samples(0)
    m0 = read_jsonl(run_dir / "iter_0" / "metrics.jsonl")
    assert all(m["rewards/proto"] == m["rewards/synthetic"] for m in m0)
    assert "rewards/proto" in read_jsonl(run_dir / "iter_1" / "metrics.jsonl")[-1]
    # training cost counts the proto rows: epochs × Σ over items of its prompt with each of its 3 responses
    from spaceft.costs import run_costs

    tokens = [sum(3 * len(it.prompt_ids) + len(it.real_ids) + len(it.synthetic_ids[0]) + len(it.proto_ids)
                  for it in trained[t]) for t in (0, 1)]  # fmt: skip
    assert [c.trained for c in run_costs(run_dir)] == [2 * n for n in tokens]  # demo: 2 epochs
    assert "tspin is reference-free: no score stage" in caplog.text
    assert "Reference-free: no score stage" in (run_dir / "report.md").read_text()
