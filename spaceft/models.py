"""Loading causal LMs and tokenizers, and the tiny offline model used by tests and smoke runs.

A model spec is an HF hub id, a local directory, 'default' (the embedded SmolLM2-135M-Instruct,
see `default_model.py`) or 'tiny-random' (a 2-layer Llama with a byte-level tokenizer built on the
spot, for smoke runs without any download).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from spaceft.config import ModelConfig

log = logging.getLogger(__name__)

TINY_ALIASES = ("tiny-random", "tiny")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) with ChatML special tokens.

    Any text round-trips, so tests need no vocabulary file and no download.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Write a tiny random Llama (and its tokenizer) loadable by `from_pretrained(out_dir)`."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    return out


def resolve_model_path(spec: str, cache_dir: Path | None = None) -> str:
    """Map a model spec to something `from_pretrained` accepts (a hub id or a directory)."""
    from spaceft import default_model

    if spec in default_model.DEFAULT_MODEL_ALIASES:
        return str(default_model.ensure_default_model())
    if spec in TINY_ALIASES:
        base = cache_dir or default_model.default_cache_dir()
        return str(build_tiny_model(Path(base) / "tiny-random"))
    return spec


def load_tokenizer(
    path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding is always masked out; reusing eos keeps the vocabulary (and embeddings) unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, cfg: ModelConfig) -> PreTrainedModel:
    """Load a causal LM in the configured dtype, with every dropout switched off.

    The seed's objective compares the policy with a frozen copy of itself: dropout noise would make
    rewards non-zero at step 0 and the training-mode log-probs differ from the scores. Attention
    modules copy ``config.attention_dropout`` into a float attribute when they are built, so the config
    is cleared *before* the model is built, and the built modules are cleared too (`disable_dropout`).
    """
    from transformers import AutoConfig

    kwargs: dict = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    _zero_dropout_fields(config)
    with whole_weights():
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    disable_dropout(model)
    return model


@contextmanager
def whole_weights() -> Iterator[None]:
    """Load whole weights, even after training under DeepSpeed ZeRO-3 in this process.

    An Accelerator under DeepSpeed sets transformers' global DeepSpeed config, and it stays set for the
    process's lifetime. Under ZeRO-3 every later `from_pretrained` would then partition the weights
    (`zero.Init`) with no engine to gather them: the next score or eval forward would see empty tensors.
    Every load here is whole, as the first iteration's is (no Accelerator exists yet when it loads);
    DeepSpeed partitions the training model itself when it is prepared.

    The process's first Accelerator is what sets that config (its DeepSpeed plugin's `select()`), and
    lm-eval builds one of its own when it loads: were that the first, it would set the config inside
    this block, after it was cleared, and its `from_pretrained` would fail ("DeepSpeed Zero-3 is not
    compatible with passing a device_map"). So under DeepSpeed the accelerator state is made first.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    from spaceft.distributed import launched_with_deepspeed

    if launched_with_deepspeed():
        from accelerate import Accelerator
        from accelerate.state import is_initialized

        if not is_initialized():
            Accelerator()  # reads the launcher's DeepSpeed settings, as training's and lm-eval's do
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop")


def _zero_dropout_fields(obj: object) -> list[str]:
    """Set every float field named like a dropout rate (``attention_dropout``, ``resid_pdrop``, ...) of
    a config or module to 0; returns the names that were non-zero. Nested configs (``text_config``)
    are handled."""
    changed = []
    for name, value in list(vars(obj).items()):
        if _is_dropout_name(name) and isinstance(value, float) and not isinstance(value, bool):
            if value != 0.0:
                changed.append(name)
            setattr(obj, name, 0.0)
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            changed += [f"{name}.{n}" for n in _zero_dropout_fields(value)]
    return changed


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: `nn.Dropout` modules, float rates modules copied from the config, and
    the config itself (so modules built later, e.g. by peft, start at 0 too)."""
    config = getattr(model, "config", None)
    if config is not None:
        _zero_dropout_fields(config)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif not isinstance(module, PreTrainedModel):
            _zero_dropout_fields(module)


def apply_lora(model: PreTrainedModel, cfg: ModelConfig) -> torch.nn.Module:
    """Wrap `model` with a fresh LoRA adapter when `cfg.lora.r > 0` (peft), else return it unchanged."""
    if cfg.lora.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def mergeable(model: torch.nn.Module) -> PreTrainedModel:
    """The plain HF model to save: LoRA adapters merged in, so the next opponent is a full model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model  # type: ignore[return-value]
