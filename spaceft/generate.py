"""Synthetic responses from the opponent: y' ~ p_θt(·|x), K per prompt.

Two backends behind one `Generator` protocol (load, generate, sleep, close; spaceft.sampler), built by
one factory, `open_generator`: `HFGenerator` here (transformers `generate`, batched, left-padded,
prompts sorted by length) and `VLLMGenerator` (spaceft.generate_vllm, an optional extra, which sizes
its own context and KV cache). Prompts are the same
chat-template token ids that training uses, so generation and training never disagree on the template
(SPIN's released code generated with one template and trained with another).

Determinism: every prompt has its own seed, derived from (seed, iteration, prompt index), and sample j
of it draws its random numbers from its own stream keyed by (that seed, j). The HF backend samples by
inversion (the first token whose cumulative probability exceeds a uniform U), which picks token v with
probability p_v exactly as multinomial sampling does; U is counter-based, a hash of (the row's key, the
decoding step), computed for all rows at once each step. A sample thus does not depend on which other
prompts share its batch, on the batch size, on the number of processes or on a resume. (Its logits can
still differ in the last float bits between batch shapes; the stage therefore also cuts its batches the
same way whatever the number of processes, so that samples are bit-identical.) The vLLM backend gives
each prompt its seed too. Every response keeps its token ids (ending in the end-of-turn token unless it
hit `max_new_tokens`), so scoring and training use exactly the sampled tokens, never a re-tokenisation
of decoded text.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as TransformersGenerationConfig
from transformers import LogitsProcessorList

from spaceft.batching import concrete
from spaceft.config import GenerationConfig, RunConfig
from spaceft.generate_vllm import open_vllm
from spaceft.rundir import ONE_PROCESS, Shard, file_hash, merge_parts, pending_parts, write_parts
from spaceft.sampler import Completion, Generator, Sampler, cut_at_stop
from spaceft.token_logps import autocast

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


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


def _wrap(x: int) -> int:
    """A 64-bit constant as the int64 whose bits it is (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN = _wrap(0x9E3779B97F4A7C15)  # splitmix64's increment
MIX = (_wrap(0xBF58476D1CE4E5B9), _wrap(0x94D049BB133111EB))  # splitmix64's finaliser multipliers


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's `>>` is arithmetic: it copies the sign bit)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors. Products wrap around modulo 2^64 (two's complement)
    on CPU and CUDA alike, so the bits are the same on either (tests/test_row_sampler.py checks both)."""
    z = (z ^ _shr(z, 30)) * MIX[0]
    z = (z ^ _shr(z, 27)) * MIX[1]
    return z ^ _shr(z, 31)


def row_uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """U[0, 1) float64 [R] for decoding step `step` of rows with int64 stream keys [R].

    Counter-based: row r's number is output step + 1 of the splitmix64 stream seeded with keys[r], a
    function of (key, step) alone, for all rows in a few vectorised operations. Its top 52 bits give
    U = k / 2^52, exact in float64 and below 1, so U · total < total for any float64 total."""
    bits = mix64(keys + _wrap((step + 1) * GOLDEN % (1 << 64)))  # [R]
    return _shr(bits, 12).double() * 2.0**-52


class RowSampler:
    """A logits processor that samples each row from its own random stream (run under greedy search).

    scores [R, V] -> [R, V] with 0 at the sampled token and -inf elsewhere, so generate's argmax
    returns it. Temperature, top-k and top-p shape the distribution first, as in HF sampling. A step
    samples every row at once by inversion: the first token whose cumulative probability exceeds the
    row's uniform U (`row_uniforms`, keyed by the row's seed and the step), which is token v with
    probability p_v. The step is the number of tokens generated so far: input_ids grows by one column
    per step from the batch's padded prompt width `prompt_width`. One uniform per row and a cumulative
    sum cost about a tenth of drawing V exponentials per row for the exponential race (argmax p_v / E_v),
    which samples the same distribution (benchmarks/generate_backends.py --samplers).
    """

    def __init__(
        self, seeds: Sequence[int], cfg: GenerationConfig, device: torch.device, *, prompt_width: int
    ) -> None:
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        self.keys = mix64(torch.tensor(list(seeds), dtype=torch.int64, device=device))  # [R]
        self.prompt_width = prompt_width
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
        # float64: a sum over V float32 probabilities would round by more than the smallest of them
        cdf = torch.softmax(scores, dim=-1).double().cumsum(-1)  # [R, V], non-decreasing
        step = input_ids.shape[1] - self.prompt_width  # tokens generated so far
        u = row_uniforms(self.keys.to(cdf.device), step)  # [R]
        # The first v with cdf_v > U · total: U · total < total = cdf_{V-1}, so v exists, and a token of
        # probability 0 never is the first (its cdf equals its predecessor's).
        choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # [R, 1]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice, 0.0)


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
            sampler = RowSampler(row_seeds, self.cfg, self.device, prompt_width=width)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
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
    return open_vllm(model_path, cfg, stop_ids=stop_ids, num_processes=num_processes,
                     longest_prompt=longest_prompt, prompts=prompts, keep=keep)  # fmt: skip


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
