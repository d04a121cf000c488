"""Tests for spaceft.chat: one tokenization rule for every chat template.

The five tokenizers of `chat_tokenizers` reproduce, offline, how ChatML, zephyr (SentencePiece), Llama-2
(legacy SentencePiece), Llama-3 and Gemma encode a conversation. For each, the real pair's ids must be
the ids of the whole rendered conversation — what the model writes after its generation prompt — with
BOS exactly once; the expected token strings of the single-turn case are written out by hand.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from spaceft.chat import ChatTokenizer, end_of_turn_id, render_prompt_ids, tokenize_examples
from spaceft.data import DataError, Example
from spaceft.drift import template_drift, warn_template_drift

from .chat_tokenizers import BUILDERS
from .test_data import PAIRS, make_tokenizer


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request: pytest.FixtureRequest) -> tuple[str, PreTrainedTokenizerFast]:
    return request.param, BUILDERS[request.param]()


# Hand-written: the tokens of user "Hello" -> assistant "The answer is 12." for each family.
EXPECTED = {
    "chatml": (
        ["<|im_start|>", "u", "se", "r", "Ċ", "Hello", "<|im_end|>", "Ċ",
         "<|im_start|>", "ass", "is", "t", "an", "t", "Ċ"],
        ["The", "Ġanswer", "Ġis", "Ġ", "1", "2", ".", "<|im_end|>"],
    ),
    # BOS added (the template leaves it out); the model writes "\n" then "The" (no ▁) after <|assistant|>
    "zephyr": (
        ["<s>", "<|user|>", "<0x0A>", "Hello", "</s>", "<0x0A>", "<|assistant|>"],
        ["<0x0A>", "The", "▁answer", "▁is", "▁", "1", "2", ".", "</s>"],
    ),
    # BOS rendered by the template (not doubled); the answer ends "▁ </s>" (the template's ' ' + eos)
    "llama2": (
        ["<s>", "▁", "[", "INST", "]", "▁Hello", "▁", "[", "/", "INST", "]"],
        ["▁The", "▁answer", "▁is", "▁", "1", "2", ".", "▁", "</s>"],
    ),
    "llama3": (
        ["<|begin_of_text|>", "<|start_header_id|>", "u", "se", "r", "<|end_header_id|>", "Ċ", "Ċ", "Hello",
         "<|eot_id|>", "<|start_header_id|>", "ass", "is", "t", "an", "t", "<|end_header_id|>", "Ċ", "Ċ"],
        ["The", "Ġanswer", "Ġis", "Ġ", "1", "2", ".", "<|eot_id|>"],
    ),
    # the template glues the answer to [/INST]: "The", where the model writes "▁The" (see the drift tests)
    "mistral": (
        ["<s>", "▁", "[", "INST", "]", "▁Hello", "▁", "[", "/", "INST", "]"],
        ["The", "▁answer", "▁is", "▁", "1", "2", ".", "</s>"],
    ),
    "gemma": (
        ["<bos>", "<start_of_turn>", "u", "se", "r", "<0x0A>", "Hello", "<end_of_turn>", "<0x0A>",
         "<start_of_turn>", "model", "<0x0A>"],
        ["The", "▁answer", "▁is", "▁", "1", "2", ".", "<end_of_turn>"],
    ),
}  # fmt: skip

# The old rule tokenized the response on its own: tokenizer(response) + end-of-turn.
OLD_RULE_DIFFERS = {"zephyr", "llama2", "mistral"}

MULTI_TURN = (
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Grüße! What is the answer?"},
    {"role": "assistant", "content": "Sure, café."},
    {"role": "user", "content": "please explain it in one sentence, naïve über"},
)


def tokens(tokenizer: PreTrainedTokenizerFast, ids: list[int] | tuple[int, ...]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))


def test_single_turn_tokens_are_what_the_model_writes(family: tuple[str, PreTrainedTokenizerFast]) -> None:
    name, tokenizer = family
    prompt_ids, response_ids = ChatTokenizer(tokenizer).pair_ids(
        [{"role": "user", "content": "Hello"}], "The answer is 12."
    )
    assert (tokens(tokenizer, prompt_ids), tokens(tokenizer, response_ids)) == EXPECTED[name]
    old = [*tokenizer("The answer is 12.", add_special_tokens=False)["input_ids"], end_of_turn_id(tokenizer)]
    assert (old != response_ids) == (name in OLD_RULE_DIFFERS)


def test_multi_turn_pair_is_the_whole_conversation(family: tuple[str, PreTrainedTokenizerFast]) -> None:
    """prompt + response ids == the rendered conversation's ids up to the end-of-turn, BOS once, and the
    response decodes to the template's rendering of the answer."""
    name, tokenizer = family
    response = "The answer is 12, Grüße."
    example = Example(MULTI_TURN, response, None, "conv.jsonl:7")
    [item], counts = tokenize_examples(tokenizer, [example], max_prompt_tokens=400, max_response_tokens=100)
    assert counts["kept"] == 1 and not item.truncated
    c = ChatTokenizer(tokenizer)
    text = c.conversation_text(MULTI_TURN, response)
    whole = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if whole[:2] == [bos, bos]:  # the template rendered BOS and encoding added another
        whole = whole[1:]
    n = len(item.prompt_ids) + len(item.response_ids)
    assert list(item.prompt_ids + item.response_ids) == whole[:n]
    eot = end_of_turn_id(tokenizer)
    assert item.response_ids[-1] == eot and eot not in item.response_ids[:-1]
    assert list(item.prompt_ids) == render_prompt_ids(tokenizer, MULTI_TURN)
    assert tokenizer.decode(item.response_ids, skip_special_tokens=True).strip() == response
    if name != "chatml":  # Llama-2's format opens every [INST] exchange with BOS; the others once
        assert item.prompt_ids[0] == bos and item.prompt_ids[1] != bos
        assert (item.prompt_ids + item.response_ids).count(bos) == (2 if name == "llama2" else 1)
    assert "café" in tokenizer.decode(item.prompt_ids)


