"""Pieces of the multi-process path that run in one test process: per-prompt seeded sampling, sharded
parts, and `agree` across two gloo processes."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spaceft.config import GenerationConfig, ModelConfig
from spaceft.distributed import RankFailedError, agree
from spaceft.generate import (
    HFGenerator,
    RowSampler,
    merge_generate_parts,
    write_generate_parts,
)
from spaceft.models import load_model
from spaceft.rundir import Shard, read_table

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir), ModelConfig())


def _gen(model, tok, **cfg) -> HFGenerator:
    return HFGenerator(model, GenerationConfig(**cfg), stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                       device=CPU)  # fmt: skip


def test_sampling_never_waits_for_other_processes_even_once_zero3_is_set(
    model, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After training under ZeRO-3 (or once lm-eval's Accelerator exists) transformers' generate would
    turn `synced_gpus` on by itself and step in lockstep with the other processes, which sample other
    shards from their own whole copies: a process with fewer batches would wait forever. Here the
    lockstep's all-reduce would fail, as no process group exists."""
    from transformers.generation import utils as generation_utils

    monkeypatch.setattr(generation_utils, "is_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setattr(generation_utils, "_get_torch_distributed_world_size", lambda: 2, raising=False)
    for temperature in (0.0, 1.0):
        out = _gen(model, tiny_tokenizer, num_samples=1, max_new_tokens=4, temperature=temperature)
        assert len(out.generate([[40, 41], [42]], num_samples=1, seeds=[1, 2])) == 2


def test_the_accelerator_state_exists_before_weights_are_loaded_whole_under_deepspeed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first Accelerator of a DeepSpeed process sets transformers' ZeRO-3 config: made inside
    `whole_weights` (lm-eval makes its own there) it would undo the block's clearing."""
    import accelerate
    import accelerate.state
    from transformers.integrations import deepspeed as hf_deepspeed

    from spaceft.models import whole_weights

    made: list[str] = []

    class Accelerator:  # as accelerate's: the first one's DeepSpeed plugin select() sets the config
        def __init__(self) -> None:
            if not made:
                hf_deepspeed._hf_deepspeed_config_weak_ref = "zero3 config"
            made.append("accelerator")

    monkeypatch.setattr(accelerate, "Accelerator", Accelerator)
    monkeypatch.setattr(accelerate.state, "is_initialized", lambda: bool(made))
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with whole_weights():
        assert hf_deepspeed._hf_deepspeed_config_weak_ref is None  # whole loads inside
        Accelerator()  # lm-eval's, before its from_pretrained
        assert hf_deepspeed._hf_deepspeed_config_weak_ref is None
    assert len(made) == 2 and hf_deepspeed._hf_deepspeed_config_weak_ref == "zero3 config"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    made.clear()
    with whole_weights():
        pass
    assert made == []  # without DeepSpeed no Accelerator is made early


def test_a_prompts_samples_do_not_depend_on_its_batch(model, tiny_tokenizer) -> None:
    """Per-prompt seeds: the same prompt and seed give the same K samples alone, or in a batch of three
    (other lengths, so other padding) in another position."""
    gen = _gen(model, tiny_tokenizer, num_samples=2, max_new_tokens=10)
    p = [40, 41, 42, 43]
    alone = gen.generate([p], num_samples=2, seeds=[11])[0]
    batched = gen.generate([[50] * 7, p, [60, 61]], num_samples=2, seeds=[3, 11, 5])
    assert batched[1] == alone
    assert alone[0] != alone[1]  # sample j has its own stream: the K samples differ
    assert gen.generate([p], num_samples=2, seeds=[12])[0] != alone


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (2.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.6)]
)
def test_row_sampler_draws_from_the_tempered_truncated_softmax(
    temperature: float, top_k: int, top_p: float
) -> None:
    """Exponential-race sampling picks token v with probability p_v: frequencies over 20000 rows match
    the distribution HF's own sampling uses (softmax of the warped logits) within 4 standard errors."""
    logits = torch.tensor([0.0, 0.5, 1.0, 1.5, -1.0])
    n = 20000
    cfg = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = RowSampler(range(n), cfg, CPU, prompt_width=1)
    out = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone())
    picks = out.argmax(-1)
    assert bool(((out == 0).sum(-1) == 1).all())  # exactly one token per row
    freq = torch.bincount(picks, minlength=5).float() / n
    # expected: temperature, then keep the top-k / the smallest set with mass >= top_p
    probs = torch.softmax(logits / temperature, -1)
    if top_k:
        probs[probs < probs.topk(top_k).values[-1]] = 0
    if top_p < 1:
        order = probs.argsort(descending=True)
        keep = (probs[order].cumsum(0) - probs[order]) < top_p
        probs[order[~keep]] = 0
    probs = probs / probs.sum()
    stderr = (probs * (1 - probs) / n).sqrt()
    assert bool(((freq - probs).abs() <= 4 * stderr + 1e-9).all()), (freq, probs)


