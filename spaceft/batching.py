"""`generation.batch_size=auto` and `eval.batch_size=auto`: prompts per decoding batch, from memory.

A fixed 16 leaves most of a GPU idle and, on these 2 CPU cores, ran the generation stage at 0.61x the
tokens/s of batch 64 (a profile of 2026-11-28); a fixed large number runs a 7B model on a small GPU out of
memory. The rule:

    per row     = KV cache  2 · layers · kv_heads · head_dim · (prompt + new tokens) · bytes
                + prefill   prompt tokens · (hidden · 4 + intermediate · 3) · bytes
                + sampling  6 · vocab · 4 bytes (float32 scores, probabilities, noise, output)
    budget      = (device memory · 0.8 − weights) / 2
    batch       = the largest power of two ≤ budget / (per row · K) and ≤ cap / K, at least 1
                  (K: samples per prompt in generation, 1 in evaluation; cap: 256 rows on a GPU, 64 on
                  a CPU, where tokens/s stops growing: 421 tok/s at 64 rows against 224 at 16, one
                  decoding step of SmolLM2-135M on 2 cores).

Device memory is the *total* (GPU: the device's; CPU: the machine's RAM), not what is free at the
moment: the batch shape changes the logits in their last bits, so a run must cut its batches the same
way every time it is resumed. The value is chosen once per run directory, on the main process, and
recorded in the manifest (`batch_sizes`); a resumed run reads it back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

CPU_CAP = 64
GPU_CAP = 256
UNRESOLVED = 16
"""What `auto` means where no run resolved it (a library call with a config built by hand)."""
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    parameters: int

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        """Read a transformers config (text part of a multimodal one)."""
        config = getattr(config, "text_config", None) or config
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        layers = int(config.num_hidden_layers)
        intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
        vocab = int(config.vocab_size)
        # a mixture of experts holds every expert's MLP (Mixtral: 8 of 14336), of its own width if given
        experts = int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1)
        width = int(getattr(config, "moe_intermediate_size", None) or intermediate)
        mlp = 3 * hidden * (intermediate if experts == 1 else experts * width)
        # embeddings, attention and gated MLP: a close count for Llama-family models without building one
        per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + mlp
        embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        params = layers * per_layer + embeddings
        return cls(layers, kv_heads, head_dim, hidden, intermediate, vocab, params)


def concrete(batch_size: int | str) -> int:
    """A batch size as a number: a run has resolved `auto` already; elsewhere it is `UNRESOLVED`."""
    return UNRESOLVED if batch_size == "auto" else int(batch_size)


def per_prompt_bytes(shape: ModelShape, prompt_tokens: int, new_tokens: int, dtype: str) -> int:
    b = BYTES[dtype]
    kv = kv_cache_bytes(shape, prompt_tokens + new_tokens, dtype)
    prefill = prompt_tokens * (4 * shape.hidden + 3 * shape.intermediate) * b
    sampling = 6 * shape.vocab * 4
    return kv + prefill + sampling


def kv_cache_bytes(shape: ModelShape, tokens: int, dtype: str) -> int:
    """Bytes of keys and values for `tokens` cached tokens (every layer)."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * BYTES[dtype]


def device_memory(device: torch.device) -> int:
    """Total memory of the device (bytes): the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def auto_batch_size(
    shape: ModelShape, *, prompt_tokens: int, new_tokens: int, dtype: str, device: torch.device,
    rows_per_prompt: int = 1,
) -> int:  # fmt: skip
    """Prompts per decoding batch (see the module docstring); each prompt decodes `rows_per_prompt`
    sequences (generation's K samples), each with its own KV cache."""
    total = device_memory(device)
    budget = (0.8 * total - shape.parameters * BYTES[dtype]) / 2
    cap = (GPU_CAP if device.type == "cuda" else CPU_CAP) // rows_per_prompt
    per = per_prompt_bytes(shape, prompt_tokens, new_tokens, dtype) * rows_per_prompt
    fits = int(budget // per) if budget > 0 else 0
    batch = 1
    while batch * 2 <= min(fits, cap):
        batch *= 2
    if fits < 1:
        log.warning("the model's weights leave no room for decoding by the memory rule (%.1f GB on %s); "
                    "decoding one prompt at a time", total / 1e9, device.type)  # fmt: skip
    return batch
