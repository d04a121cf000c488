"""Generation: stop handling, seeding, greedy decoding, and a resumable, idempotent stage."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from spaceft.config import GenerationConfig, ModelConfig
from spaceft.generate import HFGenerator, merge_generate_parts, write_generate_parts
from spaceft.generate_vllm import vllm_completion
from spaceft.models import load_model
from spaceft.rundir import InjectedFault, read_table
from spaceft.sampler import Completion, cut_at_stop

CPU = torch.device("cpu")


def test_cut_at_stop() -> None:
    assert cut_at_stop([5, 6, 9, 0, 0], {9}).response_ids == (5, 6, 9)
    capped = cut_at_stop([5, 6, 7], {9})
    assert capped.hit_cap and capped.response_ids == (5, 6, 7)
    # an unfinished sample keeps every sampled token, even ones equal to the pad id
    assert cut_at_stop([5, 0, 0], {9}).response_ids == (5, 0, 0)


def check_stop_rule(samples: list[list[Completion]], stop_ids: set[int], max_new_tokens: int) -> None:
    """The one way a sample may end, whatever the backend: its first stop id (which was sampled, and is
    kept) and nothing after it; or, capped, exactly max_new_tokens ids with no stop id among them."""
    for comps in samples:
        for c in comps:
            ids = list(c.response_ids)
            stops = [i for i, tok in enumerate(ids) if tok in stop_ids]
            if c.hit_cap:
                assert not stops and len(ids) == max_new_tokens, ids
            else:
                assert stops == [len(ids) - 1] and len(ids) <= max_new_tokens, ids


def test_vllm_outputs_follow_the_hf_rule_and_nothing_is_appended() -> None:
    """vLLM's token_ids (stop id kept) become the same Completion as HF's padded rows; a sequence that
    ran out of tokens is capped as it is, never given a stop id that was not sampled."""
    stop = {9, 11}
    for sampled in ([5, 6, 9], [5, 6, 11], [5, 6, 7], [9]):
        padded = [*sampled, 0, 0]  # what HF returns for a finished row of a longer batch
        assert vllm_completion(sampled, stop) == cut_at_stop(padded if set(sampled) & stop else sampled, stop)
    assert vllm_completion([5, 6, 7], stop) == Completion((5, 6, 7), hit_cap=True)
    check_stop_rule([[vllm_completion(s, stop) for s in ([5, 9], [5, 6, 7])]], stop, max_new_tokens=3)


def test_hf_samples_end_by_the_stop_rule(model, tiny_tokenizer) -> None:
    eos = tiny_tokenizer.eos_token_id
    gen = _gen(model, tiny_tokenizer, num_samples=4, max_new_tokens=6)
    # a model that favours eos stops early in some samples; the tiny random one usually runs to the cap
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 2.5
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        samples = gen.generate([[40, 41, 42], [50, 51], [60]], num_samples=4, seeds=[1, 2, 3])
    finally:
        handle.remove()
    check_stop_rule(samples, {eos}, max_new_tokens=6)
    flat = [c for comps in samples for c in comps]
    assert any(c.hit_cap for c in flat) and any(not c.hit_cap for c in flat)  # both endings occurred


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir), ModelConfig())


def _gen(model, tiny_tokenizer, **cfg) -> HFGenerator:
    return HFGenerator(model, GenerationConfig(**cfg), stop_ids=[tiny_tokenizer.eos_token_id],
                       pad_id=tiny_tokenizer.pad_token_id, device=CPU)  # fmt: skip


def test_sampling_is_seeded_and_gives_k_samples(model, tiny_tokenizer) -> None:
    gen = _gen(model, tiny_tokenizer, num_samples=3, max_new_tokens=10)
    prompts = [[40, 41, 42], [50, 51]]
    a = gen.generate(prompts, num_samples=3, seeds=[7, 1])
    b = gen.generate(prompts, num_samples=3, seeds=[7, 1])
    c = gen.generate(prompts, num_samples=3, seeds=[8, 1])
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3]
    assert all(1 <= len(s.response_ids) <= 10 for x in a for s in x)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("repetition_penalty", 5.0),
        ("no_repeat_ngram_size", 1),
        ("forced_eos_token_id", "eos"),  # would end every capped sample with an eos never sampled
        ("sequence_bias", {(45,): 50.0}),
        ("exponential_decay_length_penalty", (1, 5.0)),
    ],
)
def test_model_generation_config_does_not_change_sampling(model, tiny_tokenizer, setting, value) -> None:
    """Settings shipped in a checkpoint's generation_config must not alter samples from p_θt."""
    gen = _gen(model, tiny_tokenizer, num_samples=2, max_new_tokens=8)
    before = gen.generate([[40, 41, 42]], num_samples=2, seeds=[3])
    shipped = model.generation_config
    model.generation_config = copy.deepcopy(shipped)
    setattr(model.generation_config, setting, tiny_tokenizer.eos_token_id if value == "eos" else value)
    try:
        assert gen.generate([[40, 41, 42]], num_samples=2, seeds=[3]) == before
        assert getattr(model.generation_config, setting) is not None  # the model's own config is kept
    finally:
        model.generation_config = shipped


