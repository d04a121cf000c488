"""Evaluation: the task metric on hand-made outputs, pluggable metrics, and held-out NLL bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spaceft.chat import TokenizedExample
from spaceft.config import EvalConfig, ModelConfig
from spaceft.data import Example
from spaceft.evaluate import answer_exact_match, finish_eval, resolve_metric, write_eval_parts
from spaceft.models import load_model


def ex(answer: str | None, response: str = "x") -> Example:
    return Example(prompt=({"role": "user", "content": "q"},), response=response, answer=answer)


@pytest.mark.parametrize(
    ("output", "example", "ok"),
    [
        ("3 + 4 = 7\n#### 7", ex("7"), True),
        ("#### 7.0", ex("7"), True),
        ("The answer is 1,000.", ex("1000"), True),
        ("3 + 4 = 8\n#### 8", ex("7"), False),
        ("I don't know", ex("7"), False),
        ("#### 12", ex(None, response="5 + 7 = 12\n#### 12"), True),  # answer parsed from the reference
    ],
)
def test_answer_exact_match_on_hand_made_outputs(output: str, example: Example, ok: bool) -> None:
    assert answer_exact_match(output, example) is ok


def always(output: str, example: Example) -> bool:
    return True


def never(output: str, example: Example) -> bool:
    return False


def test_pluggable_metric_is_imported_by_name() -> None:
    assert resolve_metric("tests.test_evaluate:always") is always
    assert resolve_metric("none") is None
    with pytest.raises(ValueError, match="cannot import 'nope'"):
        resolve_metric("tests.test_evaluate:nope")


def test_evaluate_writes_nll_and_accuracy(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    model = load_model(str(tiny_model_dir), ModelConfig())
    toks = [TokenizedExample((40, 41, 42), (50, 51, 257), 0), TokenizedExample((60, 61), (70, 257), 1)]
    examples = [ex("1"), ex("2")]

    def evaluate(cfg: EvalConfig, out_dir: Path) -> dict:  # the eval stage on one process
        write_eval_parts(model, tiny_tokenizer, examples, toks, cfg, out_dir, stop_ids=[257],
                         device=torch.device("cpu"), progress=False)  # fmt: skip
        return finish_eval(examples, toks, cfg, out_dir)

    cfg = EvalConfig(max_new_tokens=4, batch_size=2, task_metric="tests.test_evaluate:always")
    res = evaluate(cfg, tmp_path / "a")
    assert res["accuracy"] == 1.0 and res["n"] == 2
    # NLL is the per-token NLL over all held-out response tokens (5 tokens here)
    with torch.no_grad():
        total = 0.0
        for t in toks:
            ids = torch.tensor([t.prompt_ids + t.response_ids])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            total += sum(float(logp[len(t.prompt_ids) - 1 + i, tok]) for i, tok in enumerate(t.response_ids))
    assert res["nll"] == pytest.approx(-total / 5, rel=1e-5)
    assert json.loads((tmp_path / "a" / "eval.json").read_text()) == res
    samples = [json.loads(x) for x in (tmp_path / "a" / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == [True, True]
    # per-problem log-likelihoods and token counts add up to the pooled NLL (for intervals over problems)
    assert [s["tokens"] for s in samples] == [3, 2]
    assert -sum(s["logp"] for s in samples) / 5 == pytest.approx(res["nll"], rel=1e-6)
    cfg = EvalConfig(max_new_tokens=4, batch_size=2, task_metric="tests.test_evaluate:never")
    assert evaluate(cfg, tmp_path / "b")["accuracy"] == 0.0
    cfg = EvalConfig(task_metric="none")
    assert "accuracy" not in evaluate(cfg, tmp_path / "c")
