"""Per-iteration diagnostics and token accounting of a run, from its artefacts.

The diagnostics are checked on a hand-made run directory whose numbers are worked out in the
docstrings; the token counts on a real tiny run against the training items the driver itself builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spaceft import workspace
from spaceft.configfile import load_config
from spaceft.costs import run_costs
from spaceft.report import collect_diagnostics, diagnostics_table, final_epoch_means, timing_section
from spaceft.rundata import training_data
from spaceft.rundir import Manifest, write_json, write_table
from spaceft.selfplay import prepare, run, train_items

from .conftest import tiny_overrides


def _metrics(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_final_epoch_means_average_only_the_last_epoch() -> None:
    """Epoch 1 rewards 10, 20 are ignored; epoch 2's 1 and 3 average to 2."""
    rows = [{"epoch": 1, "r": 10.0}, {"epoch": 1, "r": 20.0}, {"epoch": 2, "r": 1.0}, {"epoch": 2, "r": 3.0}]
    assert final_epoch_means(rows, ("r", "missing")) == {"r": 2.0}
    assert final_epoch_means([], ("r",)) == {}


def test_diagnostics_from_hand_made_artefacts(tmp_path: Path) -> None:
    """Iteration 0: real responses of prompts 0 and 1 are (5, 6, 9) and (7, 9); 4 samples (K = 2):
    prompt 0: (5, 6, 9) = real, (5, 9); prompt 1: (7, 9) = real, (8, 8, 8) hit the cap.
    identical = 2/4 = 0.5; length = (3 + 2 + 2 + 3) / 4 = 2.5; capped = 1/4.
    Opponent log p of the reals: -4 over 3 tokens and -2 over 2 tokens: mean -3, per token 6/5 = 1.2.
    Player (last epoch = epoch 2, steps with logps/real -1 and -3): -2; rewards real (0.5 + 1.5) / 2 = 1,
    synthetic (-1 - 3) / 2 = -2. Iteration 1 has only an eval.json (accuracy 0.25). The manifest's
    generate entry says 3 of 4 samples re-rendered otherwise at a boundary (chat.template_drift)."""
    d = tmp_path / "iter_0"
    d.mkdir()
    drift = {"checked": 4, "mismatch_fraction": 1.0, "boundary_fraction": 0.75}
    write_json(tmp_path / "manifest.json", {"iterations": {"0": {"generate": {"template_drift": drift}}}})
    write_table(
        d / "synthetic.parquet",
        [
            {"prompt_index": 0, "sample": 0, "response_ids": [5, 6, 9], "length": 3, "hit_cap": False},
            {"prompt_index": 0, "sample": 1, "response_ids": [5, 9], "length": 2, "hit_cap": False},
            {"prompt_index": 1, "sample": 0, "response_ids": [7, 9], "length": 2, "hit_cap": False},
            {"prompt_index": 1, "sample": 1, "response_ids": [8, 8, 8], "length": 3, "hit_cap": True},
        ],
    )
    write_table(
        d / "opponent_logps.parquet",
        [
            {
                "kind": "real",
                "prompt_index": 0,
                "sample": 0,
                "source_iteration": -1,
                "length": 3,
                "logp": -4.0,
            },
            {
                "kind": "real",
                "prompt_index": 1,
                "sample": 0,
                "source_iteration": -1,
                "length": 2,
                "logp": -2.0,
            },
            {
                "kind": "synthetic",
                "prompt_index": 0,
                "sample": 0,
                "source_iteration": 0,
                "length": 3,
                "logp": -50.0,
            },
        ],
    )
    step = {"rewards/synthetic": 0.0, "rewards/margin": 0.0, "logps/synthetic": -9.0}
    _metrics(
        d / "metrics.jsonl",
        [
            {**step, "epoch": 1, "logps/real": -100.0, "rewards/real": 100.0},
            {**step, "epoch": 2, "logps/real": -1.0, "rewards/real": 0.5, "rewards/synthetic": -1.0},
            {**step, "epoch": 2, "logps/real": -3.0, "rewards/real": 1.5, "rewards/synthetic": -3.0},
        ],
    )
    (tmp_path / "iter_1").mkdir()
    write_json(tmp_path / "iter_1" / "eval.json", {"accuracy": 0.25, "nll": 0.5, "n": 4})
    rows = collect_diagnostics(tmp_path, real_ids={0: (5, 6, 9), 1: (7, 9)})
    assert rows[0]["identical"] == 0.5 and rows[0]["syn_length"] == 2.5 and rows[0]["syn_capped"] == 0.25
    assert rows[0]["logp_real_opponent"] == -3.0 and rows[0]["nll_real_opponent"] == pytest.approx(1.2)
    assert (
        rows[0]["logp_real"] == -2.0 and rows[0]["reward_real"] == 1.0 and rows[0]["reward_synthetic"] == -2.0
    )
    assert rows[1] == {"iteration": 1, "accuracy": 0.25, "nll": 0.5}
    table = diagnostics_table(rows)
    assert rows[0]["template_drift"] == 0.75
    assert "| 0 | -3.00 | -2.00 | +1.000 | -2.000 | 0.50 | 2.5 | 0.25 | 0.75 |" in table


