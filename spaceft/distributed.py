"""Several processes (`torchrun` / `accelerate launch`): the process group, shards and agreed failures.

Every stage runs on every process. Generation, scoring and evaluation split their work units (parts of
a table, see `rundir.Shard`) across processes and the main process joins the parts; training is data
parallel through Accelerate. Two rules keep a multi-process run from hanging:

* the process group is created with the timeout `selfplay.distributed_timeout_s`, so a collective that
  some process never reaches ends with an error instead of waiting forever (the defaults are 10 min
  with NCCL and 30 min with gloo);
* work that is not itself collective (a shard of a stage) ends in `agree`: every process reports
  whether its share succeeded, and if one failed, every process raises, the others with the failed
  process's message. A failure inside the training loop ends the failing process, and the launcher
  (torchrun, which `accelerate launch` uses) then stops the others; a non-finite loss is agreed on
  inside the loop (train.py) so that every process stops with the same message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState

from spaceft.rundir import Shard

log = logging.getLogger(__name__)


class RankFailedError(RuntimeError):
    """Another process failed; this one stops with that process's message."""


def _accelerate_use_cpu() -> bool:
    """Whether the launcher asked for CPU processes (accelerate's ACCELERATE_USE_CPU)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def launched_with_deepspeed(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the launcher asked for DeepSpeed (accelerate's ACCELERATE_USE_DEEPSPEED)."""
    return env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


@dataclass(frozen=True)
class ZeroSettings:
    """A DeepSpeed launch's ZeRO settings, as accelerate resolves them."""

    stage: int | None
    """0–3; None for a value DeepSpeed would not take."""
    offload: bool
    """Optimizer state or weights offloaded to the CPU or NVMe."""
    mixed: bool
    """DeepSpeed's bf16 or fp16 engine (16-bit weights with float32 masters)."""


def zero_settings(env: Mapping[str, str] = os.environ) -> ZeroSettings | None:
    """The ZeRO settings of a DeepSpeed launch (None without DeepSpeed), resolved as accelerate (1.15)
    and DeepSpeed resolve them. Without a DeepSpeed config file: the launcher's variables (stage 2 and no
    offload by default). With one (`deepspeed_config_file`, ACCELERATE_DEEPSPEED_CONFIG_FILE): the file's
    values; a value "auto" is filled from the launcher's variables, and a key the file leaves out takes
    DeepSpeed's default (stage 0, no offload). bf16/fp16: a section the file leaves out, or an "auto"
    `enabled`, follows the launcher's mixed precision (fp8 runs bf16); a section without `enabled` is
    off. A file that is not JSON is refused here, naming its line (accelerate's own error names neither)."""
    if not launched_with_deepspeed(env):
        return None
    launcher = {
        "stage": env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"),
        "offload_optimizer": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
        "offload_param": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
    }
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    ds: dict[str, Any] = {}
    file = path != "none" and os.path.isfile(path)  # (accelerate also takes a base64 string: not read here)
    if file:
        try:
            with open(path, encoding="utf-8") as f:
                ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{e.lineno}: the DeepSpeed config file (deepspeed_config_file) is not valid JSON: "
                f"{e.msg}"
            ) from None
        if not isinstance(ds, dict):
            raise ValueError(f"{path}: the DeepSpeed config file (deepspeed_config_file) must hold an object")
    zero = ds.get("zero_optimization") or {}
    given = {
        "stage": zero.get("stage", 0),
        "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none"),
        "offload_param": (zero.get("offload_param") or {}).get("device", "none"),
    }
    value = {k: launcher[k] if not file or given[k] == "auto" else given[k] for k in launcher}
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")

    def enabled(dtype: str) -> bool:
        section = ds.get(dtype)
        on = section.get("enabled", False) if isinstance(section, dict) else "auto"
        if on == "auto":
            return precision == dtype or (dtype == "bf16" and precision == "fp8")
        return str(on).lower() == "true"

    stage = int(value["stage"]) if str(value["stage"]) in ("0", "1", "2", "3") else None
    offload = any(str(value[k]).lower() not in ("none", "") for k in ("offload_optimizer", "offload_param"))
    return ZeroSettings(stage, offload, enabled("bf16") or enabled("fp16"))


def fsdp_shards(env: Mapping[str, str] = os.environ) -> int | None:
    """Over how many processes an FSDP launch splits each parameter, its gradient and optimizer state at
    rest (None without FSDP): all of them for full and gradient/optimizer sharding, the processes of one
    node for FSDP1's hybrid strategies, one for NO_SHARD; FSDP2 shards over all processes but the
    replicas of a hybrid (`parallelism_config_dp_replicate_size`) mesh."""
    if env.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None
    world = max(1, int(env.get("WORLD_SIZE", "1")))
    if env.get("FSDP_VERSION", "1") == "2":
        replicas = env.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1")
        use = env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true"
        return max(1, world // int(replicas)) if use and replicas.isdigit() and int(replicas) > 0 else world
    strategy = env.get("FSDP_SHARDING_STRATEGY") or "None"
    if strategy == "None":  # accelerate's FSDP1 fallback
        strategy = env.get("FSDP_RESHARD_AFTER_FORWARD") or "FULL_SHARD"
    names = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
    name = names[int(strategy) - 1] if strategy.isdigit() and 0 < int(strategy) <= 5 else strategy.upper()
    if name == "NO_SHARD":
        return 1
    if name.startswith("HYBRID"):
        return max(1, min(world, int(env.get("LOCAL_WORLD_SIZE", str(world)))))
    return world


def visible_gpus() -> int:
    """The GPUs this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def init_processes(timeout_s: int) -> PartialState:
    """The process group (created on first use, with `timeout_s` for every collective)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Accelerate joins CPU processes only when told it runs on CPU (otherwise each would run alone)
    cpu = _accelerate_use_cpu() or (launched > 1 and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))
    if state.num_processes < launched:  # (mpirun sets no WORLD_SIZE: then there is nothing to compare)
        raise RuntimeError(
            f"the launcher started {launched} processes but {state.num_processes} joined the process group"
        )
    if state.num_processes > 1:
        log.info("process %d of %d (%s)", state.process_index, state.num_processes, state.device)
    return state


