"""End to end: `spaceft run` on a tiny random model — artefacts, log lines, resume, stale config, report."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spaceft.cli import main
from spaceft.rundir import InjectedFault, read_json, read_table, write_table
from spaceft.score import score_key

from .conftest import load_benchmark, tiny_overrides

pytestmark = pytest.mark.slow
RUN = "tiny-space"


def _run(tmp: Path, model_dir: Path, *extra: str, command: str = "run", **overrides: object) -> int:
    return main([command, "tiny", *tiny_overrides(tmp, model_dir, **overrides), *extra])


def _weights(run_dir: Path, t: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"iter_{t}" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One uninterrupted 2-iteration SPACE run."""
    tmp = tmp_path_factory.mktemp("ref")
    assert _run(tmp, tiny_model_dir) == 0
    return tmp / "runs" / RUN


def test_run_writes_every_artefact(reference: Path) -> None:
    manifest = read_json(reference / "manifest.json")
    for t in ("0", "1"):
        assert set(manifest["iterations"][t]) == {"generate", "score", "train", "eval"}
        assert all(v["status"] == "done" for v in manifest["iterations"][t].values())
    assert manifest["iterations"]["base"]["eval"]["status"] == "done"
    assert manifest["config"]["train"]["loss"] == "space"
    assert {"torch", "transformers", "accelerate"} <= set(manifest["versions"])
    for t in (0, 1):
        d = reference / f"iter_{t}"
        syn = read_table(d / "synthetic.parquet")
        assert sorted(r["prompt_index"] for r in syn) == list(range(8))  # K = 1, no duplicates
        assert not any("<|im_end|>" in r["text"] for r in syn)  # the text column is for people
        opp = read_table(d / "opponent_logps.parquet")
        assert len(opp) == 16 and all(math.isfinite(r["logp"]) and r["logp"] < 0 for r in opp)
        assert {"nll", "accuracy", "n"} <= set(read_json(d / "eval.json"))
        AutoModelForCausalLM.from_pretrained(d / "model")  # a normal HF model directory
        assert "loss: space" in (d / "model" / "spaceft_config.yaml").read_text()
        assert not (d / "train_state").exists()
    for name in ("report.md", "rewards.png", "eval.png"):
        assert (reference / name).stat().st_size > 0


def test_rewards_start_at_zero_and_loss_falls(reference: Path) -> None:
    for t in (0, 1):
        lines = [json.loads(x) for x in (reference / f"iter_{t}" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines] == [1, 2, 3, 4]
        # step 1 sees policy == opponent, scored in the same micro-batches: r = 0 exactly, so
        # L = softplus(0) + softplus(0) = 2 ln 2 (mu = 1)
        first = lines[0]
        assert first["rewards/real"] == first["rewards/synthetic"] == first["rewards/abs_mean"] == 0.0
        assert first["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)
        second_epoch = lines[2:]
        assert max(m["loss"] for m in second_epoch) < lines[0]["loss"]
        assert all(m["rewards/real"] > m["rewards/synthetic"] for m in second_epoch)


@pytest.mark.parametrize("fault", ["generate:1", "score:1", "train:3"])
def test_resume_after_a_crash_is_bit_identical(
    fault: str, reference: Path, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPACEFT_FAULT", fault)
    with pytest.raises(InjectedFault):
        _run(tmp_path, tiny_model_dir)
    monkeypatch.delenv("SPACEFT_FAULT")
    assert _run(tmp_path, tiny_model_dir) == 0
    run_dir = tmp_path / "runs" / RUN
    for t in (0, 1):
        ref, got = _weights(reference, t), _weights(run_dir, t)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), f"iteration {t} weights differ after {fault}"
        assert read_table(run_dir / f"iter_{t}" / "synthetic.parquet") == read_table(
            reference / f"iter_{t}" / "synthetic.parquet"
        )
        steps = [
            json.loads(x)["step"] for x in (run_dir / f"iter_{t}" / "metrics.jsonl").read_text().splitlines()
        ]
        assert steps == [1, 2, 3, 4]  # a resumed epoch logs no step twice


def test_stale_config_is_refused_unless_forced(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1}) == 0
    mtime = (tmp_path / "runs" / RUN / "iter_0" / "model" / "model.safetensors").stat().st_mtime_ns
    # same config again: everything is reused
    assert _run(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1}) == 0
    assert (tmp_path / "runs" / RUN / "iter_0" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert _run(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1, "train.lr": 0.01}) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "train.lr: 0.0003 -> 0.01" in err and "--force" in err
    assert _run(tmp_path, tiny_model_dir, "--force", **{"selfplay.iterations": 1, "train.lr": 0.01}) == 0
    manifest_path = tmp_path / "runs" / RUN / "manifest.json"
    assert read_json(manifest_path)["config"]["train"]["lr"] == 0.01
    # a run made by an older spaceft that lacked a field (here train.gamma) is not stale
    manifest = read_json(manifest_path)
    del manifest["config"]["train"]["gamma"]
    manifest_path.write_text(json.dumps(manifest))
    model_file = tmp_path / "runs" / RUN / "iter_0" / "model" / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns
    assert _run(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1, "train.lr": 0.01}) == 0
    assert model_file.stat().st_mtime_ns == mtime


