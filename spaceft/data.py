"""Real SFT pairs: loading and validation (token ids come from `spaceft.chat`).

Self-play needs the real pairs (x, y) of the SFT set twice: the prompts x are what the opponent answers
when it generates synthetic responses, and (x, y) are the "real" side of every loss. This module reads
and checks them; `spaceft.chat` is the only place a conversation becomes token ids.

Loading (`load_examples`) accepts

* JSON lines (``.jsonl``, or ``.json`` holding one object per line) and a ``.json`` file holding a list;
* Parquet (``.parquet``), read with pyarrow;
* a directory written by ``datasets.save_to_disk`` (a ``DatasetDict`` is narrowed to ``split``);
* otherwise a Hugging Face Hub dataset name, through ``datasets.load_dataset`` (needs the network).

and three row formats, detected from the first row's keys when ``fmt="auto"``:

* ``messages`` — TRL's conversational format: a list of ``{"role", "content"}`` turns; the final turn
  must be the assistant's and is the response, the turns before it are the prompt (with
  ``response_turn="first"``: the first assistant turn, and only the turns before it).
* ``prompt_completion`` — TRL's prompt/completion columns, each either a string or (conversational) a
  list of messages; ``prompt_response`` (or ``response_field="response"``) reads prompt/response.
  When ``response_field`` is left at ``"completion"`` and a file has ``response`` instead, ``auto``
  reads ``response`` (and logs that it did).
* an optional ``answer`` column (string or number) is kept for exact-match evaluation.

Every row is validated: roles are system/user/assistant only, a system turn may only come first, the
prompt ends with a user turn, contents are strings, the response is not blank. A bad row is either an
error (``DataError("path:N: reason")``, N the 1-based line of a JSON-lines file or the 1-based row of
a list/Parquet/dataset source) or, with ``on_bad_row="skip"``, counted under its reason in
`LoadReport.skipped`. Problems with the file as a whole (missing, empty, a ``.json`` list that does not
parse) are always errors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

logger = logging.getLogger(__name__)

__all__ = [
    "BAD_ROW_REASONS",
    "DataError",
    "Example",
    "LoadReport",
    "load_examples",
]

ROLES = ("system", "user", "assistant")
Format = Literal["auto", "messages", "prompt_completion", "prompt_response"]
FORMATS: tuple[Format, ...] = get_args(Format)
BadRowPolicy = Literal["error", "skip"]
BAD_ROW_POLICIES: tuple[BadRowPolicy, ...] = get_args(BadRowPolicy)
ResponseTurn = Literal["last", "first"]
"""Which assistant turn of a conversation is the response (the turns before it are the prompt)."""
RESPONSE_TURNS: tuple[ResponseTurn, ...] = get_args(ResponseTurn)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
FILE_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES
"""The files `load_examples` reads; anything else local is a `datasets.save_to_disk` directory."""

# Keys of `LoadReport.skipped`; each names one way a row can be bad.
BAD_ROW_REASONS = (
    "non_utf8",  # the line is not valid UTF-8
    "malformed_json",  # the line is not valid JSON
    "malformed_row",  # the row is not an object, `messages` is not a list, a turn is not an object
    "missing_field",  # a needed field (or a turn's role/content) is absent or null
    "non_string_content",  # a prompt, response, content or answer of the wrong type
    "empty_prompt",  # the prompt text is blank
    "empty_response",  # the response text is blank
    "unknown_role",  # a role other than system/user/assistant
    "bad_turn_order",  # system not first, prompt not ending in a user turn, no final assistant turn
    "no_user_turn",  # the prompt has no user turn at all
)


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and, for a row, its number."""


@dataclass(frozen=True)
class Example:
    """One real SFT pair (x, y)."""

    prompt: tuple[dict[str, str], ...]
    """Chat messages before the response (system/user/assistant turns); the last one is a user turn."""
    response: str
    """The real (SFT) response text."""
    answer: str | None = None
    """Optional verifiable answer (the ``answer`` column), for exact-match evaluation."""
    source: str = ""
    """``path:N`` provenance: the 1-based line (JSON lines) or row (list, Parquet, dataset)."""