def test_a_template_without_system_role_merges_the_system_turn(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = BUILDERS["gemma"]()
    tokenizer.name_or_path = "gemma-like-for-merge-test"
    with caplog.at_level(logging.WARNING, logger="spaceft.chat"):
        text = ChatTokenizer(tokenizer).prompt_text(MULTI_TURN)
        ChatTokenizer(tokenizer).prompt_text(MULTI_TURN)
    assert text.startswith("<bos><start_of_turn>user\nYou are helpful.\n\nGrüße! What is the answer?")
    assert "system" not in text
    assert sum("no system role" in r.getMessage() for r in caplog.records) == 1


def test_prompt_that_is_not_a_prefix_is_refused_naming_the_row() -> None:
    # the generation prompt ends "assistant\n" but an assistant turn is rendered "assistant: ..."
    tokenizer = make_tokenizer(
        chat_template=(
            "{% for m in messages %}{% if m['role'] == 'assistant' %}"
            "{{ '<|im_start|>assistant: ' + m['content'] }}{% else %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )
    )
    example = Example(({"role": "user", "content": "q"},), "a", None, "bad.jsonl:3")
    with pytest.raises(DataError, match=r"^bad\.jsonl:3: the prompt's tokens are not a prefix"):
        tokenize_examples(tokenizer, [example], max_prompt_tokens=64, max_response_tokens=64)
    # data.on_bad_row=skip: the row is counted and dropped, the others are kept
    good = make_tokenizer()
    rows = [example, Example(({"role": "user", "content": "q"},), "fine", None, "bad.jsonl:4")]
    kept, counts = tokenize_examples(tokenizer, rows, max_prompt_tokens=64, max_response_tokens=64,
                                     on_bad_row="skip")  # fmt: skip
    assert kept == [] and counts["skipped_bad"] == 2  # this template breaks every row
    kept, counts = tokenize_examples(good, rows, max_prompt_tokens=64, max_response_tokens=64,
                                     on_bad_row="skip")  # fmt: skip
    assert [k.index for k in kept] == [0, 1] and counts["skipped_bad"] == 0


def test_a_response_holding_the_end_of_turn_text_is_refused_or_skipped() -> None:
    """'<|im_end|>' typed inside an answer would be encoded as the end-of-turn token and end the response
    there, unflagged: the row is refused naming it, or counted and dropped under on_bad_row=skip."""
    tokenizer = make_tokenizer()
    rows = [
        Example(({"role": "user", "content": "q"},), "Write <|im_end|> at the end", None, "d.jsonl:1"),
        Example(({"role": "user", "content": "q"},), "fine", None, "d.jsonl:2"),
    ]
    with pytest.raises(DataError, match=r"^d\.jsonl:1: the response contains '<\|im_end\|>'"):
        tokenize_examples(tokenizer, rows, max_prompt_tokens=64, max_response_tokens=64)
    kept, counts = tokenize_examples(tokenizer, rows, max_prompt_tokens=64, max_response_tokens=64,
                                     on_bad_row="skip")  # fmt: skip
    assert [k.index for k in kept] == [1] and counts["skipped_bad"] == 1


def test_chatml_pairs_keep_their_previous_ids() -> None:
    """On a ChatML byte-level tokenizer the rule gives what the old one did: tokenizer(response) + eot."""
    tokenizer = make_tokenizer()
    examples = [Example(p, r, a, f"f.jsonl:{i + 1}") for i, (p, r, a) in enumerate(PAIRS)]
    tokenized, counts = tokenize_examples(tokenizer, examples, max_prompt_tokens=512, max_response_tokens=64)
    assert counts == {
        "kept": 3, "skipped_overlong": 0, "skipped_bad": 0,
        "truncated": 0, "prompt_turns_dropped": 0, "edge_whitespace": 0,
    }
    eot = end_of_turn_id(tokenizer)
    for position, (example, item) in enumerate(zip(examples, tokenized, strict=True)):
        assert item.index == position
        assert list(item.prompt_ids) == tokenizer.apply_chat_template(
            list(example.prompt), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert list(item.response_ids) == [
            *tokenizer(example.response, add_special_tokens=False)["input_ids"],
            eot,
        ]


def test_end_of_turn_id_is_the_token_that_closes_an_assistant_turn() -> None:
    expected = {"chatml": "<|im_end|>", "zephyr": "</s>", "llama2": "</s>", "llama3": "<|eot_id|>",
                "gemma": "<end_of_turn>", "mistral": "</s>"}  # fmt: skip
    for name, build in BUILDERS.items():
        tokenizer = build()
        assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == expected[name], name
    assert end_of_turn_id(BUILDERS["llama3"]()) != BUILDERS["llama3"]().eos_token_id
    plain = make_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert end_of_turn_id(plain) == plain.eos_token_id  # turns closed by no special token: eos


# ------------------------------------------------------------------------------------------ over-long


def overlong_examples() -> list[Example]:
    """Byte-level tokens: 'ok' renders to 21 prompt ids and 'fine' to 4 + 1 response ids."""
    return [
        Example(({"role": "user", "content": "ok"},), "fine", None, "f.jsonl:1"),
        Example(({"role": "user", "content": "a much longer question"},), "fine", None, "f.jsonl:2"),
        Example(({"role": "user", "content": "ok"},), "a much longer answer", None, "f.jsonl:3"),
    ]


def test_overlong_error_names_the_source() -> None:
    with pytest.raises(DataError, match=r"^f\.jsonl:2: over-long: prompt 41 tokens \(max_prompt_tokens=21\)"):
        tokenize_examples(make_tokenizer(), overlong_examples(), max_prompt_tokens=21, max_response_tokens=5)


def test_overlong_skip_keeps_stable_indices() -> None:
    tokenizer = make_tokenizer()
    tokenized, counts = tokenize_examples(
        tokenizer, overlong_examples(), max_prompt_tokens=21, max_response_tokens=5, overlong="skip"
    )
    assert counts == {
        "kept": 1, "skipped_overlong": 2, "skipped_bad": 0,
        "truncated": 0, "prompt_turns_dropped": 0, "edge_whitespace": 0,
    }
    assert [item.index for item in tokenized] == [0]
    with pytest.raises(DataError, match="every one of the 3 examples is over-long"):
        tokenize_examples(
            tokenizer, overlong_examples(), max_prompt_tokens=3, max_response_tokens=2, overlong="skip"
        )


def test_truncated_response_ends_like_a_capped_sample() -> None:
    """A cut real response is its first max_response_tokens ids with no end-of-turn (a synthetic sample
    capped at max_new_tokens has none either), flagged truncated; a single-turn prompt that is too long
    cannot be cut honestly and is skipped."""
    tokenizer = make_tokenizer()
    tokenized, counts = tokenize_examples(
        tokenizer, overlong_examples(), max_prompt_tokens=21, max_response_tokens=5, overlong="truncate"
    )
    assert counts == {
        "kept": 2, "skipped_overlong": 1, "skipped_bad": 0,
        "truncated": 1, "prompt_turns_dropped": 0, "edge_whitespace": 0,
    }
    assert [t.index for t in tokenized] == [0, 2]
    assert tokenized[1].response_ids == tuple(tokenizer("a muc", add_special_tokens=False)["input_ids"])
    assert tokenized[1].truncated and not tokenized[0].truncated
    assert end_of_turn_id(tokenizer) not in tokenized[1].response_ids


def test_truncated_prompt_drops_its_oldest_exchanges_not_bos_or_system(
    family: tuple[str, PreTrainedTokenizerFast],
) -> None:
    name, tokenizer = family
    c = ChatTokenizer(tokenizer)
    last = [MULTI_TURN[0], MULTI_TURN[3]]  # the system turn and the last question
    limit = len(c.prompt_ids(last))
    assert limit < len(c.prompt_ids(MULTI_TURN))
    [item], counts = tokenize_examples(
        tokenizer,
        [Example(MULTI_TURN, "Sure.")],
        max_prompt_tokens=limit,
        max_response_tokens=50,
        overlong="truncate",
    )
    assert counts["prompt_turns_dropped"] == 1
    assert list(item.prompt_ids) == c.prompt_ids(last)
    assert "You are helpful." in tokenizer.decode(item.prompt_ids) and "café" not in tokenizer.decode(
        item.prompt_ids
    )
    if name != "chatml":
        assert item.prompt_ids[0] == tokenizer.bos_token_id


def test_tokenize_bad_arguments() -> None:
    with pytest.raises(ValueError, match="overlong must be one of"):
        tokenize_examples(
            make_tokenizer(), overlong_examples(), max_prompt_tokens=8, max_response_tokens=8, overlong="clip"
        )
    with pytest.raises(ValueError, match="max_response_tokens >= 2"):
        tokenize_examples(make_tokenizer(), overlong_examples(), max_prompt_tokens=8, max_response_tokens=1)


def test_no_chat_template_falls_back_to_plain_text(caplog: pytest.LogCaptureFixture) -> None:
    bare = make_tokenizer(chat_template=None)
    bare.name_or_path = "bare-test-tokenizer"

    def ids(text: str) -> list[int]:
        return bare(text, add_special_tokens=False)["input_ids"]

    with caplog.at_level(logging.WARNING, logger="spaceft.chat"):
        first = render_prompt_ids(bare, [{"role": "user", "content": "hi"}])
        second = render_prompt_ids(
            bare, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
        )
    assert first == ids("hi\n")
    assert second == ids("s\nq\n")
    assert sum("no chat template" in r.getMessage() for r in caplog.records) == 1
    tokenized, _ = tokenize_examples(
        bare,
        [Example(({"role": "user", "content": "hi"},), "yo")],
        max_prompt_tokens=8,
        max_response_tokens=8,
    )
    assert tokenized[0].response_ids == (*ids("yo"), bare.eos_token_id)


# ------------------------------------------------------------------------------------------ end to end


def write_family_model(tmp: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A 2-layer random Llama over `tokenizer`'s vocabulary, saved with it."""
    out = tmp / "model"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip  (its generation_config's stop ids)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_rewards_start_at_zero_for_every_template(
    family: tuple[str, PreTrainedTokenizerFast], tmp_path: Path
) -> None:
    """`spaceft run` on a 2-layer model with each tokenizer: multi-turn non-ASCII prompts, SPACE with
    K = 2; at the first step the policy equals the opponent, so both rewards are 0."""
    from spaceft.cli import main
    from spaceft.rundir import read_table

    from .conftest import tiny_overrides

    name, tokenizer = family
    model_dir = write_family_model(tmp_path, tokenizer)
    rows = [
        {
            "messages": [
                *MULTI_TURN[: 1 + 2 * (i % 2)],
                {"role": "user", "content": f"what is {i} über?"},
                {"role": "assistant", "content": f"The answer is {i}, café."},
            ]
        }
        for i in range(4)
    ]
    data_file = tmp_path / "conv.jsonl"
    data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    overrides = tiny_overrides(
        tmp_path,
        model_dir,
        **{
            "data.train": str(data_file),
            "data.eval": "null",
            "generation.num_samples": 2,
            "train.mu": 2.0,
            "selfplay.iterations": 1,
            "name": f"chat-{name}",
        },
    )
    assert main(["-q", "run", "tiny", *overrides]) == 0
    run_dir = tmp_path / "runs" / f"chat-{name}"
    first = json.loads((run_dir / "iter_0" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/real"]) < 1e-5 and abs(first["rewards/synthetic"]) < 1e-5
    assert first["rewards/abs_mean"] < 1e-5
    eot = end_of_turn_id(tokenizer)
    samples = read_table(run_dir / "iter_0" / "synthetic.parquet")
    for sample in samples:
        ids = sample["response_ids"]
        assert sample["hit_cap"] == (eot not in ids and tokenizer.eos_token_id not in ids)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    drift = manifest["iterations"]["0"]["generate"]["template_drift"]  # the random model's samples
    prompts = [tuple(r["messages"][:-1]) for r in rows]
    drawn = [(r["prompt_index"], r["response_ids"], r["hit_cap"]) for r in samples]
    again = template_drift(ChatTokenizer(tokenizer), prompts, drawn)
    assert {k: drift[k] for k in again} == again and len(samples) == 8
    assert drift["real_start_fraction"] == 1.0  # every real answer starts "The answer is"


# template_drift: the rule applied to the model's own samples. Each sample is (prompt index, ids, hit_cap).
DRIFT_TEXTS = ["The answer is 12.", "Hello world, thanks.", "Sure, here you are: 7.", "please explain it"]


def _rule_written(c: ChatTokenizer, prompt: list[dict[str, str]]) -> list[list[int]]:
    return [c.pair_ids(prompt, text)[1] for text in DRIFT_TEXTS]


def test_a_model_that_writes_as_the_template_renders_shows_no_drift(
    family: tuple[str, PreTrainedTokenizerFast], caplog: pytest.LogCaptureFixture
) -> None:
    name, tokenizer = family
    c = ChatTokenizer(tokenizer)
    prompts = [[{"role": "user", "content": "Hello"}], list(MULTI_TURN)]
    samples = [(i % 2, ids, False) for i, ids in enumerate(_rule_written(c, prompts[0]) * 2)]
    capped = [(0, ids[:3], True) for ids in _rule_written(c, prompts[0])]  # a cut sample is a prefix
    with caplog.at_level(logging.WARNING, logger="spaceft.chat"):
        drift = template_drift(c, prompts, samples + capped)
        warn_template_drift(drift, name)
    assert drift == {"checked": 12, "mismatch_fraction": 0.0, "boundary_fraction": 0.0}
    assert "come back as different tokens" not in caplog.text


def test_mistrals_hub_template_drifts_from_what_the_model_writes(caplog: pytest.LogCaptureFixture) -> None:
    """Mistral-Instruct was trained on [/INST] followed by the answer tokenized on its own (▁The …); the
    hub template renders [/INST]The …, so every real response would start with a token no sample has."""
    from .chat_tokenizers import mistral

    tokenizer = mistral()
    c = ChatTokenizer(tokenizer)
    prompt = [{"role": "user", "content": "Hello"}]
    eos = tokenizer.eos_token_id
    trained = [[*tokenizer(text, add_special_tokens=False)["input_ids"], eos] for text in DRIFT_TEXTS]
    assert tokens(tokenizer, trained[0])[:2] == ["▁The", "▁answer"]
    with caplog.at_level(logging.WARNING, logger="spaceft.chat"):
        samples = [(0, ids, False) for ids in trained] + [(0, trained[0][:2], True)]
        drift = template_drift(c, [prompt], samples)
        warn_template_drift(drift, "mistral-instruct")
    assert drift["checked"] == 5 and drift["mismatch_fraction"] == drift["boundary_fraction"] == 1.0
    assert drift["example"] == {"written": ["▁The", "▁answer", "▁is"], "rendered": ["The", "▁answer", "▁is"]}
    assert "100% of the model's own samples" in caplog.text and "[/INST]" in caplog.text


def test_template_drift_tells_boundaries_from_an_unusual_split_in_the_middle() -> None:
    """A sample that splits a word unusually (▁ answer for ▁answer) is re-rendered differently, but not
    at a boundary; one that leaves out the ' ' Llama-2's template puts before </s> differs at the end."""
    from .chat_tokenizers import llama2

    tokenizer = llama2()
    c = ChatTokenizer(tokenizer)
    prompt = [{"role": "user", "content": "Hello"}]
    rule = _rule_written(c, prompt)[0]  # ▁The ▁answer ▁is ▁ 1 2 . ▁ </s>
    to_ids = tokenizer.convert_tokens_to_ids
    split = [rule[0], *to_ids(["▁", "answer"]), *rule[2:]]
    no_space_at_end = [*rule[:-2], rule[-1]]
    drift = template_drift(c, [prompt], [(0, split, False), (0, no_space_at_end, False), (0, rule, False)])
    assert drift["checked"] == 3
    assert drift["mismatch_fraction"] == pytest.approx(2 / 3)
    assert drift["boundary_fraction"] == pytest.approx(1 / 3)
    assert drift["example"] == {"written": ["2", ".", "</s>"], "rendered": ["2", ".", "▁", "</s>"]}
    warn_template_drift(drift, "llama2")  # a third at a boundary: below the warning's threshold


def test_a_template_that_prints_today_renders_the_pinned_date_every_day() -> None:
    """Llama 3.2/3.3 and SmolLM3 templates call strftime_now: a prompt tokenized on another day (a resume,
    a later stage, the cost count) must still have the ids its synthetic samples were drawn from."""
    from datetime import date

    from .chat_tokenizers import llama3

    tok = llama3()
    header = "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\n"
    dated = header + 'Today Date: {{ strftime_now("%d %b %Y") }}'
    tok.chat_template = dated + "<|eot_id|>" + tok.chat_template.removeprefix("{{ bos_token }}")
    example = Example(prompt=[{"role": "user", "content": "Hello"}], response="Hi")
    today = date.today().strftime("%d %b %Y")
    text = ChatTokenizer(tok).prompt_text(example.prompt)
    assert "Today Date: 26 Jul 2024" in text and (today == "26 Jul 2024" or today not in text)
    assert "Today Date: 02 Jan 2025" in ChatTokenizer(tok, "2025-01-02").prompt_text(example.prompt)
    [pinned], _ = tokenize_examples(tok, [example], max_prompt_tokens=200, max_response_tokens=20)
    [later], _ = tokenize_examples(tok, [example], max_prompt_tokens=200, max_response_tokens=20,
                                   template_date="2025-01-02")  # fmt: skip
    assert pinned.response_ids == later.response_ids and pinned.prompt_ids != later.prompt_ids
    assert render_prompt_ids(tok, example.prompt) == list(pinned.prompt_ids)


def test_empty_samples_and_samples_ending_on_eos_are_not_taken_for_drift() -> None:
    """Llama 3 ends a turn with <|eot_id|> but may stop on <|end_of_text|>: such a sample differs from any
    re-rendering in its last token (the generate stage counts it in `other_stop_fraction`), and an empty
    answer has no rendering at all; neither says anything about the template."""
    from .chat_tokenizers import llama3

    tokenizer = llama3()
    c = ChatTokenizer(tokenizer)
    prompt = [{"role": "user", "content": "Hello"}]
    rule = _rule_written(c, prompt)
    eos = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    on_eos = [(0, [*ids[:-1], eos], False) for ids in rule]
    drift = template_drift(c, [prompt], [*on_eos, (0, [c.eot], False), (0, rule[0], False)])
    assert drift == {"checked": 1, "mismatch_fraction": 0.0, "boundary_fraction": 0.0}


def test_the_drift_warning_names_the_missing_template_when_there_is_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    drift = {"checked": 5, "mismatch_fraction": 1.0, "boundary_fraction": 1.0,
             "example": {"written": ["▁The"], "rendered": ["The"]}}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="spaceft.chat"):
        warn_template_drift(drift, "plain-model", has_template=False)
    assert "plain-model has no chat template" in caplog.text and "[/INST]" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spaceft.chat"):
        warn_template_drift({**drift, "checked": 3}, "plain-model", has_template=False)
    assert caplog.text == ""  # too few samples checked to say anything