def test_sharded_parts_join_to_the_one_process_table(model, tiny_tokenizer, tmp_path: Path) -> None:
    """Two shards (as two processes would write them) join to exactly what one process writes."""
    cfg = GenerationConfig(num_samples=2, max_new_tokens=4, batch_size=3)
    gen = _gen(model, tiny_tokenizer, num_samples=2, max_new_tokens=4, batch_size=3)
    prompts = [(i, [40 + i % 5] * (1 + i % 4)) for i in range(7)]
    kw = {"iteration": 1, "decode": str, "progress": False, "tag": "t"}
    one = tmp_path / "one.parquet"
    write_generate_parts(gen, prompts, one, cfg, **kw)
    merge_generate_parts(one, len(prompts), cfg, tag="t")
    two = tmp_path / "two.parquet"
    for index in (1, 0):
        write_generate_parts(gen, prompts, two, cfg, shard=Shard(index, 2), **kw)
    parts = sorted(p.name for p in (tmp_path / "two.parts").iterdir())
    assert parts == [f"part-t-{c:05d}.parquet" for c in range(3)]  # 7 prompts, 3 per batch
    merge_generate_parts(two, len(prompts), cfg, tag="t")
    assert read_table(two) == read_table(one)
    # a third shard layout (e.g. after a resume with 4 processes) gives the same table too
    four = tmp_path / "four.parquet"
    for index in range(4):
        write_generate_parts(gen, prompts, four, cfg, shard=Shard(index, 4), **kw)
    merge_generate_parts(four, len(prompts), cfg, tag="t")
    assert read_table(four) == read_table(one)


def test_parts_of_another_input_are_never_joined(model, tiny_tokenizer, tmp_path: Path) -> None:
    cfg = GenerationConfig(num_samples=1, max_new_tokens=4, batch_size=2)
    gen = _gen(model, tiny_tokenizer, num_samples=1, max_new_tokens=4, batch_size=2)
    prompts = [(i, [40 + i]) for i in range(4)]
    out = tmp_path / "syn.parquet"
    write_generate_parts(gen, prompts, out, cfg, iteration=0, decode=str, progress=False, tag="old")
    with pytest.raises(RuntimeError, match=r"part-new-00000\.parquet is missing"):
        merge_generate_parts(out, len(prompts), cfg, tag="new")


def _agree_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    state = SimpleNamespace(num_processes=2)
    try:
        for round_, fail_rank in enumerate((-1, 1)):  # nobody fails, then process 1 fails
            error = ValueError(f"bad row on {rank}") if rank == fail_rank else None
            try:
                agree(state, error, "generate of iteration 0")  # type: ignore[arg-type]
                results[(round_, rank)] = "ok"
            except RankFailedError as e:
                results[(round_, rank)] = f"peer: {e}"
            except ValueError as e:
                results[(round_, rank)] = f"own: {e}"
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agree_stops_every_process_with_the_failed_ones_message() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_agree_worker, args=(_free_port(), results), nprocs=2, start_method="fork")
        got = dict(results)
    assert got[(0, 0)] == got[(0, 1)] == "ok"
    assert got[(1, 1)] == "own: bad row on 1"
    assert got[(1, 0)] == "peer: generate of iteration 0 failed on process 1 of 2: ValueError: bad row on 1"


