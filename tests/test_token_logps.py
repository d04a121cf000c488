"""The optimised per-token log-prob kernels against their naive one-liners: values AND gradients,
in float32, pure bfloat16 and float32 weights under bfloat16 autocast."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from spaceft.token_logps import chunked_token_logps, output_head, pack, selective_log_softmax, sequence_logps

# (parameter dtype, autocast) -> tolerance. bf16 results are compared with the naive path run in the
# same precision; the tolerance covers the different matmul blocking of chunks (bf16 has 8 bits).
CASES = {
    "fp32": (torch.float32, False, 1e-5),
    "bf16": (torch.bfloat16, False, 2e-2),
    "amp": (torch.float32, True, 2e-2),
}


def _amp(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else nullcontext()


@pytest.mark.parametrize("case", list(CASES))
def test_selective_log_softmax_gradient_matches_naive(case: str) -> None:
    dtype, _, tol = CASES[case]
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(3, 6, 40, generator=g) * 3).to(dtype)
    index = torch.randint(0, 40, (3, 6), generator=g)
    weights = torch.randn(3, 6, generator=g)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    got = selective_log_softmax(a, index)
    naive = torch.log_softmax(b.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, naive, rtol=0, atol=1e-6)
    (got * weights).sum().backward()
    (naive * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=tol if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_token_logps_match_naive(case: str, with_bias: bool) -> None:
    dtype, amp, tol = CASES[case]
    g = torch.Generator().manual_seed(0)
    t, h, v = 11, 16, 300
    hidden0 = torch.randn(t, h, generator=g).to(dtype)
    weight0 = (torch.randn(v, h, generator=g) / 2).to(dtype)
    bias0 = torch.randn(v, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, v, (t,), generator=g)
    upstream = torch.randn(t, generator=g)

    def run(chunked: bool) -> tuple[torch.Tensor, ...]:
        hidden = hidden0.clone().requires_grad_()
        weight = weight0.clone().requires_grad_()
        bias = bias0.clone().requires_grad_() if bias0 is not None else None
        with _amp(amp):
            if chunked:  # chunk 4: two full chunks and a remainder of 3
                out = chunked_token_logps(hidden, weight, bias, targets, chunk=4)
            else:
                logits = torch.nn.functional.linear(hidden, weight, bias)
                out = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
        (out * upstream).sum().backward()
        grads = (hidden.grad, weight.grad) + ((bias.grad,) if bias is not None else ())
        return (out.detach(), *grads)

    got, want = run(True), run(False)
    assert got[0].dtype == torch.float32
    for g_, w_ in zip(got, want, strict=True):
        assert g_.dtype == w_.dtype
        scale = float(w_.float().abs().max())
        torch.testing.assert_close(g_.float(), w_.float(), rtol=tol, atol=tol * scale)
    # the tolerance can fail: a wrong target shifts values far beyond it
    wrong = chunked_token_logps(hidden0.float(), weight0.float(), None, (targets + 1) % v, chunk=4)
    assert (wrong - want[0]).abs().max() > 100 * tol


@pytest.mark.parametrize("amp", [False, True])
def test_sequence_logps_chunked_path_equals_the_logits_path(tiny_model_dir: Path, amp: bool) -> None:
    """On the tiny (tied-embedding) model: values and every parameter's gradient agree."""
    from spaceft.config import ModelConfig
    from spaceft.models import load_model

    model = load_model(str(tiny_model_dir), ModelConfig())
    assert output_head(model, torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)) is not None
    batch = pack([list(range(30, 42)), [50, 51]], [[60, 61, 62], [70, 71, 72, 73, 74, 75, 76]], pad_id=0)
    results = []
    for path in ("chunked", "logits"):
        model.zero_grad()
        with _amp(amp):
            logps, _ = sequence_logps(model, batch, path=path)
        (logps * torch.tensor([1.0, -0.5])).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast, fast_g), (slow, slow_g) = results
    tol = 2e-2 if amp else 1e-5
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)
    assert "model.embed_tokens.weight" in fast_g  # tied: the head's gradient lands on the embedding
    for name, grad in slow_g.items():
        torch.testing.assert_close(fast_g[name], grad, rtol=tol, atol=tol * float(grad.abs().max()), msg=name)


