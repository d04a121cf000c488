"""Issue 9: every bad setting, path and run directory fails early with one line naming the key or path.

Each test drives the real entry point (`spaceft.cli.main`) or the real function, and stops before any
model is loaded where the issue asks for that; none needs a network.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from spaceft import preflight
from spaceft.cli import build_parser, main, split_overrides
from spaceft.config import ModelConfig
from spaceft.configfile import load_config
from spaceft.rundir import (
    DamagedFileError,
    Manifest,
    RunDirBusyError,
    atomic_dir,
    atomic_path,
    clean_leftovers,
    file_hash,
    lock_run_dir,
    read_jsonl,
    unlock_run_dir,
    write_json,
)
from spaceft.tasks import write_arithmetic_jsonl

from .conftest import tiny_overrides


def _fail(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 and a short error without a traceback; return the error line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("spaceft: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _run_argv(tmp: Path, model_dir: Path | str, *extra: str, **over: object) -> list[str]:
    return ["run", "tiny", *tiny_overrides(tmp, Path(model_dir), **over), *extra]


# ------------------------------------------------------------------------------------ config values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generation.top_k=-5", "generation.top_k must be >= 0 (0 disables it), got -5"),
        ("generation.temperature=nan", "generation.temperature must be a finite number, got nan"),
        ("generation.top_p=.nan", "generation.top_p must be a finite number, got nan"),
        ("train.lr=inf", "train.lr must be a finite number, got inf"),
        ("data.train_size=-3", "data.train_size must be >= 1 (or null for every row), got -3"),
        ("data.eval_size=0", "data.eval_size must be >= 1"),
        ("name=", "name must be a plain directory name (the run goes to <output_dir>/<name>), got ''"),
        ("name=a/b", "name must be a plain directory name"),
        ("output_dir=", "output_dir is empty"),
        ("model.name=", "model.name is empty"),
        ("train.lr_after=0", "train.lr_after must be > 0 (or null to keep train.lr), got 0.0"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens must be >= 1"),
        ("eval.batch_size=0", "eval.batch_size must be an integer >= 1 or auto, got 0"),
        ("model.lora.dropout=1", "model.lora.dropout must be in [0, 1)"),
        ("data.format=csv", "data.format must be auto, messages, prompt_completion or prompt_response"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, ["data.train=x.jsonl", override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("train.lerning_rate=1e-5", "did you mean 'train.lr'?"),  # was 'train.lr_after'
        ("lerning_rate=1e-5", "did you mean 'train.lr'?"),  # a section key without its section
        ("lr=1e-5", "did you mean 'train.lr'?"),
        ("generation.topk=5", "did you mean 'generation.top_k'?"),
        ("train.num_train_epochs=3", "did you mean 'train.epochs'?"),
    ],
)
def test_typos_suggest_the_nearest_key_of_the_same_section(override: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match="unknown config key") as err:
        load_config(None, ["data.train=x.jsonl", override])
    assert suggestion in str(err.value)


def test_lr_after_never_silently_replaces_the_users_lr(tmp_path: Path) -> None:
    """The README's own-data recipe sets train.lr only: every iteration trains at that rate."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": "pairs.jsonl"}, "train": {"lr": 5e-7}}))
    cfg = load_config(recipe)
    assert [cfg.train.lr_for(t) for t in range(5)] == [5e-7] * 5


@pytest.mark.parametrize(
    ("recipe", "rates"),
    [  # the shipped recipes that switch rates state lr_after, so they train exactly as before
        ("paper_space", [5e-7, 5e-7, 1e-7, 1e-7, 1e-7]),
        ("paper_spin", [5e-7, 5e-7, 1e-7, 1e-7, 1e-7]),
        ("demo", [1e-5, 1e-5, 5e-6]),
        ("demo_spin", [1e-5, 1e-5, 5e-6]),
        ("demo_sft", [1e-5, 1e-5, 5e-6]),
        ("tiny", [3e-4, 3e-4]),
    ],
)
def test_shipped_recipes_keep_their_learning_rate_schedule(recipe: str, rates: list[float]) -> None:
    from spaceft.cli import resolve_recipe

    cfg = load_config(resolve_recipe(recipe))
    assert [cfg.train.lr_for(t) for t in range(len(rates))] == rates


