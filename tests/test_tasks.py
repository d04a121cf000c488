"""The embedded arithmetic task: determinism, split disjointness, row format, answer parsing."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from spaceft import tasks
from spaceft.tasks import exact_match, make_arithmetic, parse_answer, split_of, write_arithmetic_jsonl

_DRESSING = re.compile(
    r"\b(?:"
    + "|".join(
        sorted(
            [name for name, _ in tasks._NAMES]
            + list(tasks._ITEMS)
            + list(tasks._GOODS)
            + ["He", "She", "he", "she"],
            key=len,
            reverse=True,
        )
    )
    + r")\b"
)


def skeleton(prompt: str) -> str:
    """A prompt with its names, pronouns and objects blanked: what is left is template + numbers."""
    return _DRESSING.sub("_", prompt)


def prompts(rows: list[dict]) -> list[str]:
    return [row["messages"][0]["content"] for row in rows]


def test_same_seed_same_rows_and_different_seed_different_rows() -> None:
    assert make_arithmetic(40, seed=3, split="train") == make_arithmetic(40, seed=3, split="train")
    assert make_arithmetic(40, seed=3, split="test") == make_arithmetic(40, seed=3, split="test")
    assert prompts(make_arithmetic(40, seed=3)) != prompts(make_arithmetic(40, seed=4))


def test_a_longer_list_extends_a_shorter_one() -> None:
    """Asking for more rows keeps the first ones, so eval_size=50 contains eval_size=20."""
    assert make_arithmetic(50, seed=1, split="test")[:20] == make_arithmetic(20, seed=1, split="test")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_train_and_test_never_share_a_problem(seed: int) -> None:
    """Not only different prompts: no template+numbers combination is in both splits."""
    train = make_arithmetic(600, seed=seed, split="train")
    test = make_arithmetic(200, seed=seed, split="test")
    assert not set(prompts(train)) & set(prompts(test))
    assert not {skeleton(p) for p in prompts(train)} & {skeleton(p) for p in prompts(test)}


def test_splits_are_disjoint_across_seeds() -> None:
    """A held-out problem of one seed is not a training problem of another seed either."""
    train = {skeleton(p) for seed in range(3) for p in prompts(make_arithmetic(300, seed=seed))}
    test = {skeleton(p) for seed in range(3) for p in prompts(make_arithmetic(100, seed=seed, split="test"))}
    assert not train & test


def test_split_of_is_stable_and_about_a_fifth_is_held_out() -> None:
    # Fixed by SHA-256 of the key, not Python's salted hash(): these values never change.
    assert [split_of(k) for k in ("add:3:2", "add:3:4", "add:4:2", "add:4:3", "add:6:2")] == [
        "train",
        "test",
        "test",
        "train",
        "test",
    ]
    rng = random.Random(0)
    keys = {fam(rng).key for fam in tasks._ONE_STEP + tasks._TWO_STEP for _ in range(400)}
    share = sum(split_of(k) == "test" for k in keys) / len(keys)
    assert abs(share - tasks.TEST_FRACTION) < 0.04, share


def test_rows_have_chat_messages_and_a_correct_worked_solution() -> None:
    rows = make_arithmetic(300, seed=0)
    assert len(set(prompts(rows))) == 300
    two_step = 0
    for row in rows:
        assert set(row) == {"messages", "answer"}
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].endswith("?")
        solution = assistant["content"]
        assert solution.endswith(f"\n#### {row['answer']}")
        assert row["answer"].isdigit() and int(row["answer"]) >= 0
        assert parse_answer(solution) == row["answer"]
        # Every step of the worked solution is right, and the last step gives the answer.
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", solution)
        assert steps, solution
        for a, op, b, c in steps:
            assert {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}[op](
                int(a), int(b)
            ) == int(c), solution
            if op == "/":
                assert int(a) % int(b) == 0
        assert steps[-1][3] == row["answer"]
        two_step += len(steps) == 2
    assert abs(two_step / len(rows) - tasks.TWO_STEP_FRACTION) < 0.08


def test_bad_arguments_are_errors() -> None:
    with pytest.raises(ValueError, match="split"):
        make_arithmetic(3, seed=0, split="dev")
    with pytest.raises(ValueError, match="n must be"):
        make_arithmetic(-1, seed=0)
    assert make_arithmetic(0, seed=0) == []


def test_write_jsonl_is_atomic_and_matches_make(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "train.jsonl"
    assert write_arithmetic_jsonl(path, 25, seed=2, split="train") == path
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == make_arithmetic(25, seed=2, split="train")
    # Rewriting replaces (never appends) and leaves no temporary files behind.
    write_arithmetic_jsonl(path, 5, seed=2, split="test")
    assert len(path.read_text().splitlines()) == 5
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 42", "42"),
        ("So the answer is 7 + 5 = 12 apples.\n#### 12", "12"),
        ("#### 1,000", "1000"),
        ("#### $1,234,567.", "1234567"),
        ("#### 5.0", "5"),
        ("#### 2.50", "2.5"),
        ("#### -3", "-3"),
        ("####12", "12"),
        ("#### 12 apples, not 13", "12"),
        # The last '####' wins, and the first number after it.
        ("#### 3\nOops, let me redo it.\n#### 4", "4"),
        # No '####': the last number in the text.
        ("Tom has 7 + 5 = 12 apples.", "12"),
        ("The answer is 12.", "12"),
        ("It costs $3.50 in total.", "3.5"),
        ("He has 1,000 marbles", "1000"),
        ("Between 1,2,3 the last is 3", "3"),
        ("5-3 is what he had", "3"),
        ("The temperature is -4 degrees", "-4"),
        ("x = (-7)", "-7"),
        ("COVID-19", "19"),
        ("1.5 and 0.25", "0.25"),
        ("100.00", "100"),
        ("007", "7"),
        # A '####' with nothing numeric after it falls back to the last number anywhere.
        ("Tom has 12 apples. ####", "12"),
        ("####", None),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_parse_answer(text: str, expected: str | None) -> None:
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Tom has 7 + 5 = 12 apples.\n#### 12", "12", True),
        ("#### 12.0", "12", True),
        ("#### 1,000", "1000", True),
        ("#### 1000", "1,000", True),
        ("The change is $15.", "15", True),
        ("#### 13", "12", False),
        ("12 is close but the answer is 13", "12", False),
        ("I don't know", "12", False),
        ("", "0", False),
        ("#### 0", "0", True),
    ],
)
def test_exact_match(prediction: str, answer: str, expected: bool) -> None:
    assert exact_match(prediction, answer) is expected


def test_train_and_test_rows_are_those_measured_before_the_validation_split() -> None:
    """Adding the validation split changed no train or test problem, so earlier results stay valid.
    The digest was computed with the two-split module (commit 2474cdf) for train 256 + test 200, seed 0."""
    rows = [make_arithmetic(256, seed=0, split="train"), make_arithmetic(200, seed=0, split="test")]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    assert digest == "0e4445ba86d8bccf"


@pytest.mark.parametrize("seed", [0, 1])
def test_validation_is_disjoint_from_test_and_from_the_reserved_training_problems(seed: int) -> None:
    validation = make_arithmetic(300, seed=seed, split="validation")
    test = make_arithmetic(200, seed=seed, split="test")
    train = make_arithmetic(tasks.VALIDATION_RESERVE, seed=seed, split="train")
    assert len(set(prompts(validation))) == 300
    val = {skeleton(p) for p in prompts(validation)}
    assert not val & {skeleton(p) for p in prompts(test)}
    assert not val & {skeleton(p) for p in prompts(train)}
    # a training list longer than the reserve may share problems with validation: the reserve is real
    longer = {skeleton(p) for p in prompts(make_arithmetic(4 * tasks.VALIDATION_RESERVE, seed=seed))}
    assert val & longer
    assert validation == make_arithmetic(300, seed=seed, split="validation")
    assert make_arithmetic(50, seed=seed, split="validation") == validation[:50]