@dataclass
class LoadReport:
    """What `load_examples` read, kept and skipped."""

    path: str
    """The source as given."""
    rows: int = 0
    """Rows read (blank lines of a JSON-lines file are not rows)."""
    kept: int = 0
    """Rows that became `Example`s."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped rows by reason (keys from `BAD_ROW_REASONS`)."""

    def summary(self) -> str:
        """One line for the log, e.g. ``data.jsonl: kept 9 of 10 rows (skipped: empty_response=1)``."""
        text = f"{self.path}: kept {self.kept} of {self.rows} rows"
        if self.skipped:
            reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items()))
            text += f" (skipped: {reasons})"
        return text


class _BadRow(Exception):
    """Raised inside row parsing; `load_examples` turns it into a DataError or a counted skip."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------------------------------
# Reading sources: each yields (number, row-or-_BadRow), number being the 1-based line or row.
# ----------------------------------------------------------------------------------------------------

_Row = Mapping[str, Any] | _BadRow


def _iter_json_lines(data: bytes) -> Iterator[tuple[int, _Row]]:
    # Decode line by line (not the whole file) so a bad byte is reported at its own line.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, _BadRow("non_utf8", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                              f"{exc.start + 1})")
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as exc:
            yield lineno, _BadRow("malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})")


def _iter_json_list(path: str, data: bytes) -> Iterator[tuple[int, _Row]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x})") from exc
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    yield from enumerate(rows, start=1)


def _iter_parquet(path: str) -> Iterator[tuple[int, _Row]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _load_saved_dataset(path: str, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: a directory, but not one written by datasets.save_to_disk ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; the dataset has {sorted(loaded)}")
        return loaded[split]
    return loaded


def _load_hub_dataset(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError) as exc:
        raise DataError(
            f"{name}: not a local file or directory, and the Hugging Face Hub is not reachable to load it "
            f"as a dataset name ({exc}). Pass a local .jsonl/.json/.parquet file or a save_to_disk "
            "directory instead."
        ) from exc
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, ValueError for splits)
        raise DataError(f"{name}: could not load it as a Hugging Face Hub dataset ({exc})") from exc


def looks_local(path: str) -> bool:
    """Whether a path that does not exist was meant as a local file rather than a hub dataset name."""
    return path.lower().endswith(FILE_SUFFIXES) or path.startswith(("/", ".", "~"))


def _iter_source(path: str, split: str) -> Iterator[tuple[int, _Row]]:
    local, lower = os.path.expanduser(path), path.lower()
    if os.path.isdir(local):
        yield from enumerate(_load_saved_dataset(local, split), start=1)
    elif os.path.isfile(local):
        if lower.endswith(PARQUET_SUFFIXES):
            yield from _iter_parquet(local)
        elif lower.endswith(JSON_SUFFIXES):
            with open(local, "rb") as handle:
                data = handle.read()
            if lower.endswith(".json") and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                yield from _iter_json_list(path, data)
            else:
                yield from _iter_json_lines(data)
        else:
            raise DataError(
                f"{path}: unsupported file type; use .jsonl, .json, .parquet or a datasets.save_to_disk "
                "directory"
            )
    elif looks_local(path):
        raise DataError(f"{path}: no such file or directory")
    else:
        yield from enumerate(_load_hub_dataset(path, split), start=1)


# ----------------------------------------------------------------------------------------------------
# Turning one row into an Example.
# ----------------------------------------------------------------------------------------------------


def _field(row: Mapping[str, Any], name: str) -> Any:
    # Parquet and datasets fill a column that a row lacks with None, so null counts as missing.
    value = row.get(name)
    if value is None:
        raise _BadRow("missing_field", f"missing field {name!r} (the row has {sorted(row)})")
    return value


def _as_turns(value: Any, name: str) -> list[Mapping[str, Any]]:
    # `datasets` returns a Sequence-of-struct feature as a dict of lists; accept that shape too.
    if isinstance(value, Mapping) and set(value) >= {"role", "content"}:
        roles, contents = value["role"], value["content"]
        if isinstance(roles, list) and isinstance(contents, list) and len(roles) == len(contents):
            value = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    if not isinstance(value, list):
        kind = type(value).__name__
        raise _BadRow("malformed_row", f"field {name!r} must be a list of messages, got {kind}")
    if not value:
        raise _BadRow("malformed_row", f"field {name!r} is an empty list of messages")
    return value


def _check_turns(turns: list[Mapping[str, Any]], name: str) -> list[dict[str, str]]:
    """Validates {role, content} turns and returns them as plain dicts (extra keys dropped)."""
    checked = []
    for position, turn in enumerate(turns, start=1):
        where = f"{name}[{position}]"
        if not isinstance(turn, Mapping):
            raise _BadRow("malformed_row", f"{where} must be an object with role and content")
        role, content = turn.get("role"), turn.get("content")
        if role is None or content is None:
            missing = "role" if role is None else "content"
            raise _BadRow("missing_field", f"{where} has no {missing!r}")
        if role not in ROLES:
            raise _BadRow("unknown_role", f"{where} has role {role!r}; roles must be one of {list(ROLES)}")
        if not isinstance(content, str):
            raise _BadRow("non_string_content",
                          f"{where} content must be a string, got {type(content).__name__}")
        if role == "system" and position != 1:
            raise _BadRow("bad_turn_order", f"{where} is a system turn; a system turn may only come first")
        checked.append({"role": role, "content": content})
    return checked


def _check_prompt(prompt: list[dict[str, str]], name: str) -> None:
    if not any(turn["role"] == "user" for turn in prompt):
        raise _BadRow("no_user_turn", f"the prompt ({name}) has no user turn")
    if prompt[-1]["role"] != "user":
        raise _BadRow("bad_turn_order",
                      f"the prompt ({name}) must end with a user turn, not {prompt[-1]['role']!r}")
    if not prompt[-1]["content"].strip():
        raise _BadRow("empty_prompt", f"the prompt's last user turn ({name}) is empty")


def _check_response(response: Any, name: str) -> str:
    if not isinstance(response, str):
        raise _BadRow("non_string_content", f"field {name!r} must be a string, got {type(response).__name__}")
    if not response.strip():
        raise _BadRow("empty_response", f"field {name!r} is an empty response")
    return response


def _parse_messages(
    row: Mapping[str, Any], messages_field: str, response_turn: str = "last"
) -> tuple[list[dict[str, str]], str]:
    turns = _check_turns(_as_turns(_field(row, messages_field), messages_field), messages_field)
    if response_turn == "first":  # the conversation up to its first answer; the rest is not read
        first = next((i for i, t in enumerate(turns) if t["role"] == "assistant"), None)
        if first is None:
            raise _BadRow("bad_turn_order", f"{messages_field!r} has no assistant turn")
        turns = turns[: first + 1]
    if turns[-1]["role"] != "assistant":
        raise _BadRow("bad_turn_order", f"the last turn of {messages_field!r} must be the assistant's "
                                        f"response, not {turns[-1]['role']!r}")
    prompt = turns[:-1]
    if not prompt:
        raise _BadRow("no_user_turn", f"{messages_field!r} has no turns before the assistant's response")
    _check_prompt(prompt, messages_field)
    return prompt, _check_response(turns[-1]["content"], f"{messages_field}[{len(turns)}].content")


def _parse_prompt_completion(
    row: Mapping[str, Any], prompt_field: str, response_field: str
) -> tuple[list[dict[str, str]], str]:
    raw_prompt = _field(row, prompt_field)
    if isinstance(raw_prompt, str):
        prompt = [{"role": "user", "content": raw_prompt}]
    elif isinstance(raw_prompt, list | Mapping):
        prompt = _check_turns(_as_turns(raw_prompt, prompt_field), prompt_field)
    else:
        raise _BadRow("non_string_content", f"field {prompt_field!r} must be a string or a list of messages, "
                                            f"got {type(raw_prompt).__name__}")
    _check_prompt(prompt, prompt_field)
    raw_response = _field(row, response_field)
    if isinstance(raw_response, list | Mapping):  # TRL's conversational completion: one assistant turn
        turns = _check_turns(_as_turns(raw_response, response_field), response_field)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            roles = [turn["role"] for turn in turns]
            raise _BadRow("bad_turn_order",
                          f"field {response_field!r} must hold exactly one assistant turn, got roles {roles}")
        return prompt, _check_response(turns[0]["content"], f"{response_field}[1].content")
    return prompt, _check_response(raw_response, response_field)


def _parse_answer(row: Mapping[str, Any]) -> str | None:
    answer = row.get("answer")
    if answer is None:
        return None
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise _BadRow("non_string_content", f"field 'answer' must be a string or a number, "
                                            f"got {type(answer).__name__}")
    return str(answer)


def _detect_format(row: Mapping[str, Any], messages_field: str, prompt_field: str,
                   response_field: str) -> tuple[str, str]:
    """Returns (format, response field) for ``fmt="auto"`` from one row's keys."""
    if messages_field in row:
        return "messages", response_field
    if prompt_field in row and response_field in row:
        return "prompt_completion", response_field
    if prompt_field in row and response_field == "completion" and "response" in row:
        return "prompt_completion", "response"
    raise _BadRow("missing_field", f"cannot tell the format from the keys {sorted(row)}: expected "
                                   f"{messages_field!r}, or {prompt_field!r} with {response_field!r}")