def test_the_timing_section_from_hand_made_manifest_records(tmp_path: Path) -> None:
    """Wall seconds: base eval 2; iteration 0: generate 6 (100 tok/s), score 2, train 10 (resumed),
    eval 2 (cached); iteration 2: train still running (no timing: no row); iteration 10: score 2.
    Totals: generate 6, score 4, train 10, eval 4 of 24 s: shares 25%, 17%, 42%, 17%. Rows run base,
    0, 10 (iterations in numeric order, though stored as "10" before "0")."""
    write_json(tmp_path / "manifest.json", {"iterations": {
        "10": {"score": {"status": "done", "wall_s": 2.0}},
        "0": {"generate": {"status": "done", "wall_s": 6.0, "tokens_per_s": 100.0},
              "score": {"status": "done", "wall_s": 2.0},
              "train": {"status": "done", "wall_s": 10.0, "resumed": True},
              "eval": {"status": "done", "wall_s": 2.0, "cached": True}},
        "base": {"eval": {"status": "done", "wall_s": 2.0}},
        "2": {"train": {"status": "running"}},
    }})  # fmt: skip
    lines = timing_section(Manifest.open(tmp_path))
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| iter")]
    assert rows == [
        "| base |  |  |  | 2.0 |",
        "| 0 | 6.0 (100 tok/s) | 2.0 | 10.0 resumed | 2.0 cached |",
        "| 10 |  | 2.0 |  |  |",
        "| share | 25% | 17% | 42% | 17% |",
    ]
    assert "| iter | generate | score | train | eval |" in lines
    write_json(tmp_path / "manifest.json", {"iterations": {"0": {"train": {"status": "done"}}}})
    assert timing_section(Manifest.open(tmp_path)) == []  # a manifest written before timings were kept


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{"generation.num_samples": 2, "train.mu": 2.0, "selfplay.resample": False,
      "generation.allow_biased_sampling": True}, {"train.loss": "sft"}],
    ids=["space-K2-reuse", "sft"],
)
def test_token_counts_match_the_training_items(tmp_path: Path, tiny_model_dir: Path, extra: dict) -> None:
    """Trained tokens = epochs × (prompt + response) over every item the driver trains on; forwarded =
    generation (prefill per sample + sampled tokens) + every scored (prompt + response)."""
    overrides = tiny_overrides(
        tmp_path, tiny_model_dir, **{"selfplay.iterations": 2, "eval.enabled": False, **extra}
    )
    cfg = load_config("spaceft/recipes/tiny.yaml", overrides)
    run(cfg)
    costs = run_costs(cfg.run_dir)
    ws = prepare(cfg)
    assert training_data(cfg.run_dir) == ws.train_tok
    prompt_len = {t.index: len(t.prompt_ids) for t in ws.train_tok}
    assert [c.iteration for c in costs] == [0, 1]
    for t, c in enumerate(costs):
        items = train_items(ws, t)
        per_epoch = sum(
            len(i.prompt_ids) * (1 + len(i.synthetic_ids))
            + len(i.real_ids)
            + sum(len(s) for s in i.synthetic_ids)
            for i in items
        )
        assert c.trained == cfg.train.epochs * per_epoch
        if cfg.train.loss == "sft":
            assert c.forwarded == 0 and c.generated == 0
            continue
        sampled = t == 0 or cfg.selfplay.resample
        k = cfg.generation.num_samples
        gen = sum(len(s) for i in items for s in i.synthetic_ids) if sampled else 0
        prefill = k * sum(prompt_len.values()) if sampled else 0
        scored = sum(
            len(i.prompt_ids) * (1 + k) + len(i.real_ids) + sum(len(s) for s in i.synthetic_ids)
            for i in items
        )
        assert c.generated == gen
        assert c.forwarded == gen + prefill + scored
        assert c.compute == c.forwarded + 3 * c.trained