def test_soft_capped_logits_fall_back_to_the_logits_path(tiny_model_dir: Path) -> None:
    """A model whose logits are tanh-capped is not a linear head: the check refuses it, and the
    log-probs are still those of the capped logits."""
    from spaceft.config import ModelConfig
    from spaceft.models import load_model

    model = load_model(str(tiny_model_dir), ModelConfig())

    class SoftCapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def get_output_embeddings(self) -> torch.nn.Module:
            return model.lm_head

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = torch.tanh(out.logits / 0.5) * 0.5
            return out

    capped = SoftCapped()
    batch = pack([[5, 6, 7]], [[8, 9, 10]], pad_id=0)
    assert output_head(capped, batch.input_ids, batch.attention_mask) is None
    got, _ = sequence_logps(capped, batch)
    with torch.no_grad():
        logits = capped(input_ids=batch.input_ids).logits[0, 2:5].float()
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[8], [9], [10]]))[:, 0].sum()
    torch.testing.assert_close(got[0].detach(), want, rtol=1e-5, atol=1e-5)


def test_a_checked_model_can_still_be_freed(tiny_model_dir: Path) -> None:
    """The head check's cache must not keep its models alive: on a GPU every opponent and evaluated model
    of a run would stay in memory (a 7B model adds 14-28 GB per iteration)."""
    import gc
    import weakref

    from spaceft.config import ModelConfig
    from spaceft.models import load_model

    model = load_model(str(tiny_model_dir), ModelConfig())
    ids = torch.tensor([[1, 2, 3]])
    first = output_head(model, ids, torch.ones_like(ids))
    again = output_head(model, ids, torch.ones_like(ids))  # from the cache: the same head, found again
    assert first is not None and again == first
    alive = weakref.ref(model)
    del model, first, again
    gc.collect()
    assert alive() is None


def test_choose_path_at_hand_picked_points() -> None:
    """The float32 logits and their gradient take 2 * 4 B * positions * V; the limit is 2**28 B (256 MiB).
    V = 49,152: 512 positions hold 192 MiB (logits), 1,024 hold 384 MiB (chunked). V = 128,256: 261
    positions hold 267,830,016 B, just under 2**28 = 268,435,456 (logits); 262 hold 268,856,320 B, just
    over (chunked), in any precision (both paths run the head in float32). Devices other than the CPU
    are always chunked."""
    from spaceft.token_logps import LOGITS_PATH_MAX_BYTES, choose_path

    assert LOGITS_PATH_MAX_BYTES == 2**28
    assert choose_path(49152, 512, "cpu") == "logits"
    assert choose_path(49152, 1024, "cpu") == "chunked"
    assert choose_path(128256, 261, "cpu") == "logits"
    assert choose_path(128256, 262, "cpu") == "chunked"
    assert choose_path(49152, 16, "cuda") == "chunked"


@pytest.mark.parametrize("amp", [False, True])
def test_auto_equals_the_path_it_picks(
    tiny_model_dir: Path, amp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """"auto" gives what the explicit path it picks gives: the logits path for this small batch, in
    float32 and under bf16 autocast alike, and the chunked one once the limit is below the batch's
    logits. Values and gradients within the tolerances of the chunked/logits comparison."""
    from spaceft import token_logps
    from spaceft.config import ModelConfig
    from spaceft.models import load_model

    model = load_model(str(tiny_model_dir), ModelConfig())
    batch = pack([list(range(30, 42)), [50, 51]], [[60, 61, 62], [70, 71, 72, 73, 74, 75, 76]], pad_id=0)

    kernel, chunked_calls = token_logps.chunked_token_logps, []
    monkeypatch.setattr(token_logps, "chunked_token_logps",
                        lambda *a, **k: chunked_calls.append(1) or kernel(*a, **k))  # fmt: skip

    def run(path: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chunked_calls.clear()
        model.zero_grad()
        with _amp(amp):
            logps, _ = sequence_logps(model, batch, path=path)
        (logps * torch.tensor([1.0, -0.5])).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    tol = 2e-2 if amp else 1e-5
    for limit, expected in zip([token_logps.LOGITS_PATH_MAX_BYTES, 0], ["logits", "chunked"], strict=True):
        monkeypatch.setattr(token_logps, "LOGITS_PATH_MAX_BYTES", limit)
        auto, auto_g = run("auto")
        assert bool(chunked_calls) == (expected == "chunked")  # the path auto took
        want, want_g = run(expected)
        torch.testing.assert_close(auto, want, rtol=tol, atol=tol)
        for name, grad in want_g.items():
            atol = tol * float(grad.abs().max())
            torch.testing.assert_close(auto_g[name], grad, rtol=tol, atol=atol, msg=name)
    with pytest.raises(ValueError, match="unknown log-prob path 'fast'"):
        sequence_logps(model, batch, path="fast")
