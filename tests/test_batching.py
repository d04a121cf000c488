"""`batch_size=auto`: the memory rule, and the choice made once per run and read back on resume."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spaceft import batching
from spaceft.batching import CPU_CAP, ModelShape, auto_batch_size, per_prompt_bytes
from spaceft.cli import main
from spaceft.configfile import load_config
from spaceft.rundir import read_json

from .conftest import tiny_overrides

CPU = torch.device("cpu")
# Mistral-7B's published shape: 32 layers, 8 KV heads of 128, hidden 4096, MLP 14336, vocab 32000
MISTRAL = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                          num_hidden_layers=32, intermediate_size=14336, vocab_size=32000,
                          tie_word_embeddings=False)  # fmt: skip


def test_the_shape_counts_parameters_and_bytes_by_hand() -> None:
    shape = ModelShape.of(MISTRAL)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (32, 8, 128)
    assert shape.parameters == 7_241_465_856  # Mistral-7B-v0.1 has 7,241,732,096 (+ 65 norms of 4096)
    # bf16, 1024 prompt + 256 new tokens: KV 2*32*8*128*1280*2 B, prefill 1024*(4*4096 + 3*14336)*2 B,
    # sampling 6*32000*4 B
    assert per_prompt_bytes(shape, 1024, 256, "bfloat16") == 167_772_160 + 121_634_816 + 768_000


def test_every_expert_of_a_mixture_is_counted() -> None:
    # Mixtral-8x7B: Mistral's shape with 8 experts; 46,702,792,704 published = this + routers + norms
    mixtral = SimpleNamespace(**vars(MISTRAL), num_local_experts=8)
    assert ModelShape.of(mixtral).parameters == 46_702_792_704 - 32 * 4096 * 8 - 65 * 4096


def test_k_samples_per_prompt_are_k_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = ModelShape.of(MISTRAL)
    per = per_prompt_bytes(shape, 512, 512, "bfloat16")
    total = (2 * 40 * per + shape.parameters * 2) / 0.8  # room for 40 rows
    monkeypatch.setattr(batching, "device_memory", lambda device: int(total) + 1)
    size = {k: auto_batch_size(shape, prompt_tokens=512, new_tokens=512, dtype="bfloat16", device=CPU,
                               rows_per_prompt=k) for k in (1, 4, 8)}  # fmt: skip
    assert size == {1: 32, 4: 8, 8: 4}
    monkeypatch.setattr(batching, "device_memory", lambda device: 10**15)
    assert auto_batch_size(shape, prompt_tokens=8, new_tokens=8, dtype="bfloat16", device=CPU,
                           rows_per_prompt=8) == CPU_CAP // 8  # fmt: skip


def test_auto_outside_a_run_is_a_fixed_number() -> None:
    assert batching.concrete("auto") == batching.UNRESOLVED == 16 and batching.concrete(5) == 5


@pytest.mark.parametrize(
    ("prompts_that_fit", "expected"), [(0.5, 1), (1, 1), (5.5, 4), (8, 8), (63, 32), (64, 64), (10_000, 64)]
)
def test_the_batch_is_the_largest_power_of_two_that_fits(
    monkeypatch: pytest.MonkeyPatch, prompts_that_fit: float, expected: int
) -> None:
    shape = ModelShape.of(MISTRAL)
    per = per_prompt_bytes(shape, 512, 512, "bfloat16")
    weights = shape.parameters * 2
    total = (2 * prompts_that_fit * per + weights) / 0.8  # budget = (0.8 total - weights) / 2
    monkeypatch.setattr(batching, "device_memory", lambda device: int(total) + 1)
    got = auto_batch_size(shape, prompt_tokens=512, new_tokens=512, dtype="bfloat16", device=CPU)
    assert got == expected


def test_no_room_decodes_one_prompt_at_a_time_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(batching, "device_memory", lambda device: 10**9)  # 1 GB: less than the weights
    with caplog.at_level(logging.WARNING, logger="spaceft.batching"):
        assert auto_batch_size(ModelShape.of(MISTRAL), prompt_tokens=8, new_tokens=8, dtype="float32",
                               device=CPU) == 1  # fmt: skip
    assert "no room" in caplog.text


@pytest.mark.parametrize("value", ["big", 0, -4])
def test_a_batch_size_is_a_positive_integer_or_auto(value: object) -> None:
    data = "data.train=builtin:arithmetic"
    with pytest.raises(ValueError, match=r"generation.batch_size must be an integer >= 1 or auto"):
        load_config(None, [data, f"generation.batch_size={value}"])
    assert load_config(None, [data, "eval.batch_size=auto"]).eval.batch_size == "auto"
    assert load_config(None, [data, "eval.batch_size=12"]).eval.batch_size == 12


@pytest.mark.slow
def test_auto_is_chosen_once_per_run_and_read_back_on_resume(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"generation.batch_size": "auto", "eval.batch_size": "auto", "selfplay.iterations": 1}
    # memory for 2 prompts of generation by the rule (the tiny model's own shape)
    real = ModelShape.of

    def shape_of(config: object) -> ModelShape:
        shape = real(config)
        per = per_prompt_bytes(shape, 512, 12, "float32")  # tiny recipe: 512 prompt tokens, 12 new
        memory = int((4 * per + shape.parameters * 4) / 0.8)
        monkeypatch.setattr(batching, "device_memory", lambda device: memory)
        return shape

    monkeypatch.setattr(batching.ModelShape, "of", staticmethod(shape_of))
    assert main(["run", "tiny", *tiny_overrides(tmp_path, tiny_model_dir, **over)]) == 0
    run = tmp_path / "runs" / "tiny-space"
    recorded = read_json(run / "manifest.json")["batch_sizes"]
    assert recorded["generation"] == 2
    assert recorded["eval"] == 1  # a longer budget per prompt (512 response tokens) in the same memory
    # the machine "changes": the next iteration still cuts its batches as the run chose
    monkeypatch.setattr(batching, "device_memory", lambda device: 10**12)
    over["selfplay.iterations"] = 2
    assert main(["run", "tiny", *tiny_overrides(tmp_path, tiny_model_dir, **over)]) == 0
    assert read_json(run / "manifest.json")["batch_sizes"] == recorded


@pytest.mark.slow
def test_a_run_from_before_auto_keeps_its_number_and_is_not_stale(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    over = {"generation.batch_size": 4, "eval.batch_size": 2, "selfplay.iterations": 1}
    assert main(["run", "tiny", *tiny_overrides(tmp_path, tiny_model_dir, **over)]) == 0
    run = tmp_path / "runs" / "tiny-space"
    before = read_json(run / "manifest.json")
    assert "batch_sizes" not in before
    # the same run after an upgrade whose default is auto: resumed for one more iteration, not refused
    over.update({"generation.batch_size": "auto", "eval.batch_size": "auto", "selfplay.iterations": 2})
    assert main(["run", "tiny", *tiny_overrides(tmp_path, tiny_model_dir, **over)]) == 0
    after = read_json(run / "manifest.json")
    assert after["batch_sizes"] == {"generation": 4, "eval": 2}
    assert after["iterations"]["0"] == before["iterations"]["0"]
    # --force with another training config discards the work, and the numbers chosen for it
    over["train.lr"] = 0.01
    assert main(["run", "tiny", "--force", *tiny_overrides(tmp_path, tiny_model_dir, **over)]) == 0
    assert read_json(run / "manifest.json")["batch_sizes"] != {"generation": 4, "eval": 2}