# ----------------------------------------------------------------------------------------------------
# Public loading API.
# ----------------------------------------------------------------------------------------------------


def load_examples(
    path: str,
    *,
    fmt: str = "auto",
    prompt_field: str = "prompt",
    response_field: str = "completion",
    messages_field: str = "messages",
    system_prompt: str | None = None,
    split: str = "train",
    on_bad_row: str = "error",
    limit: int | None = None,
    response_turn: str = "last",
) -> tuple[list[Example], LoadReport]:
    """Loads and validates real SFT pairs from a file, a saved dataset directory or a hub dataset.

    Args:
        path: a ``.jsonl``/``.json``/``.parquet`` file, a ``save_to_disk`` directory or a hub name.
        fmt: ``"auto"`` (from the first row's keys), ``"messages"``, ``"prompt_completion"`` or
            ``"prompt_response"`` (prompt/completion reading the ``response`` column).
        prompt_field, response_field, messages_field: column names.
        system_prompt: prepended as a system turn to every prompt that has none.
        split: the split of a ``DatasetDict`` directory or a hub dataset.
        on_bad_row: ``"error"`` raises `DataError` at the first bad row; ``"skip"`` counts it.
        limit: stop once this many examples are kept.
        response_turn: in the ``messages`` format, which assistant turn is the response: ``"last"``
            (the turns before it are the prompt) or ``"first"`` (the first exchange only, as SPIN and
            SPACE read UltraChat; the later turns are not read).

    Returns:
        The examples in file order and a `LoadReport`.

    Raises:
        DataError: for a bad row under ``on_bad_row="error"``, a file that is missing, empty, of an
            unsupported type or unreadable, or when no row is usable.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {list(BAD_ROW_POLICIES)}, got {on_bad_row!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}")
    if response_turn not in RESPONSE_TURNS:
        raise ValueError(f"response_turn must be one of {list(RESPONSE_TURNS)}, got {response_turn!r}")

    report = LoadReport(path=path)
    examples: list[Example] = []
    detected: tuple[str, str] | None = None if fmt == "auto" else (fmt, response_field)
    if fmt == "prompt_response":  # prompt/completion code, reading "response" unless told another name
        detected = ("prompt_completion", "response" if response_field == "completion" else response_field)
    for number, row in _iter_source(path, split):
        report.rows += 1
        source = f"{path}:{number}"
        try:
            if isinstance(row, _BadRow):
                raise row
            if not isinstance(row, Mapping):
                raise _BadRow("malformed_row", f"a row must be a JSON object, got {type(row).__name__}")
            if detected is None:
                detected = _detect_format(row, messages_field, prompt_field, response_field)
                logger.info("%s: reading the %r format (response field %r)", path, *detected)
            row_fmt, row_response_field = detected
            if row_fmt == "messages":
                prompt, response = _parse_messages(row, messages_field, response_turn)
            else:
                prompt, response = _parse_prompt_completion(row, prompt_field, row_response_field)
            answer = _parse_answer(row)
        except _BadRow as bad:
            if on_bad_row == "error":
                raise DataError(f"{source}: {bad.message}") from None
            report.skipped[bad.reason] = report.skipped.get(bad.reason, 0) + 1
            logger.debug("%s: skipped: %s", source, bad.message)
            continue
        if system_prompt is not None and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
        examples.append(Example(prompt=tuple(prompt), response=response, answer=answer, source=source))
        report.kept += 1
        if limit is not None and report.kept >= limit:
            break

    if report.rows == 0:
        raise DataError(f"{path}: empty, no rows to read")
    if not examples:
        raise DataError(f"{path}: no usable rows; {report.summary()}")
    # skipped rows are a warning (they survive -q): the user asked to skip, not to be told nothing
    (logger.warning if report.skipped else logger.info)("%s", report.summary())
    return examples, report