@pytest.mark.parametrize(
    ("env", "lora", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true"}, 0, "FSDP needs GPUs"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            8,
            "with DeepSpeed ZeRO-3",
        ),
    ],
)
def test_launch_settings_that_would_not_do_what_they_say_are_refused(
    env: dict[str, str], lora: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spaceft.distributed import check_launch

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # FSDP is refused on CPU only
    with pytest.raises(ValueError, match=message):
        check_launch(lora_rank=lora)
    if lora:  # ZeRO-2, or ZeRO-3 without LoRA, are fine
        check_launch(lora_rank=0)
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        check_launch(lora_rank=lora)


def test_a_deepspeed_config_file_is_read_for_its_zero_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`deepspeed_config_file` launches set no ACCELERATE_DEEPSPEED_ZERO_STAGE: the stage in the file is what
    DeepSpeed runs, so LoRA under a file's ZeRO-3 is refused as under the launcher's; "auto" defers to the
    launcher, as accelerate fills it; a file that is not JSON is named with its line."""
    from spaceft.distributed import check_launch, zero_settings

    ds = tmp_path / "ds.json"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match="with DeepSpeed ZeRO-3"):
        check_launch(lora_rank=8)
    launcher_says_2 = {**os.environ, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    assert zero_settings() == zero_settings(launcher_says_2)  # the file wins
    assert zero_settings().mixed and not zero_settings().offload
    auto = {"zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "cpu"}}}
    ds.write_text(json.dumps(auto))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_launch(lora_rank=8)
    assert zero_settings().stage == 2 and zero_settings().offload and not zero_settings().mixed
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert zero_settings().mixed  # the launcher's precision, where the file gives none
    ds.write_text(json.dumps({"bf16": {"enabled": False}, "fp16": {"enabled": False}}))
    assert not zero_settings().mixed
    # accelerate's rules for what the file leaves out (its DeepSpeedPlugin and set_mixed_precision)
    for bf16, precision, mixed in (
        ({"enabled": False}, "bf16", False),  # the file's word, whatever the launcher says
        ({}, "bf16", False),  # a section without `enabled`: DeepSpeed's default, off
        ({"enabled": "auto"}, "bf16", True),
        (None, "fp8", True),  # fp8 runs bf16 under DeepSpeed
        (None, "no", False),
    ):
        section = {"bf16": bf16} if bf16 is not None else {}
        ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, **section}))
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
        assert zero_settings().mixed is mixed, (bf16, precision)
    ds.write_text(json.dumps({"zero_optimization": {}}))  # a stage the file leaves out: DeepSpeed's 0
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    assert (zero_settings().stage, zero_settings().offload) == (0, False)
    check_launch(lora_rank=8)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    assert (zero_settings().stage, zero_settings().offload) == (3, True)  # without a file: the launcher's
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    assert zero_settings().stage == 2  # accelerate's default
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    ds.write_text('{\n  "zero_optimization": {"stage": 3},\n  "bf16": {"enabled": true,}\n}\n')
    named = rf"^{re.escape(str(ds))}:3: the DeepSpeed config file .* not valid JSON"
    with pytest.raises(ValueError, match=named):
        check_launch(lora_rank=8)
    ds.write_text("[]")
    with pytest.raises(ValueError, match=r"ds\.json: the DeepSpeed config file .* must hold an object"):
        zero_settings()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert zero_settings() is None  # the file is not read without DeepSpeed


def test_lora_under_fsdp_is_refused_on_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving would merge the adapter into sharded weights on the main process alone."""
    from spaceft.distributed import check_launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"model\.lora\.r > 0 with FSDP is not supported"):
        check_launch(lora_rank=8)
    check_launch(lora_rank=0)  # full fine-tuning under FSDP on GPUs is fine


