"""Two processes with gloo on CPU, end to end: `torchrun --nproc_per_node 2` and the shipped
`accelerate launch` config give the one-process run's samples, take over a one-process run, resume
after kill -9, and stop together on a non-finite loss.

Tolerance for the weights: the two runs see identical data, samples and opponent scores, but DDP sums
the gradient in another order (float32 rounding, ~1e-7 relative). RMSProp divides each gradient by
its running RMS, so where a gradient is near 0 that rounding is magnified up to the size of a step
(at most lr/sqrt(1 - alpha) = 10·lr on the first step). We require every weight within lr = 3e-4 of
the one-process run (a tenth of one step's largest update; measured 1e-5 to 8e-5), and the logged per-step
loss and gradient norm equal to 1e-4 relative (a wrong gradient scale or a missing all-reduce changes
the gradient norm by a factor, and the weights by whole steps).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spaceft.cli import main
from spaceft.rundir import InjectedFault, read_json, read_table, write_table

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow
RUN = "tiny-space"
BIN = Path(sys.executable).parent
ACCELERATE_CONFIG = Path(__file__).parents[1] / "spaceft" / "recipes" / "accelerate" / "multi_cpu.yaml"
K2 = {"generation.num_samples": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(launcher: str, tmp: Path, model: Path, *args: str, fault: str = "", **over: object):
    """Run `spaceft` under torchrun or accelerate launch with 2 processes; returns (rc, output, seconds)."""
    if launcher in ("torchrun", "fsdp2"):
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port())]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ACCELERATE_CONFIG),
               "--main_process_port", str(_free_port())]  # fmt: skip
    command = args[0] if args else "run"
    cmd += [str(Path(__file__).with_name("fsdp2_on_cpu.py"))] if launcher == "fsdp2" else ["-m", "spaceft"]
    cmd += [command, "tiny", *tiny_overrides(tmp, model, **{**K2, **over}), *args[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SPACEFT_FAULT": fault,
           "SPACEFT_EVAL_CACHE": str(tmp / "eval-cache")}  # fmt: skip
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - tic


def _weights(run_dir: Path, t: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"iter_{t}" / "model" / "model.safetensors")


def _metrics(run_dir: Path, t: int) -> list[dict[str, float]]:
    return [json.loads(x) for x in (run_dir / f"iter_{t}" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """SPACE, K = 2, 2 iterations, one process."""
    tmp = tmp_path_factory.mktemp("one")
    assert main(["run", "tiny", *tiny_overrides(tmp, tiny_model_dir, **K2)]) == 0
    return tmp / "runs" / RUN


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The same run with `torchrun --nproc_per_node 2`."""
    tmp = tmp_path_factory.mktemp("two")
    rc, out, _ = _launch("torchrun", tmp, tiny_model_dir)
    assert rc == 0, out[-3000:]
    return tmp / "runs" / RUN


def test_two_processes_give_the_one_process_result(one: Path, two: Path) -> None:
    assert read_json(two / "manifest.json")["iterations"]["0"]["train"]["processes"] == 2
    for t in (0, 1):
        ids = [
            (r["prompt_index"], r["sample"], r["response_ids"])
            for r in read_table(one / f"iter_{t}" / "synthetic.parquet")
        ]
        assert len(ids) == 16  # 8 prompts x K = 2
        assert ids == [(r["prompt_index"], r["sample"], r["response_ids"])
                       for r in read_table(two / f"iter_{t}" / "synthetic.parquet")]  # fmt: skip
        a, b = (
            read_table(one / f"iter_{t}" / "opponent_logps.parquet"),
            read_table(two / f"iter_{t}" / "opponent_logps.parquet"),
        )
        assert [r["logp"] for r in a] == pytest.approx([r["logp"] for r in b], rel=1e-6, abs=1e-4)
        wa, wb = _weights(one, t), _weights(two, t)
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 3e-4  # train.lr (see the docstring)
        for ma, mb in zip(_metrics(one, t), _metrics(two, t), strict=True):
            assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-4)
            assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)
        ea, eb = read_json(one / f"iter_{t}" / "eval.json"), read_json(two / f"iter_{t}" / "eval.json")
        assert ea["accuracy"] == eb["accuracy"] and ea["nll"] == pytest.approx(eb["nll"], rel=1e-5)
    assert read_json(one / "base" / "eval.json") == pytest.approx(read_json(two / "base" / "eval.json"))


