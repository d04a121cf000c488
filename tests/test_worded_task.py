"""The worded arithmetic task (spaceft.tasks, worded=True): the same problems as the arithmetic task,
each real solution drawn from many equally likely wordings, so a sample rarely equals it verbatim."""

from __future__ import annotations

from spaceft.tasks import make_arithmetic, parse_answer, worded_variants


def test_the_same_problems_with_reworded_solutions_that_keep_the_answer() -> None:
    plain = make_arithmetic(40, seed=3, split="train")
    worded = make_arithmetic(40, seed=3, split="train", worded=True)
    assert [r["messages"][0] for r in worded] == [r["messages"][0] for r in plain]
    assert [r["answer"] for r in worded] == [r["answer"] for r in plain]
    differ = sum(w["messages"][1] != p["messages"][1] for w, p in zip(worded, plain, strict=True))
    assert differ >= 30  # 1 wording in 100 (or 500) is the template's own
    for row in worded:
        solution = row["messages"][1]["content"]
        assert solution.endswith(f"\n#### {row['answer']}") and parse_answer(solution) == row["answer"]


def test_variants_count_openers_notations_and_closers() -> None:
    """5 openers × 5 notations per equation × 4 closers: 100 with one equation, 5 × 5 × 5 × 4 = 500 with
    two; each one distinct, each ending in the answer line."""
    one = worded_variants("Each friend gets 12 / 3 = 4 cookies.", 4)
    two = worded_variants("4 of them cost 4 * 3 = $12. The change is 20 - 12 = $8.", 8)
    assert len(one) == len(set(one)) == 100 and len(two) == len(set(two)) == 500
    assert (
        "Let's work it out. Each friend gets 12 divided by 3, which is 4, cookies. The answer is 4.\n#### 4"
        in one
    )
    assert "4 of them cost $12 (4 * 3). The change is 20-12 = $8.\n#### 8" in two
    assert all(v.endswith("\n#### 8") for v in two)


def test_seeded_and_prefix_stable() -> None:
    a = make_arithmetic(12, seed=0, split="test", worded=True)
    assert make_arithmetic(12, seed=0, split="test", worded=True) == a
    assert make_arithmetic(5, seed=0, split="test", worded=True) == a[:5]


def test_a_model_that_matched_the_data_would_rarely_repeat_the_real_solution() -> None:
    """Each real solution is one of its template's V wordings, drawn uniformly, so an exact model
    reproduces it with probability 1/V: the expected verbatim rate is the mean of 1/V, here the mix of
    one-step (1/100) and two-step (1/500) problems: 0.6 × 0.01 + 0.4 × 0.002 ≈ 0.0068."""
    plain = make_arithmetic(200, seed=0, split="test")
    worded = make_arithmetic(200, seed=0, split="test", worded=True)
    inverse = []
    for p, w in zip(plain, worded, strict=True):
        template = p["messages"][1]["content"].split("\n####")[0]
        variants = worded_variants(template, int(p["answer"]))
        assert w["messages"][1]["content"] in variants
        inverse.append(1 / len(variants))
    rate = sum(inverse) / len(inverse)
    assert 0.005 < rate < 0.0085