def test_base_finds_a_shipped_recipe_by_name(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: tiny\nname: mine\ntrain: {lr: 1.0e-4}\n")
    cfg = load_config(recipe)
    assert cfg.name == "mine" and cfg.model.name == "tiny-random" and cfg.train.lr == 1e-4
    recipe.write_text("base: tinyy\n")
    with pytest.raises(FileNotFoundError, match=r"base recipe 'tinyy' is neither a file next to it .* tiny"):
        load_config(recipe)


# ---------------------------------------------------------------------------------------------- CLI


def test_overrides_and_flags_go_anywhere_on_the_line() -> None:
    for argv in (
        ["generate", "conv.yaml", "-t", "0", "name=x"],
        ["generate", "name=x", "conv.yaml", "--iteration", "0"],
        ["-q", "generate", "conv.yaml", "name=x", "-t", "0", "--debug"],
    ):
        rest, overrides = split_overrides(argv)
        args = build_parser().parse_args(rest)
        assert (args.recipe, args.iteration, overrides) == ("conv.yaml", 0, ["name=x"])
    rest, overrides = split_overrides(["report", "runs/a=b"])  # a path with '=' is no override
    assert build_parser().parse_args(rest).run_dir == "runs/a=b" and overrides == []


def test_run_with_force_before_an_override_reaches_the_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from spaceft import selfplay

    seen = {}

    def fake_run(cfg, *, force=False, **kw):
        seen.update(name=cfg.name, force=force)
        raise KeyboardInterrupt  # stop here; Ctrl-C is the next test's subject

    monkeypatch.setattr(selfplay, "run", fake_run)
    assert main(["run", "tiny", "--force", "name=x", f"output_dir={tmp_path}"]) == 130
    assert seen == {"name": "x", "force": True}


def test_ctrl_c_is_one_line_that_says_the_run_can_resume(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spaceft import selfplay

    monkeypatch.setattr(selfplay, "run", lambda cfg, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["run", "tiny", f"output_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "spaceft: interrupted: run the same command again to resume where it stopped"
    )


def test_run_help_says_where_to_see_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "`spaceft config RECIPE` prints every key" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "error",
    [  # torch's words for a short write (seen when saving to /dev/full), and the OS's
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_a_full_disk_is_reported_as_such(
    error: Exception, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spaceft import selfplay

    def full(cfg, **kw):
        raise error

    monkeypatch.setattr(selfplay, "run", full)
    line = _fail(capsys, ["run", "tiny", f"output_dir={tmp_path}"])
    assert line.startswith(f"spaceft: error: no space left on device: {tmp_path / 'tiny-space'} (")
    assert line.endswith(" MiB free): free some space and run again")


def test_a_disk_too_small_for_the_runs_models_stops_it_before_any_work(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model's exact weight count from its safetensors headers; 2 iterations (the tiny recipe)
    of float32 models plus two RMSprop states (weights + one moment each): a disk with less free stops
    the run in preflight, before the start model is even loaded; a resumed run needs only what is left."""
    from spaceft.models import load_model

    params = preflight.weight_count(tiny_model_dir)
    assert params == sum(p.numel() for p in load_model(str(tiny_model_dir), ModelConfig()).parameters())
    cfg = load_config("tiny", [f"output_dir={tmp_path}", "train.save_every=1"])
    needed, how = preflight.disk_needed(cfg, params, 2)
    assert needed == 2 * 4 * params + 2 * 8 * params and how.startswith("2 iteration model(s) of")
    assert preflight.disk_needed(cfg, params, 0)[0] == 0  # a finished run writes nothing more
    # DeepSpeed's state of 16-bit weights adds float32 masters, and its moments are float32
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert preflight.disk_needed(cfg, params, 2)[0] == 2 * 4 * params + 2 * (2 + 4 + 4) * params
    bf16 = load_config("tiny", [f"output_dir={tmp_path}", "train.save_every=1", "model.dtype=bfloat16",
                                "train.optimizer=adamw"])  # fmt: skip
    assert preflight.disk_needed(bf16, params, 1)[0] == 2 * params + 2 * (2 + 4 + 8) * params
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert preflight.disk_needed(cfg, params, 2)[0] == needed  # float32 throughout: no masters
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    real = shutil.disk_usage(tmp_path)

    def free(n: int) -> None:
        monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: type(real)(real.total, real.used, n))

    free(needed - 1)
    line = _fail(capsys, _run_argv(tmp_path, tiny_model_dir, **{"train.save_every": 1}))
    assert f"the run still writes about {needed / 1e6:.1f} MB (2 iteration model(s)" in line
    assert "free space, choose another output_dir, or lower selfplay.iterations" in line
    assert not list((tmp_path / "runs").glob("*/iter_*"))
    free(needed)
    preflight.check_disk(cfg, tiny_model_dir, 2)  # enough room for everything
    manifest = Manifest(tmp_path / "manifest.json", {"iterations": {"0": {"train": {"status": "done"}}}})
    assert preflight.untrained(cfg, manifest) == [1]
    left = needed - 4 * params  # iteration 0 trained: one model and the states are left to write
    free(left)
    preflight.check_disk(cfg, tiny_model_dir, 1)
    free(left - 1)
    with pytest.raises(ValueError, match=r"1 iteration model\(s\) of .* \+ 2 training states of"):
        preflight.check_disk(cfg, tiny_model_dir, 1)
    free(0)  # commands that do not train (spaceft eval) are not stopped by what training needs
    evaluating = load_config("tiny", [f"output_dir={tmp_path / 'e'}", f"model.name={tiny_model_dir}"])
    preflight.check(evaluating, trains=False)


def test_a_training_that_cannot_fit_on_its_gpu_stops_before_any_work(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights, gradients and optimizer state per GPU as each launch shards them, for the paper's 7.24B
    Mistral: plain DDP in float32 with AdamW cannot fit an 80 GB GPU; paper_space's ZeRO-3 in bf16 can."""
    p = 7_241_732_096  # Mistral-7B's parameter count
    fp32 = load_config("tiny", [f"output_dir={tmp_path}", "train.optimizer=adamw"])
    bf16 = load_config("tiny", [f"output_dir={tmp_path}", "model.dtype=bfloat16"])
    ds = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "8"}
    assert preflight.training_memory(fp32, p, {})[0] == 16 * p  # weights, gradients, 2 moments
    assert preflight.training_memory(fp32, p, {"WORLD_SIZE": "8"})[0] == 20 * p  # + DDP's buckets
    fsdp = {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8"}
    assert preflight.training_memory(fp32, p, fsdp)[0] == 16 * p // 8
    assert preflight.training_memory(fp32, p, {**fsdp, "FSDP_OFFLOAD_PARAMS": "true"}) is None
    # DeepSpeed: 2-byte weights and gradients, float32 masters and one moment (RMSprop): 2 + 2 + 8
    z3, z2 = ({**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": stage} for stage in "32")
    assert preflight.training_memory(bf16, p, z3)[0] == int(12 * p / 8)
    assert preflight.training_memory(bf16, p, z2)[0] == int((2 + 2 / 8 + 8 / 8) * p)
    z0 = {**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0", "ACCELERATE_MIXED_PRECISION": "no"}
    assert preflight.training_memory(bf16, p, z0)[0] == (2 + 2 + 2) * p  # the torch optimizer: bf16 moment
    assert preflight.training_memory(bf16, p, ds) == preflight.training_memory(bf16, p, z2)  # accelerate's 2
    off = {**z3, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}
    assert preflight.training_memory(bf16, p, off) is None
    # a DeepSpeed config file gives the stage (the launcher's variables then do not)
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    ds_file = {**ds, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(file), "ACCELERATE_MIXED_PRECISION": "no"}
    # bf16 from the file: 2-byte weights, their gradients over 8, masters and AdamW's moments over 8
    assert preflight.training_memory(fp32, p, ds_file)[0] == int((2 + 2 / 8 + 12 / 8) * p)
    # FSDP1's strategies: hybrid shards within a node, NO_SHARD not at all; FSDP2's hybrid mesh replicates
    nodes = {**fsdp, "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "16"}
    def fsdp_bytes(**env: str) -> int:
        return preflight.training_memory(fp32, p, {**nodes, **env})[0]

    assert fsdp_bytes(FSDP_SHARDING_STRATEGY="HYBRID_SHARD") == 4 * p  # within a node of 4
    assert fsdp_bytes(FSDP_SHARDING_STRATEGY="4") == 4 * p  # (the same, by number)
    assert fsdp_bytes(FSDP_SHARDING_STRATEGY="SHARD_GRAD_OP") == p
    assert fsdp_bytes(FSDP_RESHARD_AFTER_FORWARD="NO_SHARD") == 16 * p  # accelerate's FSDP1 fallback
    hsdp = {"FSDP_VERSION": "2", "ACCELERATE_USE_PARALLELISM_CONFIG": "true"}
    assert fsdp_bytes(**hsdp, PARALLELISM_CONFIG_DP_REPLICATE_SIZE="2") == 2 * p
    assert fsdp_bytes(**hsdp, FSDP_SHARDING_STRATEGY="NO_SHARD") == p  # FSDP1's strategy: not FSDP2's
    lora = load_config("tiny", [f"output_dir={tmp_path}", "model.lora.r=8", "model.dtype=bfloat16"])
    assert preflight.training_memory(lora, p, {"WORLD_SIZE": "8"})[0] == 2 * p
    monkeypatch.setattr(preflight, "weight_count", lambda d: p)
    with pytest.raises(ValueError, match=r"holds at least 144\.8 GB per GPU .* more than the GPU's 80\.0 GB"):
        preflight.check_gpu_memory(fp32, tiny_model_dir, 80 * 10**9, {"WORLD_SIZE": "8"})
    preflight.check_gpu_memory(bf16, tiny_model_dir, 80 * 10**9, z3)  # 10.9 GB
    # in a run's preflight on a GPU machine (the run itself is not started here: accelerate's state would
    # keep the fake GPU for the tests that follow)
    import torch

    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # one visible GPU per process: device 0
    sizes = {0: 10**5}  # no other device: asking for device 3 fails the test
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=sizes[i]))
    run = load_config("tiny", [f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}"])
    with pytest.raises(ValueError, match=r"per GPU .* more than the GPU's 0\.1 MB: shard it .*fsdp2\.yaml"):
        preflight.check(run)  # the tiny model needs 0.3 MB


# ------------------------------------------------------------------------------ paths, before loading


def test_missing_local_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fail(capsys, _run_argv(tmp_path, "/no/such/model"))
    assert "model.name: no such directory: /no/such/model" in line


def test_bare_name_without_the_hub(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    line = _fail(capsys, _run_argv(tmp_path, "no-such-model-xyz"))
    assert "model.name: 'no-such-model-xyz' is not a local directory, and the Hugging Face Hub is " in line
    assert "offline (HF_HUB_OFFLINE=1) with no cached copy" in line


def test_hub_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    def unreachable(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    cfg = load_config(None, ["data.train=x.jsonl", "model.name=org/model"])
    with pytest.raises(ValueError, match=r"could not be reached to fetch it \(ConnectionError\)"):
        preflight.check_model(cfg)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ((), "has no config.json, so it is not a Hugging Face model directory"),
        (("config.json",), "has config.json but no weights"),
        (("config.json", "model.safetensors"), "has no tokenizer"),
    ],
)
def test_a_directory_without_a_model(
    keep: tuple[str, ...], message: str, tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in keep:
        shutil.copy(tiny_model_dir / name, model / name)
    assert message in _fail(capsys, _run_argv(tmp_path, model))


def test_max_new_tokens_beyond_the_models_positions(
    tmp_path: Path, tiny_model_dir: Path, capsys, caplog
) -> None:
    model = tmp_path / "model512"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    over = {"generation.max_new_tokens": 2000, "data.max_prompt_tokens": 256, "data.max_response_tokens": 128}
    line = _fail(capsys, _run_argv(tmp_path, model, **over))
    assert (
        "generation.max_new_tokens (2000) does not fit the 512 positions of the model "
        f"(max_position_embeddings in {model / 'config.json'}): lower it below 512 (prompt and response "
        "share the positions)" in line
    )
    over = ["data.train=x.jsonl", "data.max_prompt_tokens=400", "generation.max_new_tokens=200"]
    cfg = load_config(None, over)
    with caplog.at_level(logging.WARNING):
        preflight.check_positions(cfg, model)  # each fits alone, not both at their longest: a warning
    assert "generation.max_new_tokens (200) + data.max_prompt_tokens (400) exceeds the 512 positions" in (
        caplog.text
    )


def test_missing_data_file(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    line = _fail(capsys, _run_argv(tmp_path, tiny_model_dir, **{"data.train": str(tmp_path / "nope.jsonl")}))
    assert f"data.train: no such file or directory: {tmp_path / 'nope.jsonl'}" in line


def test_output_path_that_is_a_file(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    (tmp_path / "runs").write_text("not a directory")
    line = _fail(capsys, _run_argv(tmp_path, tiny_model_dir))
    assert f"{tmp_path / 'runs'} is a file, so the run directory" in line


def test_unwritable_run_directory(tmp_path: Path, tiny_model_dir: Path, capsys, monkeypatch) -> None:
    """The OS's answer is simulated: the tests may run as root, whom permissions do not stop."""
    real = Path.write_bytes

    def refuse(self: Path, data: bytes) -> int:
        if "write-probe" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    line = _fail(capsys, _run_argv(tmp_path, tiny_model_dir))
    assert f"the run directory {tmp_path / 'runs' / 'tiny-space'} is not writable (Permission denied)" in line


# ---------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("content", ["", "{\"iterations\": {\"0\": {"])
def test_damaged_manifest_names_itself_and_the_way_out(
    content: str, tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    run_dir = tmp_path / "runs" / "tiny-space"
    leftover = run_dir / "iter_0" / ".model.tmp-0123abcd" / "model.safetensors"  # a kill in the final save
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"weights")
    (run_dir / "manifest.json").write_text(content)
    line = _fail(capsys, _run_argv(tmp_path, tiny_model_dir))
    assert f"{run_dir / 'manifest.json'} is damaged: " in line
    assert "rerun with --force to start this run over" in line
    assert not leftover.parent.exists()  # the run's start removed it, under the lock, before the manifest


def test_force_sets_a_damaged_manifest_aside(tmp_path: Path) -> None:
    (tmp_path / "iter_0").mkdir()
    (tmp_path / "manifest.json").write_text("{")
    manifest = preflight.open_manifest(tmp_path, force=True)
    assert manifest.data == {"iterations": {}}
    assert not (tmp_path / "iter_0").exists() and not (tmp_path / "manifest.json").exists()
    assert len(list(tmp_path.glob("manifest.json.damaged-*"))) == 1


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path: Path, caplog) -> None:
    from spaceft.train_state import truncate_metrics as _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        _truncate_metrics(path, 2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert "dropping its torn last line 3" in caplog.text
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DamagedFileError, match=r"metrics.jsonl is damaged: line 2 is not a JSON object"):
        _truncate_metrics(path, 2)


def test_damaged_outputs_are_found_by_their_hash_and_redone(tmp_path: Path, caplog) -> None:
    cfg = load_config(None, ["data.train=x.jsonl", f"output_dir={tmp_path}", "selfplay.iterations=3"])
    model = cfg.run_dir / "iter_0" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"x" * 1000)
    manifest = Manifest.open(cfg.run_dir)
    manifest.data["fingerprint"] = cfg.training_fingerprint()
    manifest.mark_done(0, "train", hash=file_hash(model))
    manifest.mark_done(0, "eval")
    manifest.mark_done(1, "generate")  # iteration 1 reads iteration 0's model
    preflight.verify_pending_inputs(manifest, cfg)  # intact: nothing changes
    assert manifest.is_done(0, "train") and manifest.is_done(1, "generate")
    (model / "model.safetensors").write_bytes(b"x" * 500)  # truncated
    with caplog.at_level(logging.WARNING):
        preflight.verify_pending_inputs(manifest, cfg)
    assert (
        f"{model} does not match the hash recorded in manifest.json (truncated or changed since): redoing "
        "train of iteration 0 and what was built on it" in caplog.text
    )
    assert not manifest.is_done(0, "train") and not manifest.is_done(0, "eval")
    assert "1" not in Manifest.open(cfg.run_dir).data["iterations"]  # saved: built on the damaged model


def test_leftovers_of_an_interrupted_save_are_removed(tmp_path: Path) -> None:
    it = tmp_path / "iter_0"
    keep = [it / "model" / "model.safetensors", it / "synthetic.parts" / "part-00000.parquet",
            it / "metrics.jsonl", tmp_path / "spaceft.lock", tmp_path / ".hidden"]  # fmt: skip
    gone = [it / ".model.k3j2h1g0" / "model.safetensors", it / ".model.tmp-0a1b2c3d" / "config.json",
            it / ".synthetic.parquet.tmp-89abcdef", it / ".model.old" / "x", it / "train_state.old" / "y",
            tmp_path / "data" / ".arithmetic_train_8_seed0.jsonl.abcdefgh.tmp"]  # fmt: skip
    for path in keep + gone:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = clean_leftovers(tmp_path)
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in gone) and len(removed) == 6


def test_a_complete_state_caught_between_renames_is_promoted(tmp_path: Path) -> None:
    (tmp_path / "train_state.tmp").mkdir()
    (tmp_path / "train_state.tmp" / "progress.json").write_text("{}")
    clean_leftovers(tmp_path)
    assert (tmp_path / "train_state" / "progress.json").exists()


def test_files_written_through_temporary_names_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        write_arithmetic_jsonl(tmp_path / "task.jsonl", 2, seed=0, split="train")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "task.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


# -------------------------------------------------------------------------------------------- lock


HOLDER = """
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "hostA", "command": "spaceft run tiny",
                         "since": "2026-01-01 00:00:00 UTC"}).encode())
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_run_on_a_directory_says_who_holds_it(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    run_dir = tmp_path / "runs" / "tiny-space"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / "spaceft.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        line = _fail(capsys, _run_argv(tmp_path, tiny_model_dir))
        assert line == (
            f"spaceft: error: {run_dir} is in use by process {holder.pid} on hostA (spaceft run tiny, since "
            "2026-01-01 00:00:00 UTC): wait for that run to end, or give this one another name (name=...)"
        )
        assert not (run_dir / "iter_0").exists()  # nothing was written
    finally:
        holder.communicate("")
    lock_run_dir(run_dir)  # the holder is gone, and so is its lock
    lock_run_dir(run_dir)  # this process may take it again (sequential runs in one process)
    unlock_run_dir(run_dir)


def test_lock_is_exclusive_between_descriptors(tmp_path: Path) -> None:
    import fcntl

    fd = os.open(tmp_path / "spaceft.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RunDirBusyError, match="is in use by another process"):
            lock_run_dir(tmp_path)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- resume state, no pickles


class _Planted:
    """Unpickling this creates a file: proof that code from the run directory ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def saved_state(tiny_model_dir: Path, tmp_path: Path):
    """A real training state of the tiny model after one optimizer step, and what restores it."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from spaceft.config import ModelConfig
    from spaceft.models import load_model
    from spaceft.train_state import save_state as _save_state

    accelerator = Accelerator()
    model = load_model(str(tiny_model_dir), ModelConfig())
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.tensor([[1, 2, 3]], device=accelerator.device)).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    state_dir = tmp_path / "train_state"
    _save_state(accelerator, state_dir, 1, scheduler)
    return accelerator, scheduler, state_dir


def test_state_is_json_and_safetensors_and_resumes(saved_state) -> None:
    from spaceft.train_state import load_state as _load_state

    accelerator, scheduler, state_dir = saved_state
    progress = json.loads((state_dir / "progress.json").read_text())
    assert progress["format"] == 2 and progress["step"] == 1 and progress["scheduler"]["last_epoch"] == 1
    assert not list(state_dir.glob("custom_checkpoint_*"))
    scheduler.step()
    assert scheduler.last_epoch == 2
    assert _load_state(accelerator, state_dir, scheduler, 0) == 1
    assert scheduler.last_epoch == 1


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_a_planted_pickle_is_never_executed(planted: str, saved_state, tmp_path: Path) -> None:
    from spaceft.train_state import load_state as _load_state

    accelerator, scheduler, state_dir = saved_state
    marker = tmp_path / "PWNED"
    with (state_dir / planted).open("wb") as fh:
        pickle.dump(_Planted(marker), fh)
    if planted == "random_states_0.pkl":  # Accelerate tolerates unreadable RNG states: resume goes on
        assert _load_state(accelerator, state_dir, scheduler, 0) == 1
    else:
        pattern = f"{state_dir} is damaged: .*delete {state_dir} to restart"
        with pytest.raises(DamagedFileError, match=pattern) as e:
            _load_state(accelerator, state_dir, scheduler, 0)
        assert "\n" not in str(e.value)  # one line, however long the loader's own message
        if planted == "optimizer.bin":
            assert "a pickle of more than tensors: refused, loading it could run code" in str(e.value)
    assert not marker.exists()


def test_an_earlier_pickled_state_is_discarded_not_loaded(saved_state, tmp_path: Path, caplog) -> None:
    from spaceft.train_state import load_state as _load_state

    accelerator, scheduler, state_dir = saved_state
    write_json(state_dir / "progress.json", {"step": 1})  # what spaceft wrote before issue 9
    with (state_dir / "custom_checkpoint_0.pkl").open("wb") as fh:
        pickle.dump(_Planted(tmp_path / "PWNED"), fh)
    with caplog.at_level(logging.WARNING):
        assert _load_state(accelerator, state_dir, scheduler, 0) == 0
    assert "restarts from its first step" in caplog.text
    assert not state_dir.exists() and not (tmp_path / "PWNED").exists()


def test_resume_marker_is_removed_first(saved_state, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill while the state is deleted leaves no marker, so the next start trains from step 0 instead
    of failing on a half-deleted state forever."""
    from spaceft import train_state

    accelerator, scheduler, state_dir = saved_state

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_state.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        train_state.drop_state(state_dir)
    assert not (state_dir / "progress.json").exists() and (state_dir / "optimizer.bin").exists()
    monkeypatch.undo()
    assert train_state.load_state(accelerator, state_dir, scheduler, 0) == 0
    assert not state_dir.exists()


def test_non_finite_loss_before_any_saved_state(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from spaceft import train as train_mod
    from spaceft.config import ModelConfig
    from spaceft.configfile import config_from_dict
    from spaceft.losses import LossOutput
    from spaceft.models import load_model, load_tokenizer

    model = load_model(str(tiny_model_dir), ModelConfig())
    items = [train_mod.TrainItem((5, 6, 7), (8, 9), ((10, 11),), 0.0, (0.0,))] * 2

    def nan_loss(out, cfg, **_) -> LossOutput:
        b = out["policy_real"].shape[0]
        return LossOutput(out["policy_real"] * float("nan"), torch.zeros(b), torch.zeros(b, 1))

    monkeypatch.setattr(train_mod, "loss_from_batch", nan_loss)
    train = {"global_batch_size": 2, "micro_batch_size": 2, "epochs": 1}
    cfg = config_from_dict({"output_dir": str(tmp_path), "data": {"train": "x"}, "train": train,
                            "logging": {"progress": False}})  # fmt: skip
    with pytest.raises(train_mod.NonFiniteLossError, match="no training state was saved yet, so iteration 0"):
        train_mod.train_iteration(model, load_tokenizer(str(tiny_model_dir)), items, cfg, iteration=0,
                                  iter_dir=tmp_path / "it")  # fmt: skip


# ------------------------------------------------------------------------------------------- logs


def test_third_party_lines_stay_off_the_console_but_reach_the_log_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spaceft.cli import _log_to_run_dir, _setup_console_logging

    _setup_console_logging(quiet=False, verbose=False)
    _log_to_run_dir(tmp_path)
    logging.getLogger("accelerate.utils.other").warning("Removed shared tensor {'lm_head.weight'}")
    logging.getLogger("accelerate.accelerator").info("Saving current state to x")
    logging.getLogger("spaceft.selfplay").info("evaluating the start model")
    err = capsys.readouterr().err
    assert "evaluating the start model" in err
    assert "Removed shared tensor" not in err and "Saving current state" not in err
    text = (tmp_path / "logs" / "spaceft.log").read_text()
    assert "Removed shared tensor" in text and "Saving current state" in text and "evaluating" in text


def test_skipped_rows_are_a_warning_with_counts(tmp_path: Path, caplog) -> None:
    from spaceft.data import load_examples

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "", "completion": "b"}\n')
    with caplog.at_level(logging.WARNING, logger="spaceft.data"):
        examples, _ = load_examples(str(path), on_bad_row="skip")
    assert len(examples) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("kept 1 of 2 rows (skipped: " in r.getMessage() for r in warnings)


def test_config_is_printed_only_with_verbose(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spaceft import selfplay

    monkeypatch.setattr(selfplay, "run", lambda cfg, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    main(["run", "tiny", f"output_dir={tmp_path}"])
    assert "# resolved config" not in capsys.readouterr().out
    main(["run", "tiny", f"output_dir={tmp_path}", "-v"])
    assert "# resolved config:\nname: tiny-space" in capsys.readouterr().out


def test_the_vllm_backend_without_vllm_is_refused_before_the_start_models_evaluation(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """paper_space samples with vLLM, and its first generation comes after an hour of lm-eval on the start
    model: a missing or broken vLLM is found in preflight instead."""
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, installed or not
    line = _fail(capsys, _run_argv(tmp_path, tiny_model_dir, **{"generation.backend": "vllm"}))
    assert "generation.backend=vllm, but vLLM cannot be imported (ModuleNotFoundError" in line
    assert "or set generation.backend=hf" in line
    assert not list((tmp_path / "runs").glob("*/base")) and not list((tmp_path / "runs").glob("*/iter_*"))
    cfg = load_config("tiny", [f"output_dir={tmp_path}", "generation.backend=vllm", "selfplay.iterations=3"])
    manifest = SimpleNamespace(data={"iterations": {"0": {"generate": {"status": "done"}}}})
    assert preflight.unfinished(cfg, manifest, "generate") == [1, 2]  # checked while generation is left
    sft = load_config("tiny", [f"output_dir={tmp_path / 's'}", "generation.backend=vllm", "train.loss=sft"])
    preflight.check(sft)  # SFT samples nothing
    vllm = [f"output_dir={tmp_path / 't'}", "generation.backend=vllm"]
    preflight.check(load_config("tiny", vllm), generates=False)  # `spaceft train` on a box without vLLM
    # a tensor-parallel size the launch cannot hold, found with it (the first generation used to)
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace())
    tp4 = load_config("tiny", [*vllm, "generation.tensor_parallel_size=4", "train.global_batch_size=12"])
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 must divide the 6 launched processes"):
        preflight.check(tp4, processes=6)
    preflight.check(tp4, processes=12)  # three engines of four processes
    preflight.check(tp4, processes=6, generates=False)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 needs as many GPUs .* but 2 are visible"):
        preflight.check_tensor_parallel(4, 1)
    preflight.check_tensor_parallel(2, 1)  # one engine over both GPUs


def test_a_tracker_that_cannot_receive_the_metrics_is_refused_before_any_work(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accelerate leaves out a tracker whose package is missing (a debug line): the run would log nowhere
    but metrics.jsonl. W&B without an API key would stop at the first train stage: warned."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    line = _fail(capsys, _run_argv(tmp_path, tiny_model_dir, **{"logging.report_to": "wandb"}))
    assert "logging.report_to=wandb, but wandb is not installed: accelerate would leave it out" in line
    assert not list((tmp_path / "runs").glob("*/base"))
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config("tiny", [f"output_dir={tmp_path}", "logging.report_to=wandb"])
    with caplog.at_level("WARNING", logger="spaceft.preflight"):
        preflight.check_tracker(cfg)
        assert "no W&B API key is set" in caplog.text
        caplog.clear()
        (tmp_path / "no-netrc").write_text("machine api.wandb.ai login user password k3y\n")
        preflight.check_tracker(cfg)  # `wandb login`'s entry
        preflight.check_tracker(cfg, {"WANDB_MODE": "offline"})
        preflight.check_tracker(cfg, {"WANDB_API_KEY": "k"})
    assert caplog.text == ""
    preflight.check_tracker(load_config("tiny", [f"output_dir={tmp_path}", "logging.report_to=tensorboard"]))


def test_a_global_batch_the_processes_cannot_share_is_refused_before_any_work(tmp_path: Path) -> None:
    """Each process runs as many micro-batches as the busiest: with 3 and a global batch of 4, two of them
    would run a stand-in that trains nothing on every step (`test_stand_ins_keep_the_processes_in_step`)."""

    def run(g: int, name: str):
        over = [f"output_dir={tmp_path}", f"name={name}", f"train.global_batch_size={g}"]
        return load_config("tiny", [*over, "train.micro_batch_size=1"])

    idle = r"global_batch_size=4 is not a multiple of the 3 processes: on every optimizer step some "
    with pytest.raises(ValueError, match=idle + r"processes would run a stand-in .* use 3 or 6"):
        preflight.check(run(4, "a"), processes=3)
    with pytest.raises(ValueError, match=r"global_batch_size=2 .* 3 processes: .* stand-in .* use 3$"):
        preflight.check(run(2, "b"), processes=3)
    preflight.check(run(6, "c"), processes=3)
    paper = load_config("paper_space", [f"output_dir={tmp_path}", "name=f"])  # 64 in micro-batches of 4
    with pytest.raises(ValueError, match=r"global_batch_size=64 .* 6 proc.*: .* stand-in .* use 60 or 72$"):
        preflight.check_batch_split(paper, 6)
    preflight.check(run(4, "d"), processes=1)
    preflight.check(run(4, "e"), processes=3, trains=False)  # `spaceft eval` trains nothing


def test_bf16_weights_without_float32_masters_at_a_small_lr_are_refused_before_any_work(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """paper_space's pure-bf16 weights at SPIN's 5e-7 train nothing unless DeepSpeed keeps float32 masters."""
    over = {"model.dtype": "bfloat16", "train.lr": 5e-7}
    line = _fail(capsys, _run_argv(tmp_path, tiny_model_dir, **over))
    assert "model.dtype=bfloat16 trains bf16 weights with no float32 master copy, and at lr 5e-07" in line
    assert not list((tmp_path / "runs").glob("*/iter_*"))
    base = [f"output_dir={tmp_path}", "model.dtype=bfloat16"]
    preflight.check_precision(load_config("tiny", base))  # the tiny recipe's lr 3e-4 is resolved by bf16
    preflight.check_precision(load_config("tiny", [*base, "train.lr=5e-7", "model.lora.r=8"]))
    with pytest.raises(ValueError, match="at lr 1e-06"):  # the lowest rate of any iteration counts
        preflight.check_precision(load_config("tiny", [*base, "train.lr_after=1e-6", "selfplay.iterations=3",
                                                       "train.lr_switch_iteration=2"]))  # fmt: skip
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    preflight.check_precision(load_config("tiny", [*base, "train.lr=5e-7"]))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")  # ZeRO-0 alone keeps no float32 masters
    with pytest.raises(ValueError, match="at lr 5e-07"):
        preflight.check_precision(load_config("tiny", [*base, "train.lr=5e-7"]))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # its bf16 engine does
    preflight.check_precision(load_config("tiny", [*base, "train.lr=5e-7"]))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    low = load_config("tiny", [*base, "train.lr=5e-7", f"model.name={tiny_model_dir}"])
    preflight.check(low, trains=False)  # `spaceft eval` of a run trained elsewhere (under DeepSpeed)
    manifest = Manifest.open(low.run_dir)
    manifest.data["iterations"] = {str(t): {"train": {"status": "done"}} for t in range(2)}
    manifest.save()
    preflight.check(low)  # every iteration trained: nothing left to round away


@pytest.mark.slow
def test_a_misspelt_lm_eval_task_stops_the_run_before_any_work(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The harness would meet the typo at the first evaluation, after loading the model; preflight
    looks the name up in the installed harness's task index first."""
    pytest.importorskip("lm_eval")
    argv = _run_argv(tmp_path, tiny_model_dir, **{"eval.lm_eval_tasks": "[arc_chalenge:25]"})
    line = _fail(capsys, argv)
    assert "eval.lm_eval_tasks entry 'arc_chalenge:25': lm-eval " in line
    assert "has no task or group 'arc_chalenge'; close: arc_challenge" in line
    fixed = _run_argv(tmp_path, tiny_model_dir, **{"eval.lm_eval_tasks": "[truthfulqa_mc2:5]"})
    refused = _fail(capsys, fixed)
    assert "lm-eval's truthfulqa_mc2 fixes num_fewshot: 0 and ignores a few-shot count" in refused
    both = "[harness:mmlu:5,harness:mmlu_anatomy]"
    twice = _fail(capsys, _run_argv(tmp_path, tiny_model_dir, **{"eval.lm_eval_tasks": both}))
    assert "entry 'harness:mmlu_anatomy' is part of 'harness:mmlu:5' (lm-eval's mmlu runs it)" in twice
    assert not list((tmp_path / "runs").rglob("iter_0"))  # nothing ran
    missing = _run_argv(tmp_path, tiny_model_dir, **{"eval.lm_eval_tasks": f"[{tmp_path / 'mine.yaml'}:2]"})
    assert "no such task YAML" in _fail(capsys, missing)


def test_a_random_subset_is_seeded_kept_in_file_order_and_recorded(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from spaceft.models import load_tokenizer
    from spaceft.rundata import load_split

    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(40)))
    tok = load_tokenizer(str(tiny_model_dir))

    def drawn(*over: str) -> tuple[list[str], dict]:
        cfg = load_config("tiny", [f"data.train={rows}", *over])
        examples, _, info = load_split(str(rows), cfg.data, tok, split="train", limit=cfg.data.train_size)
        return [e.source.rsplit(":", 1)[1] for e in examples], info

    first, info = drawn("data.train_size=8")
    assert first == [str(i) for i in range(1, 9)] and "subset" not in info
    random_0, info = drawn("data.train_size=8", "data.subset=random")
    assert random_0 == drawn("data.train_size=8", "data.subset=random")[0]  # seeded
    assert random_0 != first and [int(i) for i in random_0] == sorted(int(i) for i in random_0)
    assert len(set(random_0)) == 8 and info["subset"] == "random 8 of 40 usable rows (seed 0)"
    assert drawn("data.train_size=8", "data.subset=random", "data.seed=1")[0] != random_0
    assert len(drawn("data.train_size=50", "data.subset=random")[0]) == 40  # fewer rows than asked: all