def test_more_processes_than_gpus_on_a_node_is_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`torchrun --nproc_per_node 2` on a one-GPU machine: a clear refusal, not CUDA's invalid ordinal."""
    from spaceft.distributed import check_launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes were launched on this node but it has 1 visible GPU"):
        check_launch(lora_rank=0)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # CPU processes (gloo) need no GPU each
    check_launch(lora_rank=0)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_launch(lora_rank=0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_launch(lora_rank=0)



def test_a_non_finite_gradient_under_deepspeed_says_the_step_was_applied(tmp_path: Path) -> None:
    """DeepSpeed steps inside backward: the message must not claim the weights were spared."""
    from accelerate import Accelerator

    from spaceft.train import NonFiniteLossError, _stop_if

    acc = Accelerator()  # not cpu=True: under a GPU an earlier test has already set the device
    with pytest.raises(NonFiniteLossError, match="the weights were not updated"):
        _stop_if(True, acc, "gradient", 0, 2, tmp_path)
    with pytest.raises(NonFiniteLossError, match="this update was already applied") as e:
        _stop_if(True, acc, "gradient", 0, 2, tmp_path, stepped=True)
    assert "not updated" not in str(e.value)
    _stop_if(False, acc, "gradient", 0, 2, tmp_path, stepped=True)  # a finite gradient passes


class _FakeVLLM:
    """Stands in for the `vllm` package (not installed here): records what spaceft asks of it."""

    def __init__(self) -> None:
        self.llm_kwargs: dict = {}
        self.params: list = []
        self.torn_down = False
        self.calls: list = []
        self.freeze = False  # as vLLM 0.12+'s in-process core (only where a test says: it is process-wide)
        fake = self

        class EngineCore:
            """As vLLM's in-process core (0.12-0.30): it freezes the gc heap when built and refers to
            itself, so only its `shutdown()` (which unfreezes) lets `del` + `gc.collect()` free it."""

            def __init__(self) -> None:
                self.step_fn = self.step
                if fake.freeze:
                    gc.freeze()

            def step(self) -> None:
                pass

            def shutdown(self) -> None:
                fake.calls.append(("shutdown",))
                gc.unfreeze()

        class LLM:
            def __init__(self, **kwargs) -> None:
                fake.llm_kwargs = kwargs
                fake.core = weakref.ref(core := EngineCore())
                self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(engine_core=core,
                                                                              shutdown=core.shutdown))

            def generate(self, prompts, params, use_tqdm=False):
                fake.params = params
                out = SimpleNamespace(token_ids=[5, 9], finish_reason="stop")
                return [SimpleNamespace(outputs=[out] * p.n) for p in params]

            def sleep(self, level: int = 1) -> None:
                fake.calls.append(("sleep", level))

            def wake_up(self, tags=None) -> None:
                fake.calls.append(("wake_up", tags))

            def collective_rpc(self, method, args=(), kwargs=None):
                fake.calls.append((method, kwargs))

            def reset_prefix_cache(self) -> None:
                fake.calls.append(("reset_prefix_cache",))

        def sampling_params(**kwargs):
            return SimpleNamespace(**kwargs)

        def destroy_model_parallel() -> None:
            fake.torn_down = True

        self.modules = {
            "vllm": SimpleNamespace(LLM=LLM, SamplingParams=sampling_params),
            "vllm.distributed": SimpleNamespace(),
            "vllm.distributed.parallel_state": SimpleNamespace(destroy_model_parallel=destroy_model_parallel),
        }


def test_closing_a_vllm_engine_shuts_its_core_down_so_its_memory_is_freed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from spaceft.generate_vllm import VLLMGenerator

    fake = _FakeVLLM()
    fake.freeze = True
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    try:
        gen = VLLMGenerator("theta0", GenerationConfig(backend="vllm"), stop_ids=[9], dtype="bfloat16",
                            num_processes=2)  # fmt: skip
        assert fake.core() is not None
        gen.close()
        gc.collect()
        assert ("shutdown",) in fake.calls and fake.core() is None  # nothing left holding its tensors
    finally:
        gc.unfreeze()