def test_fsdp2_on_two_processes_gives_the_one_process_result(
    one: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """accelerate's FSDP2 path on CPU (tests/fsdp2_on_cpu.py): sharded training with 2 micro-batches per
    process per step, the gathered full state dict saved; the same samples, weights (within lr) and
    losses as one process. (Whether gradients are synced per micro-batch does not show in the numbers.)"""
    rc, out, _ = _launch("fsdp2", tmp_path, tiny_model_dir, **{"train.micro_batch_size": 2})
    assert rc == 0, out[-3000:]
    run = tmp_path / "runs" / RUN
    stages = read_json(run / "manifest.json")["iterations"]
    assert [stages[str(t)]["train"]["distributed"] for t in (0, 1)] == ["FSDP", "FSDP"]
    for t in (0, 1):
        samples = [read_table(d / f"iter_{t}" / "synthetic.parquet") for d in (run, one)]
        assert [[(r["prompt_index"], r["response_ids"]) for r in rows] for rows in samples] == [
            [(r["prompt_index"], r["response_ids"]) for r in samples[1]]
        ] * 2
        wa, wb = _weights(one, t), _weights(run, t)
        assert set(wa) == set(wb)  # the tied output embedding is not saved apart (the gather broke the tie)
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 3e-4  # train.lr (module docstring)
        for ma, mb in zip(_metrics(one, t), _metrics(run, t), strict=True):
            assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-4)
            assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)


def test_two_processes_share_cached_evaluations(two: Path, tiny_model_dir: Path) -> None:
    """A second two-process run of the same training under another name: both processes skip the
    evaluations of the weights the first run evaluated (the main process decides and tells the other)."""
    tmp = two.parent.parent
    # a fault armed in process 1's first evaluation part: the run fails if that process evaluates anything
    rc, out, _ = _launch("torchrun", tmp, tiny_model_dir, fault="eval:1@1", name="again",
                         **{"selfplay.iterations": 1})  # fmt: skip
    assert rc == 0, out[-3000:]
    manifest = read_json(tmp / "runs" / "again" / "manifest.json")["iterations"]
    for key, d in (("base", "base"), ("0", "iter_0")):
        assert manifest[key]["eval"]["cached"], key
        assert read_json(tmp / "runs" / "again" / d / "eval.json") == read_json(two / d / "eval.json")