def test_greedy_is_argmax_and_ignores_padding(model, tiny_tokenizer) -> None:
    gen = _gen(model, tiny_tokenizer, temperature=0.0, max_new_tokens=5)
    prompt = [40, 41, 42, 43]
    alone = gen.generate([prompt], num_samples=1, seeds=[0])[0][0]
    padded = gen.generate([prompt, [7] * 9], num_samples=1, seeds=[123, 4])[0][
        0
    ]  # left-padded next to a longer one
    assert alone == padded
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(alone.response_ids)):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert tuple(ids[len(prompt) :]) == alone.response_ids


def test_stage_resumes_and_overwrites(model, tiny_tokenizer, tmp_path: Path, monkeypatch) -> None:
    cfg = GenerationConfig(num_samples=2, max_new_tokens=6, batch_size=3)
    gen = _gen(model, tiny_tokenizer, num_samples=2, max_new_tokens=6, batch_size=3)
    prompts = [(i, [40 + i % 5] * (1 + i % 4)) for i in range(10)]

    def run(out: Path) -> dict:
        write_generate_parts(gen, prompts, out, cfg, iteration=0, decode=str, progress=False)
        return merge_generate_parts(out, len(prompts), cfg)

    ref = tmp_path / "ref.parquet"
    info = run(ref)
    assert info["rows"] == 20
    out = tmp_path / "syn.parquet"
    monkeypatch.setenv("SPACEFT_FAULT", "generate:2")
    with pytest.raises(InjectedFault):
        run(out)
    monkeypatch.delenv("SPACEFT_FAULT")
    run(out)
    rows = read_table(out)
    assert sorted((r["prompt_index"], r["sample"]) for r in rows) == [
        (i, j) for i in range(10) for j in range(2)
    ]
    assert rows == read_table(ref)  # a resumed stage equals an uninterrupted one
    run(out)  # re-running overwrites, never appends
    assert len(read_table(out)) == 20


def test_samples_that_stop_on_eos_instead_of_end_of_turn_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Llama 3 stops on <|eot_id|> or <|end_of_text|>; real responses end on <|eot_id|> only, so a sample
    ending on the other marks itself synthetic: the generate entry counts them and warns."""
    import logging

    from spaceft.rundir import write_parts

    eot, eos = 9, 7
    rows = [
        {"prompt_index": 0, "sample": 0, "response_ids": [5, eot], "length": 2, "hit_cap": False},
        {"prompt_index": 0, "sample": 1, "response_ids": [5, eos], "length": 2, "hit_cap": False},
        {"prompt_index": 1, "sample": 0, "response_ids": [5, 5, 5], "length": 3, "hit_cap": True},
        {"prompt_index": 1, "sample": 1, "response_ids": [eot], "length": 1, "hit_cap": False},
    ]
    out = tmp_path / "synthetic.parquet"
    cfg = GenerationConfig(num_samples=2, batch_size=2)
    write_parts(out, 1, lambda c: rows, stage="generate")
    with caplog.at_level(logging.WARNING, logger="spaceft.generate"):
        entry = merge_generate_parts(out, 2, cfg, end_of_turn=eot)
    assert entry["other_stop_fraction"] == 0.25 and entry["capped_fraction"] == 0.25
    assert "1 of 4 samples stopped on a stop token other than end-of-turn (id 9)" in caplog.text


@pytest.mark.slow
def test_samples_are_drawn_under_the_autocast_that_scores_them(
    model, tiny_tokenizer, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under train.mixed_precision=bf16 the score stage records bf16-autocast log-probs as the samples'
    density: the generate stage samples under that autocast too (float32 weights, bf16 matmuls)."""
    from spaceft import generate as generate_module
    from spaceft.cli import main

    from .conftest import tiny_overrides

    seen: list[bool] = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        for precision in ("bf16", "no"):
            gen = HFGenerator(model, GenerationConfig(max_new_tokens=4),
                              stop_ids=[tiny_tokenizer.eos_token_id],
                              pad_id=tiny_tokenizer.pad_token_id, device=CPU,
                              mixed_precision=precision)  # fmt: skip
            seen.clear()
            gen.generate([[40, 41, 42]], num_samples=1, seeds=[0])
            assert seen and all(s == (precision == "bf16") for s in seen), precision
    finally:
        hook.remove()
    built: list[str] = []
    real = generate_module.HFGenerator

    def spy(*args: object, **kwargs: object) -> HFGenerator:
        built.append(str(kwargs.get("mixed_precision")))
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "HFGenerator", spy)
    settings = {"train.mixed_precision": "bf16", "selfplay.iterations": 1, "eval.enabled": False}
    over = tiny_overrides(tmp_path, tiny_model_dir, **settings)
    assert main(["-q", "run", "tiny", *over]) == 0
    assert built == ["bf16"]
