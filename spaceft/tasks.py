"""The embedded task: seeded arithmetic word problems with a verifiable answer, plainly or variously worded.

A small GSM8K-style task that SmolLM2-135M-Instruct can learn but does not already solve: short word
problems needing one or two operations on small whole numbers, each with a short worked solution
that ends in GSM8K's answer line ``#### <answer>``. The answer is checked by exact match of the parsed
number, so held-out accuracy is a verifiable metric for self-play (no judge model needed).

Splits. A problem's *key* is its template and its numbers (not the names or objects that dress it up).
A stable hash of the key puts every key in exactly one of two buckets, train and test, so train and test
never share a problem -- not even the same sum told about different people -- for any seed. Sampling
draws problems and keeps those whose key falls in the requested split, without repeating a prompt.

The validation split (for choosing hyper-parameters without looking at the held-out test problems)
leaves train and test as they are, so results measured on them stay comparable: its problems come
from the train bucket (never a test key), from their own random stream, and never share a key with the
first ``VALIDATION_RESERVE`` training problems of the same data seed. Since a longer training list
extends a shorter one, every ``train_size`` up to that reserve is disjoint from validation.

Difficulty. Measured on SmolLM2-135M-Instruct (greedy decoding, its chat template, 64 new tokens,
:func:`parse_answer`): see ``STARTING_ACCURACY`` below. The mix of one- and two-step problems and
the number ranges are set so that the base model gets some right (it already knows the kind of
reasoning; most misses are rambling past the answer or one slip) while leaving plenty of headroom.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
"""Split names accepted by :func:`make_arithmetic`."""

VALIDATION_RESERVE = 512
"""Validation problems never share a key with this many first training problems of the same seed."""

TEST_FRACTION = 0.2
"""Share of problem keys that belong to the held-out split."""

TWO_STEP_FRACTION = 0.4
"""Share of problems that need two operations (the rest need one)."""

STARTING_ACCURACY = 0.12
"""Base SmolLM2-135M-Instruct held-out accuracy, measured as the module docstring says: 25/200 (seed 1);
8/50 on seed 0. With 128 new tokens instead of 64 it is no better (6/50 on seed 0)."""

_NAMES = (
    ("Tom", "he"),
    ("Mia", "she"),
    ("Sam", "he"),
    ("Lena", "she"),
    ("Omar", "he"),
    ("Ava", "she"),
    ("Leo", "he"),
    ("Nora", "she"),
    ("Ben", "he"),
    ("Zoe", "she"),
    ("Ravi", "he"),
    ("Ivy", "she"),
)
_ITEMS = (
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "books",
    "shells",
    "cards",
    "balloons",
    "stamps",
    "crayons",
    "oranges",
)
_GOODS = ("notebook", "pen", "toy car", "sandwich", "ticket", "comic book", "cup of juice", "ball")


@dataclass(frozen=True)
class _Problem:
    key: str
    """Template name and numbers: what decides the split."""
    prompt: str
    solution: str
    answer: int


def _person(rng: random.Random) -> tuple[str, str]:
    name, pronoun = rng.choice(_NAMES)
    return name, pronoun


def _add(rng: random.Random) -> _Problem:
    a, b = rng.randint(3, 30), rng.randint(2, 20)
    name, he = _person(rng)
    item = rng.choice(_ITEMS)
    c = a + b
    return _Problem(
        key=f"add:{a}:{b}",
        prompt=f"{name} has {a} {item}. {he.capitalize()} gets {b} more {item}. "
        f"How many {item} does {name} have now?",
        solution=f"{name} has {a} + {b} = {c} {item} now.",
        answer=c,
    )


def _sub(rng: random.Random) -> _Problem:
    a = rng.randint(8, 40)
    b = rng.randint(2, a - 2)
    name, _ = _person(rng)
    item = rng.choice(_ITEMS)
    c = a - b
    return _Problem(
        key=f"sub:{a}:{b}",
        prompt=f"{name} had {a} {item} and gave {b} of them to a friend. "
        f"How many {item} does {name} have left?",
        solution=f"{name} has {a} - {b} = {c} {item} left.",
        answer=c,
    )


def _mul(rng: random.Random) -> _Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    name, _ = _person(rng)
    item = rng.choice(_ITEMS)
    c = a * b
    return _Problem(
        key=f"mul:{a}:{b}",
        prompt=f"{name} buys {a} bags of {item}. Each bag holds {b} {item}. "
        f"How many {item} does {name} buy in total?",
        solution=f"{name} buys {a} * {b} = {c} {item}.",
        answer=c,
    )


def _div(rng: random.Random) -> _Problem:
    b, c = rng.randint(2, 9), rng.randint(2, 10)
    a = b * c
    name, _ = _person(rng)
    item = rng.choice(_ITEMS)
    return _Problem(
        key=f"div:{a}:{b}",
        prompt=f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
        solution=f"Each friend gets {a} / {b} = {c} {item}.",
        answer=c,
    )


def _add_sub(rng: random.Random) -> _Problem:
    a, b = rng.randint(5, 30), rng.randint(2, 20)
    c = rng.randint(2, a + b - 1)
    name, he = _person(rng)
    item = rng.choice(_ITEMS)
    d, e = a + b, a + b - c
    return _Problem(
        key=f"add_sub:{a}:{b}:{c}",
        prompt=f"{name} has {a} {item}. {he.capitalize()} buys {b} more and then gives away {c}. "
        f"How many {item} does {name} have now?",
        solution=f"After buying, {name} has {a} + {b} = {d} {item}. "
        f"After giving away {c}, {he} has {d} - {c} = {e} {item}.",
        answer=e,
    )


def _mul_add(rng: random.Random) -> _Problem:
    a, b, c = rng.randint(2, 20), rng.randint(2, 6), rng.randint(2, 10)
    name, he = _person(rng)
    item = rng.choice(_ITEMS)
    d, e = b * c, a + b * c
    return _Problem(
        key=f"mul_add:{a}:{b}:{c}",
        prompt=f"{name} has {a} {item}. {he.capitalize()} buys {b} packs with {c} {item} in each pack. "
        f"How many {item} does {name} have now?",
        solution=f"The packs hold {b} * {c} = {d} {item}. So {name} has {a} + {d} = {e} {item}.",
        answer=e,
    )


def _change(rng: random.Random) -> _Problem:
    price, count = rng.randint(2, 12), rng.randint(2, 8)
    cost = price * count
    paid = next(bill for bill in (10, 20, 50, 100) if bill > cost)
    name, _ = _person(rng)
    good = rng.choice(_GOODS)
    change = paid - cost
    return _Problem(
        key=f"change:{price}:{count}",
        prompt=f"One {good} costs ${price}. {name} buys {count} of them and pays with a ${paid} bill. "
        f"How much change does {name} get?",
        solution=f"{count} of them cost {count} * {price} = ${cost}. "
        f"The change is {paid} - {cost} = ${change}.",
        answer=change,
    )


def _times_as_many(rng: random.Random) -> _Problem:
    a, b = rng.randint(2, 20), rng.randint(2, 6)
    (name, _), (other, _) = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    d, e = a * b, a + a * b
    return _Problem(
        key=f"times_as_many:{a}:{b}",
        prompt=f"{name} has {a} {item}. {other} has {b} times as many {item} as {name}. "
        f"How many {item} do they have together?",
        solution=f"{other} has {a} * {b} = {d} {item}. Together they have {a} + {d} = {e} {item}.",
        answer=e,
    )


_ONE_STEP: tuple[Callable[[random.Random], _Problem], ...] = (_add, _sub, _mul, _div)
_TWO_STEP: tuple[Callable[[random.Random], _Problem], ...] = (_add_sub, _mul_add, _change, _times_as_many)


def split_of(key: str) -> str:
    """The split a problem key belongs to: a stable hash (not Python's salted ``hash``) of the key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < TEST_FRACTION else "train"


def _draw(n: int, *, seed: int, stream: str, keep: Callable[[str], bool]) -> list[_Problem]:
    """``n`` problems with distinct prompts from the random stream ``stream`` whose keys ``keep`` accepts."""
    # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms.
    rng = random.Random(f"spaceft-arithmetic:{seed}:{stream}")
    problems: list[_Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 200 * n + 1000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could only make {len(problems)} distinct {stream} problems of the {n} asked for; "
                "ask for fewer"
            )
        family = _TWO_STEP if rng.random() < TWO_STEP_FRACTION else _ONE_STEP
        problem = rng.choice(family)(rng)
        if not keep(problem.key) or problem.prompt in seen:
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    return problems


def make_arithmetic(n: int, *, seed: int, split: str = "train", worded: bool = False) -> list[dict]:
    """Make ``n`` distinct arithmetic word problems of one split, deterministically for ``seed``.

    Each row is ``{"messages": [{"role": "user", "content": prompt},
    {"role": "assistant", "content": solution}], "answer": "42"}``; the solution ends in
    ``#### <answer>``. No two splits share a problem key (see the module docstring for validation's
    rule), and a longer list of a split extends a shorter one. ``worded`` gives the same problems with
    each solution drawn from its :func:`worded_variants` (a row's draw depends on that row alone).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split == "validation":
        reserved = {p.key for p in _draw(VALIDATION_RESERVE, seed=seed, stream="train", keep=_in_train)}
        problems = _draw(n, seed=seed, stream=split, keep=lambda key: _in_train(key) and key not in reserved)
    else:
        problems = _draw(n, seed=seed, stream=split, keep=lambda key: split_of(key) == split)
    return [
        {
            "messages": [
                {"role": "user", "content": p.prompt},
                {"role": "assistant", "content": _solution(p, seed, worded)},
            ],
            "answer": str(p.answer),
        }
        for p in problems
    ]


def _solution(p: _Problem, seed: int, worded: bool) -> str:
    if not worded:
        return f"{p.solution}\n#### {p.answer}"
    # its own stream per row (string seeds are hashed with SHA-512: stable across runs and platforms)
    rng = random.Random(f"spaceft-arithmetic-worded:{seed}:{p.prompt}")
    return rng.choice(worded_variants(p.solution, p.answer))


# The worded task: one problem, many correct solutions. A solution is an opener, the template's
# sentences with each equation written in one of several notations, and a closer, then the answer line;
# all of them equally likely, so a model that matched the data would reproduce a given real solution in
# 1 of 100 samples (one equation) or 1 of 500 (two).
_OPENERS = ("", "Let's work it out. ", "Step by step. ", "Here is the reasoning. ", "We compute it. ")
_CLOSERS = ("", " So the answer is {answer}.", " The answer is {answer}.", " Final answer: {answer}.")
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
_EQUATION_FORMS = (
    "{a} {op} {b} = {c}",
    "{a}{op}{b} = {c}",
    "{c} ({a} {op} {b})",
    "{a} {word} {b} = {c}",
    "{a} {word} {b}, which is {c},",
)
_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\$?\d+)")


def worded_variants(solution: str, answer: int) -> list[str]:
    """Every wording of a template ``solution`` (each ends in ``#### answer``): openers × the notations
    of each equation × closers; 100 for a one-equation solution, 500 for two."""
    parts = _EQUATION.split(solution)  # text, (a, op, b, c), text, …
    texts, equations = parts[::5], [tuple(parts[i : i + 4]) for i in range(1, len(parts), 5)]
    bodies = [texts[0]]
    for (a, op, b, c), text in zip(equations, texts[1:], strict=True):
        forms = [f.format(a=a, op=op, b=b, c=c, word=_OP_WORDS[op]) for f in _EQUATION_FORMS]
        bodies = [body + form + text for body in bodies for form in forms]
    return [
        f"{opener}{body}{closer.format(answer=answer)}\n#### {answer}"
        for opener in _OPENERS
        for body in bodies
        for closer in _CLOSERS
    ]


def _in_train(key: str) -> bool:
    return split_of(key) == "train"


def write_arithmetic_jsonl(path: Path, n: int, *, seed: int, split: str, worded: bool = False) -> Path:
    """Write :func:`make_arithmetic` rows as JSON lines to ``path`` atomically; return ``path``."""
    path = Path(path)
    rows = make_arithmetic(n, seed=seed, split=split, worded=worded)
    from spaceft.rundir import atomic_path  # its temporary file follows the umask, unlike mkstemp's

    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.info("wrote %d %s arithmetic problems (seed %d) to %s", n, split, seed, path)
    return path


# A number: "1,000"-style thousands groups or plain digits, with an optional decimal part and sign.
# The minus sign only counts when it does not follow a word character ("5-3" is 5 and 3, not 5 and -3).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _normalise(number: str) -> str | None:
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def parse_answer(text: str) -> str | None:
    """The answer a response gives: the first number after the last ``####``, else the last number.

    Numbers are normalised so that equal values compare equal as strings: thousands separators
    and trailing zeros go (``"1,000"`` → ``"1000"``, ``"5.0"`` → ``"5"``, ``"2.50"`` → ``"2.5"``),
    and ``$`` or units around the number are ignored. When the last ``####`` has no number after it,
    the last number anywhere in the text counts. ``None`` when the text has no number at all.
    """
    _, marker, tail = text.rpartition("####")
    if marker:
        match = _NUMBER.search(tail)
        if match:
            return _normalise(match.group())
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the answer parsed from ``prediction`` equals ``answer`` (both normalised)."""
    predicted, gold = parse_answer(prediction), parse_answer(answer)
    return predicted is not None and predicted == gold