def check_launch(*, lora_rank: int) -> None:
    """Refuse, before any work, launch settings that would not do what they say.

    * FSDP without GPUs: accelerate (1.15) applies FSDP only to GPU-type process groups; on CPU the
      processes would silently train with plain DDP.
    * LoRA under DeepSpeed ZeRO-3 or FSDP: the adapter would be merged into partitioned base weights on
      save, on the main process alone, so the saved model would be wrong (or the save would hang).
    * More processes on a node than it has visible GPUs: each process takes the GPU of its local rank, so
      the extra ones would die in CUDA's "invalid device ordinal" (or NCCL's duplicate-GPU error).
    """
    flag = os.environ.get
    local = int(flag("LOCAL_WORLD_SIZE", "1"))
    gpus = visible_gpus()
    if local > 1 and not _accelerate_use_cpu() and gpus and local > gpus:
        raise ValueError(
            f"{local} processes were launched on this node but it has {gpus} visible "
            f"GPU(s) (CUDA_VISIBLE_DEVICES={flag('CUDA_VISIBLE_DEVICES', 'unset')}): each process needs its "
            "own GPU; launch with --nproc_per_node equal to the GPUs (or --num_processes under accelerate)"
        )
    if flag("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available():
        raise ValueError(
            "FSDP needs GPUs: accelerate applies FSDP only to GPU process groups, and on CPU these processes "
            "would silently run plain DDP; launch on GPUs, or use spaceft/recipes/accelerate/multi_cpu.yaml"
        )
    if lora_rank and flag("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ValueError(
            "model.lora.r > 0 with FSDP is not supported: saving merges the adapter on the main process "
            "alone, into sharded weights, so the saved model would be wrong (FSDP1) or the other processes "
            "would wait on it forever (FSDP2). Use DDP for LoRA (the frozen base is not trained, so sharding "
            "saves little), DeepSpeed ZeRO-2, or model.lora.r=0"
        )
    zero = zero_settings()
    if lora_rank and zero is not None:
        if zero.stage == 3:
            raise ValueError(
                "model.lora.r > 0 with DeepSpeed ZeRO-3 is not supported (the adapter cannot be merged into "
                "partitioned weights on save): use ZeRO-2 (zero_stage: 2) or DDP for LoRA, or model.lora.r=0"
            )


def shard_of(state: PartialState, group_size: int = 1) -> Shard:
    """The shard of a stage's work units that this process works on.

    With `group_size` > 1 (vLLM tensor parallelism) each `group_size` consecutive processes form one
    group that works on one shard together; `leads_group` says which of them writes its parts.
    """
    if state.num_processes % group_size:
        raise ValueError(
            f"generation.tensor_parallel_size={group_size} must divide the number of processes "
            f"({state.num_processes})"
        )
    return Shard(state.process_index // group_size, max(state.num_processes // group_size, 1))


def leads_group(state: PartialState, group_size: int = 1) -> bool:
    return state.process_index % group_size == 0


def attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, BaseException | None]:
    """fn(*args) and no error, or no result and the error (for `agree` to re-raise on this process)."""
    try:
        return fn(*args), None
    except Exception as e:
        return None, e


def patient_group(state: PartialState, timeout_s: float) -> Any:
    """A gloo group of every process whose collectives wait up to `timeout_s` (None with one process).

    For a wait known to outlast the process group's timeout: the other processes waiting while the main
    process downloads a model. `agree` and `broadcast` take it as `group`; the default group's timeout
    (`selfplay.distributed_timeout_s`) stays short for every collective that should be quick. Gloo,
    whatever the default backend: it waits on the CPU and needs no GPU. Every process must create it."""
    if state.num_processes == 1 or not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def agree(state: PartialState, error: BaseException | None, what: str, group: Any = None) -> None:
    """Barrier at which every process learns whether any failed; then all raise, or none does.

    The failed process re-raises its own exception; the others raise `RankFailedError` naming it.
    `group`: a `patient_group` to wait longer than the process group's timeout.
    """
    if state.num_processes == 1 or not dist.is_initialized():
        if error is not None:
            raise error
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[str | None] = [None] * state.num_processes
    dist.all_gather_object(gathered, message, group=group)
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, msg in enumerate(gathered) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise RankFailedError(f"{what} failed on process {rank} of {state.num_processes}: {msg}")


def broadcast(state: PartialState, obj: Any, group: Any = None) -> Any:
    """The main process's `obj` on every process (a decision all must share, such as a cache hit)."""
    if state.num_processes == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
