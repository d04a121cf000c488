"""Teacher-forced log-probs: the chunked helper against its naive one-liner, masks, and the stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spaceft.microbatch import TrainItem, compose
from spaceft.score import merge_score_parts, with_opponent_scores, write_score_parts
from spaceft.token_logps import pack, score_sequences, selective_log_softmax, sequence_logps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_selective_log_softmax_matches_naive(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=g) * 4).to(dtype)
    index = torch.randint(0, 50, (3, 7), generator=g)
    naive = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive, rtol=1e-6, atol=1e-6)


def test_pack_masks_exactly_the_response_targets() -> None:
    b = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # target k is token k+1: responses start at target len(prompt)-1
    assert b.response_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    with pytest.raises(ValueError, match="empty response"):
        pack([[1]], [[]], pad_id=0)
    with pytest.raises(ValueError, match="empty prompt"):  # its mask would start at target -1
        pack([[], [1, 2, 3]], [[5, 6], [7]], pad_id=0)


def test_sequence_logps_equal_a_direct_sum(tiny_model_dir: Path) -> None:
    from spaceft.config import ModelConfig
    from spaceft.models import load_model

    model = load_model(str(tiny_model_dir), ModelConfig())
    prompt, response = [10, 11, 12], [20, 21, 22, 23]
    logps, lengths = sequence_logps(model, pack([prompt, [5]], [response, [6, 7]], pad_id=0))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logp_all = torch.log_softmax(logits, -1)
    direct = sum(logp_all[len(prompt) - 1 + i, tok] for i, tok in enumerate(response))
    assert lengths.tolist() == [4.0, 2.0]
    torch.testing.assert_close(logps[0].detach(), direct, rtol=1e-5, atol=1e-5)
    # padding and batch neighbours do not change a sequence's score
    alone = score_sequences(model, [prompt], [response], pad_id=0, batch_size=1, device=torch.device("cpu"))
    assert alone[0] == pytest.approx(float(direct), abs=1e-4)


def test_score_stage_resumes_without_duplicates(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from spaceft.config import ModelConfig
    from spaceft.configfile import config_from_dict
    from spaceft.models import load_model
    from spaceft.rundir import InjectedFault, read_table

    model = load_model(str(tiny_model_dir), ModelConfig())
    items = [TrainItem((1, 2, i + 3), (4, 5), ((6,), (7, 8))) for i in range(40)]
    cfg = config_from_dict({"data": {"train": "x"}, "train": {"global_batch_size": 4, "micro_batch_size": 2}})
    groups = compose(items, cfg, 0, world=1)  # 20 groups: 3 parts of up to 8
    origins = [(i, 0) for i in range(40)]

    def score(out: Path) -> list[dict]:
        kw = {"pad_id": 0, "device": torch.device("cpu"), "progress": False}
        kw |= {"opponent": "o", "composition": "c"}
        write_score_parts(model, items, groups, origins, out, **kw)
        merge_score_parts(out, groups, opponent="o", composition="c")
        return read_table(out)

    full = score(tmp_path / "full.parquet")
    out = tmp_path / "resumed.parquet"
    monkeypatch.setenv("SPACEFT_FAULT", "score:1")
    with pytest.raises(InjectedFault):
        score(out)
    assert not out.exists() and len(list((tmp_path / "resumed.parts").iterdir())) == 1
    monkeypatch.delenv("SPACEFT_FAULT")
    assert score(out) == full
    assert sorted(r["item"] for r in full if r["kind"] == "real") == list(range(40))
    scored = with_opponent_scores(items, full, "o", "t")
    assert [len(it.opponent_synthetic) for it in scored] == [2] * 40
    with pytest.raises(RuntimeError, match="t has no score of item 0's real response by this opponent"):
        with_opponent_scores(items, full, "another", "t")


def test_logits_to_keep_path_equals_the_full_projection(tiny_model_dir: Path) -> None:
    """Long prompts: only response positions are projected; the sums equal the all-positions ones."""
    from spaceft.config import ModelConfig
    from spaceft.models import load_model

    model = load_model(str(tiny_model_dir), ModelConfig())
    batch = pack([list(range(30, 42)), list(range(50, 59))], [[60, 61, 62], [70, 71, 72, 73, 74]], pad_id=0)
    fast, _ = sequence_logps(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = selective_log_softmax(logits[:, :-1], batch.input_ids[:, 1:]) * batch.response_mask
    torch.testing.assert_close(fast.detach(), full.sum(-1), rtol=1e-5, atol=1e-5)

    class NoKeep(torch.nn.Module):  # a model whose forward ignores logits_to_keep
        def forward(self, **kw):
            kw.pop("logits_to_keep")
            return model(**kw)

    ignored, _ = sequence_logps(NoKeep(), batch)
    torch.testing.assert_close(ignored.detach(), full.sum(-1), rtol=1e-5, atol=1e-5)