def test_resume_with_another_number_of_processes_and_after_kill_9(
    two: Path, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. one process stops mid-training; 2. two processes (torchrun) take over — generation and scores
    are reused, the one-process training state is dropped (its data slices belong to one process) — and
    are killed with SIGKILL mid-training; 3. the shipped `accelerate launch` config resumes from the
    two-process training state and ends bit-identical to the uninterrupted two-process run."""
    over = {"selfplay.iterations": 1, "eval.enabled": False}
    run_dir = tmp_path / "runs" / RUN
    it0 = run_dir / "iter_0"
    # step 1
    monkeypatch.setenv("SPACEFT_FAULT", "train:2")
    with pytest.raises(InjectedFault):
        main(["run", "tiny", *tiny_overrides(tmp_path, tiny_model_dir, **{**K2, **over})])
    monkeypatch.delenv("SPACEFT_FAULT")
    synthetic = (it0 / "synthetic.parquet").stat().st_mtime_ns
    # step 2
    rc, out, _ = _launch("torchrun", tmp_path, tiny_model_dir, fault="train:3:kill", **over)
    assert rc != 0
    assert "saved training state is from 1 process(es), this run has 2" in out
    assert (it0 / "synthetic.parquet").stat().st_mtime_ns == synthetic  # not regenerated
    assert json.loads((it0 / "train_state" / "progress.json").read_text())["step"] == 2
    assert not (it0 / "model").exists()
    # step 3
    rc, out, _ = _launch("accelerate", tmp_path, tiny_model_dir, **over)
    assert rc == 0, out[-3000:]
    assert "iteration 0: resuming training at step 2/4" in out
    wa, wb = _weights(two, 0), _weights(run_dir, 0)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same number of processes as `two`: bit-identical
    assert [m["step"] for m in _metrics(run_dir, 0)] == [1, 2, 3, 4]


def test_a_non_finite_loss_on_one_process_stops_both(two: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A NaN opponent score of one prompt (bad data) reaches one process's micro-batch; both stop."""
    run_dir = tmp_path / "runs" / RUN
    shutil.copytree(two, run_dir)
    path = run_dir / "iter_1" / "opponent_logps.parquet"
    rows = read_table(path)
    bad = rows[0]["prompt_index"]
    for r in rows:
        if r["kind"] == "real" and r["prompt_index"] == bad:
            r["logp"] = float("nan")
    write_table(path, rows)
    rc, out, seconds = _launch("torchrun", tmp_path, tiny_model_dir, "train", "--iteration", "1")
    assert rc != 0 and seconds < 120
    for rank in (0, 1):
        assert f"spaceft: error (process {rank} of 2): non-finite loss at iteration 1" in out
    assert not (run_dir / "iter_1" / "model").exists()


def test_an_error_on_one_process_stops_both_with_its_message(
    two: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Process 1 fails in its share of the generate stage (batch 1 of 2); process 0 finishes its own
    share, then stops too with process 1's message instead of going on alone (or waiting for the
    timeout)."""
    run_dir = tmp_path / "runs" / RUN
    shutil.copytree(two, run_dir)
    rc, out, seconds = _launch(
        "torchrun", tmp_path, tiny_model_dir, "generate", "--iteration", "1", fault="generate:1@1"
    )
    assert rc != 0 and seconds < 120
    assert (
        "spaceft: error (process 0 of 2): generate of iteration 1 failed on process 1 of 2: InjectedFault"
        in out
    )
    assert not (run_dir / "iter_1" / "synthetic.parquet").exists()  # nothing half-joined
    assert not (run_dir / "iter_1" / "model").exists()  # re-generating removed what was built on it


def test_two_processes_agree_on_auto_batch_sizes_and_a_pinned_hub_commit(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`batch_size: auto` and a hub id both decide on the main process and broadcast: under torchrun
    the run finishes, records one choice, and both processes read the same local snapshot."""
    import shutil

    sha = "3" * 40
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # the child processes read it at import
    over = {"generation.batch_size": "auto", "eval.batch_size": "auto", "selfplay.iterations": 1}
    rc, out, _ = _launch("torchrun", tmp_path, Path("org/tiny"), **over)
    assert rc == 0, out[-3000:]
    manifest = read_json(tmp_path / "runs" / RUN / "manifest.json")
    assert manifest["start_model_commit"] == sha and manifest["start_model"].endswith(sha)
    assert set(manifest["batch_sizes"]) == {"generation", "eval"}
    assert manifest["iterations"]["0"]["train"]["processes"] == 2


def test_a_sentencepiece_chat_model_gives_the_one_process_result_on_two_processes(tmp_path: Path) -> None:
    """The paper's kind of model on more than one process: a Llama with a zephyr-style SentencePiece
    tokenizer (BOS added by encoding, ``<|assistant|>`` then ``\\n``, ``</s>`` ending turns), multi-turn
    non-ASCII conversations, K = 2, two iterations; torchrun's two processes sample, score and train
    what one process does."""
    from .chat_tokenizers import zephyr
    from .test_chat import MULTI_TURN, write_family_model

    tokenizer = zephyr()
    model = write_family_model(tmp_path, tokenizer)
    rows = [
        {"messages": [*MULTI_TURN[: 1 + 2 * (i % 2)], {"role": "user", "content": f"what is {i} über?"},
                      {"role": "assistant", "content": f"The answer is {i}, café."}]}
        for i in range(12)
    ]  # fmt: skip
    for name, part in (("train", rows[:8]), ("eval", rows[8:])):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8"
        )
    over = {"data.train": str(tmp_path / "train.jsonl"), "data.eval": str(tmp_path / "eval.jsonl"),
            "name": "zephyr"}  # fmt: skip
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir(), two_dir.mkdir()
    assert main(["run", "tiny", *tiny_overrides(one_dir, model, **{**K2, **over})]) == 0
    rc, out, _ = _launch("torchrun", two_dir, model, **over)
    assert rc == 0, out[-3000:]
    one, two = one_dir / "runs" / "zephyr", two_dir / "runs" / "zephyr"
    manifest = read_json(two / "manifest.json")
    assert manifest["iterations"]["1"]["train"]["processes"] == 2
    for t in (0, 1):
        a, b = (read_table(d / f"iter_{t}" / "synthetic.parquet") for d in (one, two))
        assert len(a) == 16 and [r["response_ids"] for r in a] == [r["response_ids"] for r in b]
        a, b = (read_table(d / f"iter_{t}" / "opponent_logps.parquet") for d in (one, two))
        assert [r["logp"] for r in a] == pytest.approx([r["logp"] for r in b], rel=1e-6, abs=1e-4)
        wa, wb = _weights(one, t), _weights(two, t)
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 3e-4  # train.lr (module docstring)
        ea, eb = read_json(one / f"iter_{t}" / "eval.json"), read_json(two / f"iter_{t}" / "eval.json")
        assert ea["n"] == 4 and ea["nll"] == pytest.approx(eb["nll"], rel=1e-5)
        assert manifest["iterations"][str(t)]["generate"]["template_drift"]["checked"] == 16
    from spaceft.rundata import training_data

    pairs = training_data(two)  # every conversation kept, BOS once, each answer opening with the \n
    assert len(pairs) == 8 and all(p.prompt_ids.count(tokenizer.bos_token_id) == 1 for p in pairs)
    assert {tokenizer.convert_ids_to_tokens(p.response_ids[0]) for p in pairs} == {"<0x0A>"}