def test_keep_alive_needs_a_vllm_whose_reload_reads_a_new_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM 0.10-0.15's `Worker.reload_weights(self)` takes no path (a keyword would raise, and without
    one it reloads the first model); from 0.16 the worker passes `weights_path` to its model runner."""
    import sys

    from spaceft.generate_vllm import vllm_dtype, vllm_keeps_engine

    def modules(worker_reload, runner_reload) -> dict:
        worker = SimpleNamespace(Worker=type("Worker", (), {"reload_weights": worker_reload}))
        runner = SimpleNamespace(GPUModelRunner=type("GPUModelRunner", (), {"reload_weights": runner_reload}))
        return {"vllm": SimpleNamespace(), "vllm.v1": SimpleNamespace(), "vllm.v1.worker": SimpleNamespace(),
                "vllm.v1.worker.gpu_worker": worker, "vllm.v1.worker.gpu_model_runner": runner}  # fmt: skip

    def old(self) -> None: ...
    def forwards(self, *args, **kwargs) -> None: ...
    def runner_new(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True) -> None: ...

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for worker_reload, runner_reload, keeps in ((old, old, False), (forwards, runner_new, True),
                                                (forwards, old, False)):  # fmt: skip
        for name, module in modules(worker_reload, runner_reload).items():
            monkeypatch.setitem(sys.modules, name, module)
        keep, why = vllm_keeps_engine()
        assert keep is keeps and (keep or "cannot take a new weights path" in why)
    assert vllm_dtype("float32", "bf16") == "bfloat16"  # trained under bf16 autocast: sample in bf16
    assert vllm_dtype("float32", "no") == "float32" and vllm_dtype("bfloat16", "no") == "bfloat16"


def test_vllm_engine_per_process_with_tensor_parallel_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a launcher: vLLM's torchrun-compatible executor, the configured tensor-parallel size, each
    prompt's own seed, and a teardown of the engine's groups only (not the launcher's)."""
    import sys

    from spaceft.generate_vllm import VLLMGenerator

    fake = _FakeVLLM()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    cfg = GenerationConfig(backend="vllm", num_samples=2, tensor_parallel_size=2)
    gen = VLLMGenerator("m", cfg, stop_ids=[9], dtype="bfloat16", num_processes=4)
    assert fake.llm_kwargs["distributed_executor_backend"] == "external_launcher"
    assert fake.llm_kwargs["tensor_parallel_size"] == 2 and fake.llm_kwargs["dtype"] == "bfloat16"
    comps = gen.generate([[1, 2], [3]], num_samples=2, seeds=[101, 202])
    assert [p.seed for p in fake.params] == [101, 202] and all(p.n == 2 for p in fake.params)
    assert comps[1][0].response_ids == (5, 9) and not comps[1][0].hit_cap
    gen.close()
    assert fake.torn_down
    one = VLLMGenerator("m", GenerationConfig(backend="vllm"), stop_ids=[9], dtype="float32")
    assert "distributed_executor_backend" not in fake.llm_kwargs  # one process: vLLM's own executor
    one.close()


@pytest.mark.parametrize("gpu", [True, False])
def test_a_kept_engine_sleeps_and_takes_the_next_opponent_in_place(
    monkeypatch: pytest.MonkeyPatch, gpu: bool
) -> None:
    """The order vLLM's RLHF pattern needs (no GPU here: a stand-in records the calls): sleep at level 2
    after sampling; to load the next opponent, wake the weights, reload them from its directory, wake
    the KV cache, and drop the prefix cache. On a CPU (no sleep mode) only the reload and the reset."""
    import sys

    from spaceft.generate_vllm import VLLMGenerator

    fake = _FakeVLLM()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    gen = VLLMGenerator("theta0", GenerationConfig(backend="vllm"), stop_ids=[9], dtype="bfloat16",
                        sleep_mode=True)  # fmt: skip
    assert fake.llm_kwargs.get("enable_sleep_mode", False) is gpu
    gen.sleep()
    gen.load("theta1")
    reload = ("reload_weights", {"weights_path": "theta1"})
    if gpu:
        assert fake.calls == [("sleep", 2), ("wake_up", ["weights"]), reload, ("wake_up", ["kv_cache"]),
                              ("reset_prefix_cache",)]  # fmt: skip
    else:
        assert fake.calls == [reload, ("reset_prefix_cache",)]
    assert gen.model_path == "theta1" and not gen.asleep
    fake.calls.clear()
    gen.load("theta1")  # awake with these weights already: nothing to reload
    assert fake.calls == [("reset_prefix_cache",)]
    gen.close()
    VLLMGenerator("theta0", GenerationConfig(backend="vllm"), stop_ids=[9], dtype="bfloat16").close()
    assert "enable_sleep_mode" not in fake.llm_kwargs  # an engine built per iteration never sleeps