def test_the_report_says_when_space_trained_on_samples_of_another_model() -> None:
    from spaceft.report import _sampling_note

    gen = {"allow_biased_sampling": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    reuse = {"train": {"loss": "space"}, "selfplay": {"resample": False}, "generation": gen}
    note = " ".join(_sampling_note(reuse))
    assert "iteration 0's samples (selfplay.resample=false)" in note and "current opponent's" in note
    mixed = {**reuse, "selfplay": {"resample": True, "mix_previous": True}}
    assert "previous opponent's samples" in " ".join(_sampling_note(mixed))
    assert _sampling_note({**reuse, "generation": {"allow_biased_sampling": False}}) == []


@pytest.mark.parametrize("loss", ["sft", "space"])
def test_the_report_table_shows_rewards_only_for_losses_with_an_opponent(tmp_path: Path, loss: str) -> None:
    from spaceft.report import collect, markdown_table

    write_json(tmp_path / "manifest.json", {"config": {"train": {"loss": loss}}, "iterations": {}})
    (tmp_path / "iter_0").mkdir()
    step = {"loss": 0.5, "rewards/real": -0.5, "rewards/synthetic": 0.0, "rewards/accuracy": 0.0,
            "rewards/abs_mean": 4.3, "step": 1, "epoch": 1}  # fmt: skip
    _metrics(tmp_path / "iter_0" / "metrics.jsonl", [step])
    [row] = collect(tmp_path)
    table = markdown_table([row])
    assert row["loss_first"] == 0.5 and row["steps"] == 1
    assert ("reward real" in table) == ("reward_real" in row) == (loss == "space")


def test_a_random_subset_is_what_the_report_and_the_costs_read(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`data.subset: random` (paper_space) trains on a seeded draw of the rows, not the first ones: the
    report's "synthetic = real" and the run's costs must read the responses the run trained on.

    12 rows, row i: prompt "p" + "x" * i, response "r" * (i + 1), so every row has its own lengths; the
    run keeps 4. Each kept prompt gets one sample equal to its real response: identical = 1. With
    epochs = 2 and one sample per prompt, trained = 2 × Σ (prompt + response) over the 4 kept rows, both
    counted twice (the real pair and the synthetic one); the first 4 rows would give other sums."""
    rows = [{"prompt": "p" + "x" * i, "completion": "r" * (i + 1)} for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = tiny_overrides(
        tmp_path, tiny_model_dir,
        **{"data.train": str(path), "data.eval": "null", "data.train_size": 4, "data.subset": "random",
           "data.seed": 3, "eval.enabled": False, "train.epochs": 2},
    )  # fmt: skip
    cfg = load_config("spaceft/recipes/tiny.yaml", overrides)
    ws = workspace.prepare(cfg)
    kept = [ex.response for ex in ws.train_examples]
    assert kept != [r["completion"] for r in rows[:4]], "the draw must differ from the first rows"
    d = cfg.run_dir / "iter_0"
    d.mkdir(parents=True)
    write_table(
        d / "synthetic.parquet",
        [{"prompt_index": t.index, "sample": 0, "response_ids": list(t.response_ids),
          "length": len(t.response_ids), "hit_cap": False} for t in ws.train_tok],
    )  # fmt: skip
    manifest = json.loads((cfg.run_dir / "manifest.json").read_text())
    manifest["iterations"] = {"0": {"train": {"status": "done"}}}
    write_json(cfg.run_dir / "manifest.json", manifest)

    [row] = collect_diagnostics(cfg.run_dir)
    assert row["identical"] == 1.0
    [cost] = run_costs(cfg.run_dir)
    pair_tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in ws.train_tok)
    assert cost.trained == 2 * 2 * pair_tokens
    assert training_data(cfg.run_dir) == ws.train_tok
