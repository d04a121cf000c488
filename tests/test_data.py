"""Tests for spaceft.data: every format from every source and every bad input (tokenization: test_chat.py).

All offline: files are written to tmp_path and the tokenizer is a byte-level BPE with no merges, built
on the spot, with a ChatML chat template like SmolLM2's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spaceft import data
from spaceft.configfile import load_config
from spaceft.data import DataError, Example, load_examples

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tokenizer(special: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<pad>"),
                   eos: str = "<|im_end|>", chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE without merges (one id per byte) plus the given special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(special))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


# The canonical content, and the same content in each row format.
PAIRS: list[tuple[tuple[dict[str, str], ...], str, str | None]] = [
    (({"role": "user", "content": "What is 2+3?"},), "2+3 = 5.", "5"),
    (({"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say hi in French."}),
     "Salut, ça va ?", None),
    (({"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
      {"role": "user", "content": "Another?"}), "Green.", "green"),
]


def rows_for(fmt: str) -> list[dict[str, Any]]:
    rows = []
    for prompt, response, answer in PAIRS:
        if fmt == "messages":
            row: dict[str, Any] = {"messages": [*prompt, {"role": "assistant", "content": response}]}
        elif fmt == "conversational_prompt_completion":
            row = {"prompt": list(prompt), "completion": [{"role": "assistant", "content": response}]}
        elif fmt == "prompt_completion":  # the string form holds one user turn, so flatten the prompt
            row = {"prompt": prompt[-1]["content"], "completion": response}
        else:
            row = {"prompt": prompt[-1]["content"], "response": response}
        row["answer"] = answer
        rows.append(row)
    return rows


def expected_for(fmt: str) -> list[tuple[tuple[dict[str, str], ...], str, str | None]]:
    if fmt in ("prompt_completion", "prompt_response"):
        return [(({"role": "user", "content": p[-1]["content"]},), r, a) for p, r, a in PAIRS]
    return PAIRS


def write_source(tmp_path: Path, kind: str, rows: list[dict[str, Any]]) -> str:
    if kind == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif kind == "json_list":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    elif kind == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "saved_dataset":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:  # a DatasetDict; the test asks for its "train" split
        path = tmp_path / "saved_dict"
        splits = {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
        datasets.DatasetDict(splits).save_to_disk(str(path))
    return str(path)


def write_lines(tmp_path: Path, lines: list[bytes], name: str = "bad.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# ------------------------------------------------------------------------------------------------
# Formats x sources
# ------------------------------------------------------------------------------------------------

FORMATS = ["messages", "conversational_prompt_completion", "prompt_completion", "prompt_response"]
SOURCES = ["jsonl", "json_list", "parquet", "saved_dataset", "saved_dataset_dict"]


@pytest.mark.parametrize("source_kind", SOURCES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_from_every_source_gives_the_same_examples(tmp_path: Path, fmt: str,
                                                                source_kind: str) -> None:
    path = write_source(tmp_path, source_kind, rows_for(fmt))
    examples, report = load_examples(path)
    assert [(e.prompt, e.response, e.answer) for e in examples] == expected_for(fmt)
    # JSON lines number by line, the other sources by row; both are 1, 2, 3 here
    assert [e.source for e in examples] == [f"{path}:{n}" for n in (1, 2, 3)]
    assert (report.rows, report.kept, report.skipped) == (3, 3, {})
    assert report.summary() == f"{path}: kept 3 of 3 rows"


def test_explicit_format_and_field_names(tmp_path: Path) -> None:
    rows = [{"question": "Q1?", "reply": "A1.", "answer": 12}, {"question": "Q2?", "reply": "A2."}]
    path = write_source(tmp_path, "jsonl", rows)
    examples, _ = load_examples(path, fmt="prompt_completion", prompt_field="question",
                                response_field="reply")
    assert examples == [
        Example(({"role": "user", "content": "Q1?"},), "A1.", "12", f"{path}:1"),
        Example(({"role": "user", "content": "Q2?"},), "A2.", None, f"{path}:2"),
    ]
    path = write_source(tmp_path, "jsonl", rows_for("prompt_response"))
    for kwargs in ({"fmt": "prompt_response"}, {"response_field": "response"}):
        examples, _ = load_examples(path, **kwargs)
        assert [(e.prompt, e.response, e.answer) for e in examples] == expected_for("prompt_response")
    chats = [{"conv": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    path = write_source(tmp_path, "jsonl", chats)
    examples, _ = load_examples(path, messages_field="conv")
    assert examples[0].prompt == ({"role": "user", "content": "x"},) and examples[0].response == "y"


def test_system_prompt_is_prepended_only_when_the_prompt_has_none(tmp_path: Path) -> None:
    path = write_source(tmp_path, "jsonl", rows_for("messages"))
    examples, _ = load_examples(path, system_prompt="You are helpful.")
    assert examples[0].prompt[0] == {"role": "system", "content": "You are helpful."}
    assert examples[1].prompt[0] == {"role": "system", "content": "Be terse."}
    assert [turn["role"] for turn in examples[2].prompt] == ["system", "user", "assistant", "user"]


def test_the_first_exchange_of_each_conversation_as_spin_reads_ultrachat(tmp_path: Path) -> None:
    """response_turn="first": the first assistant turn is the response and only the turns before it are
    the prompt (SPIN's reformat of UltraChat keeps messages[0] and messages[1]); the later turns, even a
    malformed one, are not read."""
    rows = [
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2 unanswered"}]},
    ]  # fmt: skip
    path = write_source(tmp_path, "jsonl", rows)
    first, _ = load_examples(path, response_turn="first")
    assert [(e.prompt, e.response) for e in first] == [
        (({"role": "user", "content": "Q1"},), "A1"),
        (({"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}), "A1"),
    ]
    last, report = load_examples(path, on_bad_row="skip")  # the default: the last turn must be the answer
    assert [e.response for e in last] == ["A2"] and report.skipped == {"bad_turn_order": 1}
    (tmp_path / "n").mkdir()
    no_answer = write_source(tmp_path / "n", "jsonl", [{"messages": [{"role": "user", "content": "Q"}]}])
    with pytest.raises(DataError, match="has no assistant turn"):
        load_examples(no_answer, response_turn="first")
    assert load_config("paper_space", []).data.response_turn == "first"


def test_limit_blank_lines_bom_and_crlf(tmp_path: Path) -> None:
    lines = [json.dumps(row).encode() for row in rows_for("prompt_completion")]
    path = write_lines(tmp_path, [b"\xef\xbb\xbf" + lines[0] + b"\r", b"", b"  ", lines[1] + b"\r", lines[2]])
    examples, report = load_examples(path)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    examples, report = load_examples(path, limit=2)
    assert (len(examples), report.rows, report.kept) == (2, 2, 2)


# ------------------------------------------------------------------------------------------------
# Bad rows: an error naming file and line, or a counted skip
# ------------------------------------------------------------------------------------------------

GOOD_PC = json.dumps({"prompt": "p", "completion": "c"}).encode()
GOOD_MSG = json.dumps({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]}
                      ).encode()


def msgs(*turns: tuple[str, Any]) -> bytes:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]}).encode()


BAD_ROWS = [
    # (id, a good row of the same format, the bad line, skip reason, fragment of the error message)
    ("malformed_json", GOOD_PC, b'{"prompt": "p", "completion": ', "malformed_json", "malformed JSON"),
    ("non_utf8", GOOD_PC, b'{"prompt": "caf\xe9", "completion": "c"}', "non_utf8", "not valid UTF-8"),
    ("missing_field", GOOD_PC, b'{"prompt": "p"}', "missing_field", "missing field 'completion'"),
    ("null_field", GOOD_PC, b'{"prompt": "p", "completion": null}', "missing_field", "missing field"),
    ("not_an_object", GOOD_PC, b'["p", "c"]', "malformed_row", "must be a JSON object"),
    ("non_string_completion", GOOD_PC, b'{"prompt": "p", "completion": 3}', "non_string_content",
     "must be a string"),
    ("non_string_content", GOOD_MSG, msgs(("user", ["p"]), ("assistant", "c")), "non_string_content",
     "content must be a string"),
    ("non_string_answer", GOOD_PC, b'{"prompt": "p", "completion": "c", "answer": [1]}',
     "non_string_content", "'answer'"),
    ("empty_response", GOOD_PC, b'{"prompt": "p", "completion": "  \\n"}', "empty_response",
     "empty response"),
    ("empty_assistant_turn", GOOD_MSG, msgs(("user", "p"), ("assistant", "")), "empty_response",
     "empty response"),
    ("empty_prompt", GOOD_PC, b'{"prompt": "", "completion": "c"}', "empty_prompt", "is empty"),
    ("unknown_role", GOOD_MSG, msgs(("human", "p"), ("assistant", "c")), "unknown_role", "'human'"),
    ("missing_role", GOOD_MSG, b'{"messages": [{"content": "p"}, {"role": "assistant", "content": "c"}]}',
     "missing_field", "no 'role'"),
    ("turn_not_object", GOOD_MSG, b'{"messages": ["p", {"role": "assistant", "content": "c"}]}',
     "malformed_row", "must be an object"),
    ("messages_not_list", GOOD_MSG, b'{"messages": "p"}', "malformed_row", "must be a list"),
    ("no_user_turn", GOOD_MSG, msgs(("system", "s"), ("assistant", "c")), "no_user_turn", "no user turn"),
    ("only_response", GOOD_MSG, msgs(("assistant", "c")), "no_user_turn", "no turns before"),
    ("last_turn_user", GOOD_MSG, msgs(("user", "p")), "bad_turn_order", "must be the assistant's"),
    ("prompt_ends_with_assistant", GOOD_MSG, msgs(("user", "p"), ("assistant", "a"), ("assistant", "c")),
     "bad_turn_order", "must end with a user turn"),
    ("system_not_first", GOOD_MSG, msgs(("user", "p"), ("system", "s"), ("user", "q"), ("assistant", "c")),
     "bad_turn_order", "may only come first"),
    ("completion_turn_not_assistant", GOOD_PC,
     b'{"prompt": "p", "completion": [{"role": "user", "content": "c"}]}', "bad_turn_order",
     "exactly one assistant turn"),
]


@pytest.mark.parametrize(("good", "bad", "reason", "fragment"), [case[1:] for case in BAD_ROWS],
                         ids=[case[0] for case in BAD_ROWS])
def test_bad_row_is_an_error_naming_file_and_line(tmp_path: Path, good: bytes, bad: bytes, reason: str,
                                                  fragment: str) -> None:
    # a blank line 2 checks that lines, not rows, are counted
    path = write_lines(tmp_path, [good, b"", bad, good])
    with pytest.raises(DataError) as caught:
        load_examples(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: "), message
    assert fragment in message, message


@pytest.mark.parametrize(("good", "bad", "reason"), [case[1:4] for case in BAD_ROWS],
                         ids=[case[0] for case in BAD_ROWS])
def test_bad_row_is_counted_when_skipping(tmp_path: Path, good: bytes, bad: bytes, reason: str) -> None:
    assert reason in data.BAD_ROW_REASONS
    path = write_lines(tmp_path, [good, b"", bad, good])
    examples, report = load_examples(path, on_bad_row="skip")
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4"]
    assert (report.rows, report.kept, report.skipped) == (3, 2, {reason: 1})
    assert report.summary() == f"{path}: kept 2 of 3 rows (skipped: {reason}=1)"


def test_bad_row_in_parquet_names_the_row(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}]
    path = write_source(tmp_path, "parquet", rows)
    with pytest.raises(DataError, match=rf"^{path}:2: field 'completion' is an empty response"):
        load_examples(path)
    examples, report = load_examples(path, on_bad_row="skip")
    assert len(examples) == 1 and report.skipped == {"empty_response": 1}


def test_bad_row_in_saved_dataset_names_the_row(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]},
            {"messages": [{"role": "bot", "content": "p"}, {"role": "assistant", "content": "c"}]}]
    path = write_source(tmp_path, "saved_dataset", rows)
    with pytest.raises(DataError, match=rf"^{path}:2: messages\[1\] has role 'bot'"):
        load_examples(path)


# ------------------------------------------------------------------------------------------------
# Bad files: always an error
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"[]"], ids=["empty", "blank_lines", "empty_list"])
def test_empty_file_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: empty"):
        load_examples(str(path))


def test_all_rows_skipped_is_an_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [b"{", b'{"prompt": "p"}'])
    with pytest.raises(DataError, match=r"no usable rows.*malformed_json=1, missing_field=1"):
        load_examples(path, on_bad_row="skip")


def test_json_list_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_bytes(b'[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": "p" "completion": "c"}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON"):
        load_examples(str(path))
    path.write_bytes(b'[\n  {"prompt": "p", "completion": "c"},\n'
                     b'  {"prompt": "\xff", "completion": "c"}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8"):
        load_examples(str(path))


def test_missing_unsupported_and_non_dataset_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_examples(str(tmp_path / "nope.jsonl"))
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,completion\np,c\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type"):
        load_examples(str(csv))
    with pytest.raises(DataError, match=r"not one written by datasets\.save_to_disk"):
        load_examples(str(tmp_path))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        load_examples(str(broken))


def test_saved_dataset_dict_split(tmp_path: Path) -> None:
    path = write_source(tmp_path, "saved_dataset_dict", rows_for("messages"))
    examples, _ = load_examples(path, split="test")
    assert len(examples) == 1
    with pytest.raises(DataError, match=r"no split 'validation'; the dataset has \['test', 'train'\]"):
        load_examples(path, split="validation")


def test_hub_name_offline_says_to_pass_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(name: str, split: str) -> None:  # what datasets raises without a network
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=r"^org/sft-set: .*Hub is not reachable.*local \.jsonl"):
        load_examples("org/sft-set")


def test_hub_name_loads_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, str] = {}

    def fake_load(name: str, split: str) -> datasets.Dataset:
        seen.update(name=name, split=split)
        return datasets.Dataset.from_list(rows_for("messages"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples, _ = load_examples("org/sft-set", split="train_sft")
    assert seen == {"name": "org/sft-set", "split": "train_sft"}
    assert [(e.prompt, e.response, e.answer) for e in examples] == PAIRS


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    path = write_source(tmp_path, "jsonl", rows_for("messages"))
    for kwargs in ({"fmt": "sharegpt"}, {"on_bad_row": "ignore"}, {"limit": 0}, {"response_turn": "middle"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            load_examples(path, **kwargs)
