"""Tests for spaceft.models: dropout is off everywhere once a model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig

from spaceft.config import ModelConfig
from spaceft.models import load_model
from spaceft.token_logps import pack, score_sequences, sequence_logps

SMALL = {"vocab_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}

CONFIGS = {
    # attention dropout lives in a float the attention module copies from the config when it is built
    "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                 attention_dropout=0.5, **SMALL),
    # nn.Dropout modules on embeddings, residuals and attention weights
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, resid_pdrop=0.5, embd_pdrop=0.5,
                               attn_pdrop=0.5, bos_token_id=1, eos_token_id=2),
    # hidden_dropout- and attention_dropout-style settings
    "gpt_neox": lambda: GPTNeoXConfig(hidden_size=32, intermediate_size=64, hidden_dropout=0.5,
                                      attention_dropout=0.5, **SMALL),
}  # fmt: skip


def save(tmp: Path, config: PretrainedConfig) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / config.model_type)
    return tmp / config.model_type


PROMPTS = [[1, 2, 3, 4], [5, 6]]
RESPONSES = [[7, 8, 9], [10, 11, 12, 13, 14]]


def train_mode_logps(model: torch.nn.Module) -> torch.Tensor:
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        return sequence_logps(model, pack(PROMPTS, RESPONSES, pad_id=0))[0]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_training_logps_equal_scores_with_dropout_in_the_config(family: str, tmp_path: Path) -> None:
    path = save(tmp_path, CONFIGS[family]())
    # control: loaded plainly, such a checkpoint's training-mode log-probs are noisy
    plain = AutoModelForCausalLM.from_pretrained(path)
    scores = torch.tensor(
        score_sequences(
            plain, PROMPTS, RESPONSES, pad_id=0, batch_size=2, device=torch.device("cpu"), progress=False
        )
    )
    assert not torch.allclose(train_mode_logps(plain), scores, atol=1e-3)
    # loaded by spaceft: the policy in training mode scores exactly what the frozen opponent scores
    model = load_model(str(path), ModelConfig(name=str(path)))
    opponent = torch.tensor(
        score_sequences(
            model, PROMPTS, RESPONSES, pad_id=0, batch_size=2, device=torch.device("cpu"), progress=False
        )
    )
    torch.testing.assert_close(train_mode_logps(model), opponent, rtol=0, atol=1e-5)
    floats = {
        name: value
        for m in model.modules()
        for name, value in vars(m).items()
        if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float)
    }
    assert all(v == 0.0 for v in floats.values()), floats
    assert bool(floats) == (family != "gpt2")  # GPT-2 has only nn.Dropout modules
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_models_load_whole_after_a_deepspeed_zero3_accelerator_set_the_global_config(
    tiny_model_dir: Path,
) -> None:
    """accelerate leaves transformers' global DeepSpeed config set after training under ZeRO-3: the next
    score or eval load must still get whole weights, not zero.Init partitions with no engine to gather."""
    from transformers.integrations import deepspeed as hf_deepspeed

    class Zero3Config:  # what accelerate's DeepSpeed plugin registers, as far as transformers reads it
        def __init__(self) -> None:
            self.config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self) -> bool:
            return True

    held = Zero3Config()
    hf_deepspeed.set_hf_deepspeed_config(held)
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        model = load_model(str(tiny_model_dir), ModelConfig())
        assert all(p.numel() > 0 for p in model.parameters())
        assert hf_deepspeed.is_deepspeed_zero3_enabled()  # the training side's setting is left as it was
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
