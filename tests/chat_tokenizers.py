"""Offline stand-ins for the tokenizers and chat templates of the model families people fine-tune.

Each builder makes a small tokenizer with the `tokenizers` library — no download — that reproduces the
behaviour that matters for tokenizing conversations: how spaces and word starts are encoded, which
special tokens exist, whether encoding adds a BOS, and the family's chat template (written here after
the public template's structure, not copied):

* `chatml`   byte-level BPE (SmolLM2 / Qwen style), ``<|im_start|>role\\n…<|im_end|>\\n``, no BOS;
* `zephyr`   SentencePiece-style BPE (Metaspace, ``▁`` word starts, byte fallback), BOS added by encoding,
             ``<|user|>\\n…</s>`` turns and a generation prompt ``<|assistant|>`` without a newline;
* `llama2`   the legacy Llama tokenizer (``▁`` prepended to every text segment, also after special
             tokens), ``<s>[INST] … [/INST] answer </s>``, the template rendering ``bos_token`` itself;
* `llama3`   byte-level BPE with ``<|start_header_id|>role<|end_header_id|>\\n\\n…<|eot_id|>`` headers,
             BOS ``<|begin_of_text|>`` added by encoding *and* rendered by the template;
* `mistral`  the legacy Llama tokenizer with Mistral-Instruct v0.2's template,
             ``<s>[INST] … [/INST]answer</s>``: the answer glued to ``[/INST]`` (``The``, not the ``▁The``
             the model writes), no system role;
* `gemma`    SentencePiece-style BPE without a dummy prefix, ``<start_of_turn>user\\n…<end_of_turn>\\n``,
             ``model`` as the assistant role, no system role (the template raises on one).
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = (
    "Hello world what is the answer to question please explain it in one sentence a an of and "
    "The answer is sure here you are thanks system user assistant model INST You helpful be "
    "café naïve über Grüße"
).split()

_BYTES = [f"<0x{i:02X}>" for i in range(256)]
_ASCII = [chr(c) for c in range(33, 127)]


def _merges_for(pieces: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary additions and left-to-right BPE merges that build each piece from its characters."""
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for piece in pieces:
        for i in range(2, len(piece) + 1):
            left, right, whole = piece[: i - 1], piece[i - 1], piece[:i]
            if whole not in vocab:
                vocab[whole] = 0
                merges.append((left, right))
    return vocab, merges


def _sentencepiece_bpe(specials: list[str], *, words_with_prefix: bool) -> Tokenizer:
    """BPE over characters with byte fallback (any text encodes) and merges for `WORDS`."""
    base = [*specials, *_BYTES, "▁", *_ASCII, *{ch for w in WORDS for ch in w if ord(ch) > 126}]
    pieces = [("▁" + w) if words_with_prefix else w for w in WORDS] + [w for w in WORDS]
    extra, merges = _merges_for(pieces)
    vocab: dict[str, int] = {}
    for token in [*base, *extra]:
        vocab.setdefault(token, len(vocab))
    return Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=None))


def _byte_level_bpe(specials: list[str]) -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = ["Ġ" + w for w in WORDS if w.isascii()] + [w for w in WORDS if w.isascii()]
    extra, merges = _merges_for(pieces)
    vocab: dict[str, int] = {}
    for token in [*specials, *alphabet, *extra]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _fast(tok: Tokenizer, template: str, **special: str) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = template
    return fast


def _add_bos(tok: Tokenizer, bos: str) -> None:
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ZEPHYR_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
    "'\\n<</SYS>>\\n\\n' %}{% set turns = messages[1:] %}{% else %}{% set sys = '' %}"
    "{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Mistral-Instruct v0.1/v0.2's hub template: no system role, and the answer follows [/INST] with no space,
# although the model was trained on "[/INST]" then the answer tokenized on its own ("▁The ...").
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim }}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def chatml() -> PreTrainedTokenizerFast:
    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    tok = _byte_level_bpe(specials)
    fast = _fast(tok, CHATML_TEMPLATE, eos_token="<|im_end|>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return fast


def zephyr() -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = _sentencepiece_bpe(specials, words_with_prefix=True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement="▁", prepend_scheme="first"),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    _add_bos(tok, "<s>")
    fast = _fast(tok, ZEPHYR_TEMPLATE, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    return fast


def llama2() -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>"]
    tok = _sentencepiece_bpe(specials, words_with_prefix=True)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    _add_bos(tok, "<s>")
    return _fast(tok, LLAMA2_TEMPLATE, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def mistral() -> PreTrainedTokenizerFast:
    """Llama-2's legacy SentencePiece tokenizer with Mistral-Instruct v0.2's template."""
    fast = llama2()
    fast.chat_template = MISTRAL_TEMPLATE
    return fast


def llama3() -> PreTrainedTokenizerFast:
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = _byte_level_bpe(specials)
    _add_bos(tok, "<|begin_of_text|>")
    fast = _fast(tok, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.add_special_tokens({"additional_special_tokens": specials[2:]})
    return fast


def gemma() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = _sentencepiece_bpe(specials, words_with_prefix=True)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    _add_bos(tok, "<bos>")
    fast = _fast(
        tok, GEMMA_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return fast


# Qwen3's structure: the last assistant turn of a conversation is rendered after an empty think block;
# the generation prompt ends at "assistant\n", and gets that empty block only when enable_thinking is false.
QWEN3_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}"
)
# Qwen2/3's pre-tokenizer pattern: a run of newlines is one piece ("\n\n" then "The", never "\n" "\nThe")
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def qwen3() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen's pre-tokenizer and a ``ĊĊ`` token, ``<think>``/``</think>`` as added
    (not special) tokens, as Qwen3 ships them, and the thinking template."""
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = ["Ġ" + w for w in WORDS if w.isascii()] + [w for w in WORDS if w.isascii()] + ["ĊĊ"]
    extra, merges = _merges_for(pieces)
    vocab: dict[str, int] = {}
    for token in [*specials, *alphabet, *extra]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    fast = _fast(tok, QWEN3_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.add_tokens(["<think>", "</think>"])
    return fast


BUILDERS: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "chatml": chatml,
    "zephyr": zephyr,
    "llama2": llama2,
    "llama3": llama3,
    "mistral": mistral,
    "gemma": gemma,
}