@pytest.mark.slow
@pytest.mark.parametrize(("iterations", "fail_in_score"), [(3, False), (1, False), (3, True)])
def test_a_run_keeps_one_vllm_engine_while_generate_steps_remain(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, iterations: int,
    fail_in_score: bool,
) -> None:  # fmt: skip
    """The run's side of `generation.vllm_keep_alive` (a stand-in vLLM; `vllm_keeps_engine` says yes, as
    on a GPU): one engine for all generate steps, the next opponent loaded into it, sleeping between
    (not after the last), closed after the last generate step, or by the run when a stage fails."""
    import sys

    from spaceft import generate_vllm, stage_fns
    from spaceft.cli import main
    from spaceft.generate_vllm import VLLMGenerator

    from .conftest import tiny_overrides

    fake = _FakeVLLM()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(generate_vllm, "vllm_keeps_engine", lambda: (True, ""))
    events: list = []
    real = {m: getattr(VLLMGenerator, m) for m in ("__init__", "load", "sleep", "close")}

    def recorder(method: str):
        def record(self, *args, **kwargs):
            events.append((method, *[Path(a).parent.name if method == "load" else a for a in args[:1]]))
            return real[method](self, *args, **kwargs)

        return record

    for method in real:
        monkeypatch.setattr(VLLMGenerator, method, recorder(method))
    if fail_in_score:
        def broken(*args, **kwargs):
            raise RuntimeError("scoring failed")

        monkeypatch.setattr(stage_fns, "write_score_parts", broken)
    settings = {"generation.backend": "vllm", "generation.vllm_keep_alive": True,
                "selfplay.iterations": iterations, "eval.enabled": False}  # fmt: skip
    overrides = tiny_overrides(tmp_path, tiny_model_dir, **settings)
    assert main(["run", "tiny", *overrides]) == (2 if fail_in_score else 0)  # 2: the error, reported
    built = [e for e in events if e[0] == "__init__"]
    assert len(built) == 1  # one engine, whatever the number of iterations
    if fail_in_score:
        assert events == [("__init__", str(tiny_model_dir)), ("sleep",), ("close",)]
    elif iterations == 1:
        assert events == [("__init__", str(tiny_model_dir)), ("close",)]  # nothing to keep it for
    else:
        assert events == [("__init__", str(tiny_model_dir)), ("sleep",), ("load", "iter_0"), ("sleep",),
                          ("load", "iter_1"), ("close",)]  # fmt: skip
        reloads = [c for c in fake.calls if c[0] == "reload_weights"]
        assert [Path(c[1]["weights_path"]).parent.name for c in reloads] == ["iter_0", "iter_1"]


@pytest.mark.parametrize(
    ("rank", "world", "group", "shard", "leads"),
    [(0, 1, 1, Shard(0, 1), True), (3, 4, 1, Shard(3, 4), True), (3, 4, 2, Shard(1, 2), False),
     (2, 4, 2, Shard(1, 2), True), (5, 8, 4, Shard(1, 2), False)],
)  # fmt: skip
def test_tensor_parallel_groups_share_a_shard(
    rank: int, world: int, group: int, shard: Shard, leads: bool
) -> None:
    from spaceft.distributed import leads_group, shard_of

    state = SimpleNamespace(process_index=rank, num_processes=world)
    assert shard_of(state, group) == shard  # type: ignore[arg-type]
    assert leads_group(state, group) is leads  # type: ignore[arg-type]


