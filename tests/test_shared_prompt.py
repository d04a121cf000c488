"""Shared-prompt batches give the unshared path's log-probs and gradients (float32, 1e-5) from fewer tokens.

The prompts come from the zephyr stand-in tokenizer (SentencePiece-style, BOS added, the generation
prompt ``<|assistant|>`` without a newline), so the prompt tokens decide every response's first
log-prob; the prompts in one micro-batch have different lengths, so the rows pad differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from spaceft.chat import tokenize_examples
from spaceft.configfile import config_from_dict
from spaceft.data import Example
from spaceft.microbatch import TrainItem, composition_tag, forward_batch, packed_length
from spaceft.shared_prompt import pack_tree, tree_mask
from tests.chat_tokenizers import zephyr

CPU = torch.device("cpu")
TOL = 1e-5


def test_pack_tree_by_hand() -> None:
    """Prompt (1, 2), responses (3, 4) and (5,) of prompt 0; prompt (6, 7, 8) with response (9,):

    row 0  ids 1 2 3 4 5 · · ; positions 0 1 2 3 2 0 0 ; segments 0 0 1 1 2 -1 -1
    row 1  ids 6 7 8 9 · · · ; positions 0 1 2 3 0 0 0 ; segments 0 0 0 3 -1 -1 -1
    Response (5,) sits at index 4 with position 2 (it follows the 2-token prompt) and is predicted by
    index 1, the prompt's last token, not by index 3 (the other response's last)."""
    batch = pack_tree([(1, 2), (6, 7, 8)], [(3, 4), (5,), (9,)], [0, 0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    assert batch.segments.tolist() == [[0, 0, 1, 1, 2], [0, 0, 0, 3, -1]]
    assert batch.rows.tolist() == [0, 0, 1]
    assert batch.targets.tolist() == [[2, 3], [4, 0], [3, 0]]
    assert batch.predictors.tolist() == [[1, 2], [1, 0], [2, 0]]
    assert batch.response_mask.tolist() == [[1, 1], [1, 0], [1, 0]]
    assert batch.num_tokens == 9  # 2 + 3 + 1 (prompt 0 and its responses) + 3 + 1
    mask = tree_mask(batch.segments)[:, 0].int()
    assert mask[0].tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # the second response sees the prompt and itself, not the first response
    ]
    assert mask[1, 4].tolist() == [0, 0, 0, 0, 1]  # padding sees only itself: no empty softmax row


def test_length_grouping_sorts_by_the_rows_the_path_packs() -> None:
    """Prompt 3, real 2, synthetic 4 and 1: unshared rows are at most 3 + 4 = 7 tokens, the shared row
    3 + 2 + 4 + 1 = 10."""
    item = TrainItem((1, 2, 3), (4, 5), ((6, 7, 8, 9), (10,)))
    assert packed_length(item) == 7
    assert packed_length(item, shared=True) == 10


def _zephyr_ids() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], int]:
    """Four prompts of 12-40 tokens and their responses through the zephyr template; the vocabulary size."""
    tok = zephyr()
    turns = [
        ({"role": "user", "content": "Hello"}, "Hello world"),
        ({"role": "user", "content": "what is the answer to question please explain it"}, "The answer is"),
        ({"role": "user", "content": "explain it in one sentence"}, "sure here you are thanks"),
        ({"role": "user", "content": "please explain the answer in one sentence a an of and the question"},
         "an answer"),
    ]  # fmt: skip
    system = {"role": "system", "content": "You be helpful"}
    examples = [Example(prompt=(system, u) if i % 2 else (u,), response=r, source=str(i))
                for i, (u, r) in enumerate(turns)]  # fmt: skip
    tokenized, _ = tokenize_examples(tok, examples, max_prompt_tokens=100, max_response_tokens=20)
    return [t.prompt_ids for t in tokenized], [t.response_ids for t in tokenized], len(tok)


def _items(k: int, proto: bool) -> tuple[list[TrainItem], int]:
    """Each prompt's real response, K others' as synthetic ones and (optionally) one more as proto."""
    prompts, responses, vocab = _zephyr_ids()
    n = len(prompts)
    items = [
        TrainItem(p, responses[i], tuple(responses[(i + 1 + j) % n] for j in range(k)),
                  proto_ids=responses[(i + 2) % n] if proto else ())
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    assert len({len(p) for p in prompts}) == n  # different lengths in one micro-batch
    return items, vocab


def _llama(vocab: int, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)  # fmt: skip
    return LlamaForCausalLM(config)


def _logps_and_grads(model: torch.nn.Module, items: list[TrainItem], shared: bool, path: str = "chunked"):
    """All log-probs of the batch in forward_batch's order and the gradient of a weighted sum of them."""
    model.zero_grad()
    out = forward_batch(model, items, 0, CPU, path=path, shared=shared)
    logps = torch.cat([out["policy_real"], out["policy_synthetic"].flatten(), out.get("policy_proto",
                      torch.zeros(0))])  # fmt: skip
    weights = torch.linspace(1.0, -1.0, logps.numel())  # distinct per row: a misplaced row changes it
    (weights * logps).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    lengths = torch.cat([out["real_lengths"], out["synthetic_lengths"].flatten()])
    return logps.detach(), grads, lengths, int(out["num_tokens"])