def test_sft_skips_generation_and_scoring(tmp_path: Path, tiny_model_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    assert (
        _run(tmp_path, tiny_model_dir, **{"train.loss": "sft", "selfplay.iterations": 1, "name": "sft"}) == 0
    )
    d = tmp_path / "runs" / "sft" / "iter_0"
    assert (d / "model" / "model.safetensors").exists()
    assert not (d / "synthetic.parquet").exists() and not (d / "opponent_logps.parquet").exists()
    assert "run sft: sft, 1 iteration(s), 8 training pairs, 4 held-out" in caplog.text


def test_report_command(reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "| iter | held-out acc | held-out NLL |" in out
    assert "| base |" in out and "| 1 |" in out
    assert main(["report", str(reference / "nope")]) == 2


def test_rerunning_a_stage_invalidates_what_was_built_on_it(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    over = {"selfplay.iterations": 2, "eval.enabled": False}
    assert _run(tmp_path, tiny_model_dir, **over) == 0
    manifest = tmp_path / "runs" / RUN / "manifest.json"
    assert set(read_json(manifest)["iterations"]) == {"0", "1"}
    assert _run(tmp_path, tiny_model_dir, "--iteration", "0", command="generate", **over) == 0
    its = read_json(manifest)["iterations"]
    assert set(its) == {"0"} and set(its["0"]) == {"generate"}  # score, train and iteration 1 are stale
    capsys.readouterr()
    assert _run(tmp_path, tiny_model_dir, "--iteration", "0", command="train", **over) == 2
    assert "train of iteration 0 needs score of iteration 0" in capsys.readouterr().err


def test_demo_recipe_smoke_run_on_a_tiny_model(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`spaceft demo` (the recipe `make demo` runs) end to end, with the tiny model in place of SmolLM2."""
    over = tiny_overrides(tmp_path, tiny_model_dir, **{"selfplay.iterations": 1, "data.train_size": 4,
                                                        "data.max_prompt_tokens": 512})  # fmt: skip
    assert main(["demo", *over, "-v"]) == 0  # global flags may follow the overrides
    out = capsys.readouterr().out
    assert "# spaceft demo" in out and "name: demo-space" in out  # -v prints the resolved config
    assert "| base |" in out and "| 0 |" in out
    run_dir = tmp_path / "runs" / "demo-space"
    assert read_json(run_dir / "manifest.json")["config"]["train"]["loss"] == "space"
    assert (run_dir / "report.md").exists() and (run_dir / "iter_0" / "eval.json").exists()


def test_regenerating_after_a_crash_leaves_nothing_stale(
    reference: Path, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Crash mid-training, re-generate, re-run: the old training state and scores are removed on disk
    (not only in the manifest) and the run trains iteration 0 from its first step."""
    monkeypatch.setenv("SPACEFT_FAULT", "train:3")
    with pytest.raises(InjectedFault):
        _run(tmp_path, tiny_model_dir)
    monkeypatch.delenv("SPACEFT_FAULT")
    it0 = tmp_path / "runs" / RUN / "iter_0"
    assert (it0 / "train_state" / "progress.json").exists() and (it0 / "opponent_logps.parquet").exists()
    (tmp_path / "runs" / RUN / "iter_1").mkdir()  # a later iteration's leftovers go too
    assert _run(tmp_path, tiny_model_dir, "--iteration", "0", command="generate") == 0
    assert not (it0 / "train_state").exists() and not (it0 / "opponent_logps.parquet").exists()
    assert not (it0 / "metrics.jsonl").exists() and not (tmp_path / "runs" / RUN / "iter_1").exists()
    caplog.set_level(logging.INFO)
    assert _run(tmp_path, tiny_model_dir) == 0
    assert "resuming training" not in caplog.text
    got, ref = _weights(tmp_path / "runs" / RUN, 1), _weights(reference, 1)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_score_of_another_opponent_is_never_read(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cached opponent scores are looked up by (opponent weights hash, token ids): rows keyed for other
    weights are not found, and training stops with a message instead of using them."""
    over = {"selfplay.iterations": 1, "eval.enabled": False}
    assert _run(tmp_path, tiny_model_dir, **over) == 0
    path = tmp_path / "runs" / RUN / "iter_0" / "opponent_logps.parquet"
    rows = read_table(path)
    assert len({r["key"] for r in rows}) == len(rows)
    for r in rows:  # the same rows, as another opponent's weights would have keyed them
        r["key"] = score_key("another-opponent", (1,), (2, r["sample"], r["prompt_index"]))
    write_table(path, rows)
    capsys.readouterr()
    assert _run(tmp_path, tiny_model_dir, "--iteration", "0", command="train", **over) == 2
    err = capsys.readouterr().err
    assert "opponent_logps.parquet has no score of item 0's real response by this opponent" in err


def test_gpu_check_script_dry_run_and_its_stage_amounts(
    reference: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """benchmarks/gpu_check.py is ready for a GPU: its dry run resolves the config and plan here and runs
    both probes on a tiny random Llama, and the amounts it divides by each stage's time are read back from
    a finished run's outputs."""
    gpu_check = load_benchmark("gpu_check")
    measured = tmp_path / "probes.json"
    argv = ["--dry-run", "--probes-only", "--output-dir", str(tmp_path), "--json", str(measured)]
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    assert "backend: vllm" in out and "dtype: bfloat16" in out and "dry run: config and plan OK" in out
    probes = json.loads(measured.read_text())
    assert probes["train_step_probe"]["eager"]["tokens_per_s"] > 0
    assert probes["train_step_probe"]["peak_flops"] == 989e12  # the H100 SXM's dense bf16 peak
    gen = probes["generation_probe"]
    assert gen["rows"] == 4 and gen["sampled_tokens"] > 0 and gen["tokens_per_s"] > 0
    assert "spaceft.RowSampler" in [op["op"] for op in gen["profile"]["ops"]]  # the sampler's share
    syn = read_table(reference / "iter_0" / "synthetic.parquet")
    assert gpu_check.stage_tokens(reference, "generate") == (sum(r["length"] for r in syn), "sampled tokens")
    scored, _ = gpu_check.stage_tokens(reference, "score")
    assert scored == sum(r["length"] for r in read_table(reference / "iter_0" / "opponent_logps.parquet"))
    assert gpu_check.stage_tokens(reference, "train") == (2 * scored, "trained response tokens")  # 2 epochs
    assert gpu_check.stage_tokens(reference, "eval") == (4, "held-out examples")


@pytest.mark.slow
def test_gpu_check_rehearses_the_shared_prompt_amp_iteration_on_cpu(tmp_path: Path) -> None:
    """The dry run of what gpu_session.sh runs first (amp, shared prompts, sdpa) runs the whole
    iteration on a tiny random Llama on the CPU: every stage, and a train MFU from every step's log."""
    gpu_check = load_benchmark("gpu_check")
    measured = tmp_path / "check.json"
    argv = ["--dry-run", "--backend", "hf", "--precision", "amp", "--shared-prompt",
            "--output-dir", str(tmp_path), "--json", str(measured)]  # fmt: skip
    assert gpu_check.main(argv) == 0
    result = json.loads(measured.read_text())
    assert result["attn"] == "sdpa" and result["shared_prompt"] is True
    assert [s["stage"] for s in result["stages"]] == ["generate", "score", "train", "eval"]
    train = result["train"]
    # shared prompts forward each prompt once per group: fewer tokens than prompt + response per response
    assert 0 < train["forwarded_tokens"] < train["trained_tokens"]
    assert train["effective_mfu"] >= train["mfu"] >= 0


def test_re_evaluating_keeps_later_iterations(reference: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Nothing is computed from an evaluation: `spaceft eval -t 0` redoes only that evaluation."""
    import shutil

    run_dir = tmp_path / "runs" / RUN
    shutil.copytree(reference, run_dir)
    before = read_json(reference / "iter_0" / "eval.json")
    (run_dir / "iter_0" / "eval.json").write_text("{}")
    assert _run(tmp_path, tiny_model_dir, "--iteration", "0", command="eval") == 0
    assert read_json(run_dir / "iter_0" / "eval.json") == pytest.approx(before)
    assert (
        read_json(run_dir / "manifest.json")["iterations"]["1"]
        == read_json(reference / "manifest.json")["iterations"]["1"]
    )
    assert (run_dir / "iter_1" / "model" / "model.safetensors").exists()


def test_samples_of_a_changed_start_model_are_drawn_again(tmp_path: Path) -> None:
    """Samples drawn by an opponent whose weights have since changed are not samples of p_θt."""
    from spaceft.models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "m" / "tiny")
    over = {"selfplay.iterations": 1, "eval.enabled": "false"}
    assert _run(tmp_path, model_dir, command="generate", **over) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    before = read_table(run_dir / "iter_0" / "synthetic.parquet")
    other = build_tiny_model(tmp_path / "m2" / "tiny", seed=1)
    shutil.copy(other / "model.safetensors", model_dir / "model.safetensors")  # new weights, same place
    assert _run(tmp_path, model_dir, **over) == 0
    manifest = read_json(run_dir / "manifest.json")
    entry = manifest["iterations"]["0"]
    assert entry["generate"]["opponent"] == entry["score"]["opponent"] == manifest["start_model_hash"]
    assert read_table(run_dir / "iter_0" / "synthetic.parquet") != before


def test_a_model_saved_before_an_interruption_is_not_trained_again(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the trained model was saved, before the manifest recorded it: the next run keeps it."""
    from spaceft import stage_fns, train

    steps: list[int] = []
    monkeypatch.setattr(train, "maybe_fail", lambda stage, n: steps.append(n) if stage == "train" else None)
    real_hash, armed = stage_fns.file_hashes, [True]

    def hash_then_interrupt(path: Path, without: str = "") -> tuple[str, str]:
        if armed[0] and path.name == "model":
            armed[0] = False
            raise KeyboardInterrupt
        return real_hash(path, without)

    monkeypatch.setattr(stage_fns, "file_hashes", hash_then_interrupt)
    over = {"selfplay.iterations": 1, "eval.enabled": "false"}
    assert _run(tmp_path, tiny_model_dir, **over) == 130
    run_dir = next((tmp_path / "runs").iterdir())
    saved = _weights(run_dir, 0)
    assert steps and read_json(run_dir / "manifest.json")["iterations"]["0"]["train"]["status"] != "done"
    steps.clear()
    assert _run(tmp_path, tiny_model_dir, **over) == 0
    assert steps == []  # not one training step again
    entry = read_json(run_dir / "manifest.json")["iterations"]["0"]["train"]
    assert entry["status"] == "done" and entry["distributed"] == "NO"  # the entry as a whole run writes it
    assert all(torch.equal(saved[k], v) for k, v in _weights(run_dir, 0).items())


def test_the_logits_path_is_used_by_scoring_and_training_alike(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.logps_path=logits reaches both passes (the chunked kernel is never called) and rewards
    still start at 0; with train.logps_path=chunked the chunked kernel is what runs."""
    from spaceft import token_logps

    calls: list[int] = []
    real_kernel = token_logps.chunked_token_logps
    monkeypatch.setattr(token_logps, "chunked_token_logps",
                        lambda *a, **k: calls.append(1) or real_kernel(*a, **k))  # fmt: skip
    over = {"selfplay.iterations": 1, "eval.enabled": "false", "generation.num_samples": 2, "train.mu": 2.0}
    assert _run(tmp_path / "logits", tiny_model_dir, **over, **{"train.logps_path": "logits"}) == 0
    assert calls == []
    run_dir = next((tmp_path / "logits" / "runs").iterdir())
    first = json.loads((run_dir / "iter_0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/abs_mean"] == 0.0  # the opponent was scored in these very micro-batches
    assert _run(tmp_path / "chunked", tiny_model_dir, **over, **{"train.logps_path": "chunked"}) == 0
    assert calls
    chunked_dir = next((tmp_path / "chunked" / "runs").iterdir())
    a = read_table(run_dir / "iter_0" / "opponent_logps.parquet")
    b = read_table(chunked_dir / "iter_0" / "opponent_logps.parquet")
    assert len(a) == len(b) and max(abs(x["logp"] - y["logp"]) for x, y in zip(a, b, strict=True)) < 1e-3


def test_a_library_caller_can_run_stage_by_stage_with_auto_batch_sizes(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`selfplay.run(cfg, only_stage=...)` called once per stage with one config object, as
    benchmarks/gpu_check.py does: resolving `batch_size: auto` must not change the caller's config, or
    the second call finds 'finished work made with a different config' (seen on the first GPU run)."""
    from spaceft import selfplay
    from spaceft.configfile import load_config
    from spaceft.selfplay import STAGES

    auto = {"generation.batch_size": "auto", "eval.batch_size": "auto", "selfplay.iterations": 1}
    over = tiny_overrides(tmp_path, tiny_model_dir, **auto)
    cfg = load_config("tiny", over)
    for stage in STAGES:
        selfplay.run(cfg, force=stage == STAGES[0], only_stage=stage, only_iteration=0)
        assert cfg.generation.batch_size == "auto" and cfg.eval.batch_size == "auto"
    manifest = read_json(cfg.run_dir / "manifest.json")
    chosen = manifest["batch_sizes"]["generation"]
    assert isinstance(chosen, int) and chosen > 0
    assert set(manifest["iterations"]["0"]) >= set(STAGES)


def test_gpu_check_builds_a_sentencepiece_llama_and_measures_the_train_steps(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offline model of `gpu_check.py --random-llama` (a Llama with zephyr's SentencePiece-style
    tokenizer and template, more rows than pieces) loads as spaceft loads models, and the train-step MFU
    divides the trained tokens of spaceft.costs by the summed step times of every step."""
    import json

    from spaceft.costs import run_costs
    from spaceft.models import load_tokenizer

    gpu_check = load_benchmark("gpu_check")
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024)  # fmt: skip
    monkeypatch.setitem(gpu_check.RANDOM_LLAMA, "tiny", shape)
    model_dir = gpu_check.build_random_llama(tmp_path / "llama", "tiny")
    tok = load_tokenizer(str(model_dir))
    assert len(tok) < 1024  # sampled ids beyond the pieces decode to nothing
    assert tok.convert_ids_to_tokens(tok("Hello world")["input_ids"])[:2] == ["<s>", "▁Hello"]
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True).endswith("<|assistant|>")
    params = gpu_check.matmul_parameters(str(model_dir))
    assert params == sum(v.numel() for k, v in load_file(model_dir / "model.safetensors").items()
                         if "embed_tokens" not in k)  # fmt: skip
    m = gpu_check.train_step_mfu(reference, params, 1e12)
    steps = [json.loads(x) for x in (reference / "iter_0" / "metrics.jsonl").read_text().splitlines()]
    assert m["steps"] == len(steps) and m["trained_tokens"] == run_costs(reference)[0].trained
    assert m["mfu"] == round(6 * params * m["trained_tokens"] / sum(s["step_s"] for s in steps) / 1e12, 4)
    assert m["first_step_abs_reward"] < 1e-5  # the reference run is float32: its rewards start at 0


def test_real_responses_longer_than_any_sample_are_warned_about(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With generation.max_new_tokens below real responses' lengths, length alone separates real from
    synthetic: the run says how many real responses no sample can match."""
    import logging

    from spaceft.configfile import load_config
    from spaceft.workspace import prepare

    def warned(**over: object) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spaceft.workspace"):
            prepare(load_config("tiny", tiny_overrides(tmp_path, tiny_model_dir, **over)))
        return [r.getMessage() for r in caplog.records if "no synthetic sample can be" in r.getMessage()]

    [message] = warned(**{"generation.max_new_tokens": 2})
    assert message.startswith("8 of 8 real responses are longer than generation.max_new_tokens=2")
    assert warned(**{"generation.max_new_tokens": 512}) == []  # data.max_response_tokens of the tiny recipe
    assert warned(**{"generation.max_new_tokens": 2, "train.loss": "sft", "name": "sft"}) == []


def test_scores_made_for_other_micro_batches_are_made_again(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The score stage records the micro-batches it scored (`composition`); a resumed training whose
    micro-batches differ (another micro-batch size, length grouping, number of processes or data) has it
    re-scored first, and the new scores start training at exactly 0."""
    from spaceft.rundir import write_json

    over = {"selfplay.iterations": 1, "eval.enabled": False}
    monkeypatch.setenv("SPACEFT_FAULT", "train:1")
    with pytest.raises(InjectedFault):
        _run(tmp_path, tiny_model_dir, **over)
    monkeypatch.delenv("SPACEFT_FAULT")
    run_dir = tmp_path / "runs" / RUN
    manifest = read_json(run_dir / "manifest.json")
    recorded = manifest["iterations"]["0"]["score"]["composition"]
    manifest["iterations"]["0"]["score"]["composition"] = "micro-batches of another launch"
    write_json(run_dir / "manifest.json", manifest)
    with caplog.at_level(logging.WARNING):
        assert _run(tmp_path, tiny_model_dir, **over) == 0
    assert any("re-scoring" in r.getMessage() for r in caplog.records)
    assert read_json(run_dir / "manifest.json")["iterations"]["0"]["score"]["composition"] == recorded
    first = json.loads((run_dir / "iter_0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/abs_mean"] == 0.0