def test_tensor_parallel_size_must_divide_the_processes() -> None:
    from spaceft.distributed import shard_of

    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the number of processes"):
        shard_of(SimpleNamespace(process_index=0, num_processes=4), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs generation\.backend=vllm"):
        GenerationConfig(tensor_parallel_size=2)


def test_the_hf_model_is_released_before_a_vllm_engine_starts(tmp_path: Path) -> None:
    from spaceft.configfile import config_from_dict
    from spaceft.rundir import Manifest
    from spaceft.selfplay import Step, load_generate
    from spaceft.workspace import Workspace

    cfg = config_from_dict({"data": {"train": "x.jsonl"}, "generation": {"backend": "vllm"}})
    manifest = Manifest(tmp_path / "manifest.json", {"iterations": {}, "start_model_hash": "h0"})
    ws = Workspace(cfg, manifest, "start", None, [], [])
    ws.models["start"] = torch.nn.Linear(2, 2)  # the opponent kept from the previous stage
    tag = load_generate(ws, Step("generate", 0))
    assert ws.models == {}
    cfg.generation.tensor_parallel_size = 2  # where the engine runs does not change what it samples
    assert load_generate(ws, Step("generate", 0)) == tag
    cfg.generation.seed = 1
    assert load_generate(ws, Step("generate", 0)) != tag


def test_zero3s_module_level_holds_on_a_trained_model_are_dropped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stand-in of DeepSpeed ZeRO-3's two module-level references (an unbounded lru_cache on a class
    method, wrapped by a decorator without functools.wraps, keyed by its arguments; the forward-stack
    list) to a model whose hooks reach the engine: after release, model and engine are collected.
    (Measured with DeepSpeed 0.19.8 on 2 CPU processes: live engines 1/2/3 after 3 iterations before,
    0/0/0 after.)"""
    import functools
    import sys
    import types

    from spaceft.train import release_zero3

    def nvtx(func):  # DeepSpeed's instrument_w_nvtx: a plain closure
        def wrapped_fn(*args, **kwargs):
            return func(*args, **kwargs)

        return wrapped_fn

    class Coordinator:
        @nvtx
        @functools.lru_cache(maxsize=None)  # noqa: B019, UP033 (DeepSpeed's own leak, under test)
        def params_to_release(self, submodule, step):
            return {id(p) for p in submodule.parameters()}

    class Engine:
        pass

    coordinator_mod = types.ModuleType("deepspeed.runtime.zero.partitioned_param_coordinator")
    coordinator_mod.PartitionedParameterCoordinator = Coordinator
    offload_mod = types.ModuleType("deepspeed.runtime.zero.parameter_offload")
    other = torch.nn.Linear(2, 2)  # another model's module in the stack stays
    offload_mod.FWD_MODULE_STACK = [other]
    monkeypatch.setitem(sys.modules, coordinator_mod.__name__, coordinator_mod)
    monkeypatch.setitem(sys.modules, offload_mod.__name__, offload_mod)

    def trained() -> tuple[torch.nn.Module, weakref.ref]:
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        engine = Engine()
        engine.module = model
        for sub in model.modules():  # ZeRO-3 hooks every module, and its hooks close over the engine
            sub.register_forward_hook(lambda *a: engine)
        for sub in model:
            Coordinator().params_to_release(sub, 0)
        offload_mod.FWD_MODULE_STACK.append(model)
        return model, weakref.ref(engine)

    model, engine = trained()
    model = None
    gc.collect()
    assert engine() is not None  # held at module level, as DeepSpeed holds it
    model, engine = trained()
    assert release_zero3(model) == {"caches": 1, "stack": 1}
    model = None
    gc.collect()
    assert engine() is None
    stack = offload_mod.FWD_MODULE_STACK
    assert stack[0] is other and len(stack) == 2  # the other model's, and the first model's (not released)
    assert release_zero3(torch.nn.Linear(1, 1))["caches"] == 1  # the cache is found again, now empty
    monkeypatch.delitem(sys.modules, coordinator_mod.__name__)
    monkeypatch.delitem(sys.modules, offload_mod.__name__)
    assert release_zero3(torch.nn.Linear(1, 1)) == {"caches": 0, "stack": 0}  # no DeepSpeed: nothing
    partitioned = torch.nn.Linear(1, 1)
    partitioned.weight.ds_id = 0  # ZeRO-3 trained it, and the cache is not where it was: said
    with caplog.at_level("WARNING", logger="spaceft.train"):
        release_zero3(partitioned)
    assert "may keep each iteration's engine in memory" in caplog.text


def test_a_gathered_state_dict_drops_the_tied_copy_only_when_it_is_one(model) -> None:
    from spaceft.train import drop_tied_copy

    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # shards gathered: no shared storage
    assert model.config.tie_word_embeddings and "lm_head.weight" in gathered
    assert drop_tied_copy(model, dict(gathered)) == "lm_head.weight"
    gathered["lm_head.weight"] += 1  # not a copy: kept
    assert drop_tied_copy(model, gathered) is None and "lm_head.weight" in gathered