def _assert_same(model: torch.nn.Module, items: list[TrainItem], path: str = "chunked") -> tuple[int, int]:
    plain, plain_g, plain_len, plain_tokens = _logps_and_grads(model, items, False, path)
    tree, tree_g, tree_len, tree_tokens = _logps_and_grads(model, items, True, path)
    torch.testing.assert_close(tree, plain, rtol=0, atol=TOL)
    assert tree_len.tolist() == plain_len.tolist()
    assert tree_g.keys() == plain_g.keys() and plain_g
    for name, grad in plain_g.items():
        torch.testing.assert_close(tree_g[name], grad, rtol=0, atol=TOL * max(1.0, float(grad.abs().max())),
                                   msg=name)  # fmt: skip
    return plain_tokens, tree_tokens


@pytest.mark.parametrize(("k", "proto", "attn", "path"), [
    (1, False, "sdpa", "chunked"),
    (3, True, "sdpa", "logits"),  # T-SPIN's proto rows; the float32 head on every kept position
    (3, False, "eager", "chunked"),  # an additive float mask
])  # fmt: skip
def test_shared_prompt_equals_unshared(k: int, proto: bool, attn: str, path: str) -> None:
    items, vocab = _items(k, proto)
    plain_tokens, tree_tokens = _assert_same(_llama(vocab, attn), items, path)
    prompt_tokens = sum(len(it.prompt_ids) for it in items)
    assert plain_tokens - tree_tokens == prompt_tokens * (k + proto)  # each prompt forwarded once


def test_shared_prompt_equals_unshared_under_activation_checkpointing() -> None:
    items, vocab = _items(2, False)
    model = _llama(vocab)
    model.gradient_checkpointing_enable()
    model.train()
    _assert_same(model, items)


def test_shared_prompt_on_the_logits_path() -> None:
    """A model whose logits are not a linear head of its hidden states (soft-capped here) keeps its own
    logits: gathered at each response token's predictor, they give the unshared values."""
    items, vocab = _items(2, True)
    inner = _llama(vocab)

    class SoftCapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_output_embeddings(self) -> torch.nn.Module:
            return inner.lm_head

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = torch.tanh(out.logits / 0.5) * 0.5
            return out

    _assert_same(SoftCapped(), items)


def test_attention_that_takes_no_custom_mask_is_refused() -> None:
    items, _ = _items(1, False)
    model = torch.nn.Module()  # refused before any forward runs: a config is all it reads
    model.config = SimpleNamespace(_attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=r"model\.attn_implementation=sdpa or train\.shared_prompt=false"):
        forward_batch(model, items, 0, CPU, shared=True)


def test_flash_attention_with_shared_prompts_is_refused_at_config_time(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"use sdpa .* or set train\.shared_prompt=false"):
        config_from_dict({"name": "t", "output_dir": str(tmp_path), "data": {"train": "x"},
                          "model": {"attn_implementation": "flash_attention_2"},
                          "train": {"shared_prompt": True}})  # fmt: skip


def test_a_sliding_window_that_would_bind_is_refused() -> None:
    """The window is on positions; a shared row is longer than its positions, so only an unshared row
    longer than the window (here 20 tokens; the longest is 29) would be treated differently: refused,
    not approximated."""
    items, vocab = _items(1, False)
    config = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=20,
                           attn_implementation="sdpa")  # fmt: skip
    with pytest.raises(ValueError, match="sliding window"):
        forward_batch(MistralForCausalLM(config), items, 0, CPU, shared=True)
    config.sliding_window = 4096
    _assert_same(MistralForCausalLM(config), items)


def test_the_setting_changes_the_composition_tag(tmp_path: Path) -> None:
    """Scores made by one path are not read by the other (they agree to 1e-5, not bit for bit)."""
    items, _ = _items(1, False)

    def tag(shared: bool) -> str:
        cfg = config_from_dict({"name": "t", "output_dir": str(tmp_path), "data": {"train": "x"},
                                "train": {"shared_prompt": shared}})  # fmt: skip
        return composition_tag([(0, 1), (2, 3)], items, cfg)

    assert tag(True) != tag(False)


def test_a_run_scores_and_trains_on_shared_rows(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`spaceft run` with train.shared_prompt=true: the score stage and training both forward shared
    rows, so the first step's rewards are exactly 0."""
    from spaceft import microbatch
    from spaceft.cli import main

    from .conftest import tiny_overrides

    calls: list[bool] = []
    real = microbatch.tree_logps
    monkeypatch.setattr(microbatch, "tree_logps",
                        lambda m, *a, **k: calls.append(m.training) or real(m, *a, **k))  # fmt: skip
    over = {"selfplay.iterations": 1, "eval.enabled": "false", "generation.num_samples": 2,
            "train.shared_prompt": "true"}  # fmt: skip
    assert main(["run", "tiny", *tiny_overrides(tmp_path, tiny_model_dir, **over)]) == 0
    assert False in calls and True in calls  # eval mode (score stage) and train mode (training)
    run_dir = next((tmp_path / "runs").iterdir())
    first = json.loads((run_dir / "iter_0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/abs_mean"] == 0.0


def test_the_log_prob_path_and_the_auto_rule_change_the_composition_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scores cached under one head path, or under another version of `auto`'s rule (which may pick
    another path for a micro-batch), are re-scored rather than read."""
    from spaceft import microbatch

    items, _ = _items(1, False)

    def tag(path: str) -> str:
        cfg = config_from_dict({"name": "t", "output_dir": str(tmp_path), "data": {"train": "x"},
                                "train": {"logps_path": path}})  # fmt: skip
        return composition_tag([(0, 1), (2, 3)], items, cfg)

    tags = {path: tag(path) for path in ("auto", "chunked", "logits")}
    assert len(set(tags.values())) == 3
    monkeypatch.setattr(microbatch, "AUTO_RULE", "auto/next")
    assert tag("auto") != tags["auto"] and tag("chunked") == tags["chunked"]
