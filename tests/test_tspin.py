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
