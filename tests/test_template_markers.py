"""No marker of realness: thinking templates, cut responses, edge whitespace and the model's own stop ids.

Each test builds what a real run meets (a Qwen3-style thinking template, Llama-3.1's generation_config)
offline and checks that real responses get no token the model's own samples lack, or that the run says
so."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from spaceft import chat
from spaceft.chat import ChatTokenizer, TokenizedExample, render_prompt_ids, tokenize_examples
from spaceft.configfile import config_from_dict, load_config
from spaceft.data import Example
from spaceft.drift import shared_start, template_drift, warn_template_drift
from spaceft.generate import stop_ids

from .chat_tokenizers import chatml, llama3, qwen3

HELLO = [{"role": "user", "content": "Hello"}]
ANSWER = ["The", "Ġanswer", "Ġis", "Ġ", "1", "2", ".", "<|im_end|>"]
EMPTY_THINK = ["<think>", "ĊĊ", "</think>", "ĊĊ"]


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))


# ------------------------------------------------------------------------------- thinking templates


def test_a_thinking_template_puts_its_empty_think_block_in_the_prompt_by_default() -> None:
    """Qwen3's template renders a conversation's last answer after ``<think>\\n\\n</think>\\n\\n``. With
    thinking off (the default for a template that takes the switch) the generation prompt ends with that
    block too, so it is prompt on both sides and the real response is the answer alone, as a sample is.
    With thinking on, every real response starts with the block, and the tokenizer warns at once."""
    tok = qwen3()
    prompt_ids, response_ids = ChatTokenizer(tok).pair_ids(HELLO, "The answer is 12.")
    assert tokens(tok, prompt_ids)[-5:] == ["Ċ", *EMPTY_THINK]
    assert tokens(tok, response_ids) == ANSWER
    assert render_prompt_ids(tok, HELLO) == prompt_ids  # every render gets the same variables

    chat._warned.clear()
    with _capture() as logs:
        thinking = ChatTokenizer(tok, chat_template_kwargs={"enable_thinking": True})
    _, marked = thinking.pair_ids(HELLO, "The answer is 12.")
    assert tokens(tok, marked) == [*EMPTY_THINK, *ANSWER]
    assert thinking.answer_prefix == "<think>\n\n</think>\n\n"
    assert "'<think>\\n\\n</think>\\n\\n' before every assistant answer" in logs.text
    assert ChatTokenizer(chatml()).answer_prefix == "" and "enable_thinking" not in ChatTokenizer(
        chatml()).template_kwargs  # fmt: skip


class _capture:
    """Collects spaceft.chat's warnings (caplog cannot be used inside a helper's `with`)."""

    def __enter__(self) -> _capture:
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append  # type: ignore[method-assign]
        logging.getLogger("spaceft.chat").addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("spaceft.chat").removeHandler(self.handler)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


def test_chat_template_kwargs_reach_the_prompt_and_the_whole_conversation() -> None:
    """A template whose assistant turn starts with a variable's text: given to one render only, the
    prompt would not be a prefix of the conversation (or the text would open every real response)."""
    tok = chatml()
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
        "{{ lead }}{% endif %}{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' + lead }}{% endif %}"
    )
    example = Example(tuple(HELLO), "The answer is 12.")
    [pair], counts = tokenize_examples(tok, [example], max_prompt_tokens=64, max_response_tokens=16,
                                       chat_template_kwargs={"lead": "sure:\n"})  # fmt: skip
    assert tokens(tok, pair.response_ids) == ANSWER and counts["kept"] == 1
    assert tokens(tok, pair.prompt_ids)[-3:] == ["sure", ":", "Ċ"]

    cfg = load_config(None, ["data.train=x.jsonl", "data.chat_template_kwargs.enable_thinking=true"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": True}
    assert config_from_dict({"data": {"train": "x"}}).data.chat_template_kwargs == {}
    with pytest.raises(ValueError, match="chat_template_kwargs must map"):
        config_from_dict({"data": {"train": "x", "chat_template_kwargs": 3}})


def test_shared_start_is_the_longest_start_most_responses_have() -> None:
    """[1 2 3], [1 2 4], [1 5], [6]: 3 of 4 start with 1 (75 % > 50 %), only 2 of 4 with 1 2 (not more
    than half), so the shared start is (1,) at 0.75; with no common first token it is empty."""
    assert shared_start([[1, 2, 3], [1, 2, 4], [1, 5], [6]]) == ((1,), 0.75)
    assert shared_start([[1, 2, 3], [1, 2, 4], [1, 2], [6]]) == ((1, 2), 0.75)
    assert shared_start([[1], [2], [3]]) == ((), 0.0)


def test_the_drift_check_warns_when_real_responses_share_a_start_the_samples_lack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Thinking on: every real response starts with the empty think block, while the model's samples
    start with ``<think>`` and its reasoning. Thinking off: the samples are answers, as the real ones."""
    tok = qwen3()
    texts = ["The answer is 12.", "Hello world, thanks.", "Sure, here you are: 7.", "please explain it"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    reasoning = [tok(f"<think>\nplease explain</think>\n\n{t}", add_special_tokens=False)["input_ids"] + [eot]
                 for t in texts]  # fmt: skip
    thinking = ChatTokenizer(tok, chat_template_kwargs={"enable_thinking": True})
    real = [thinking.pair_ids(HELLO, t)[1] for t in texts]
    with caplog.at_level(logging.WARNING, logger="spaceft.drift"):
        drift = template_drift(thinking, [HELLO], [(0, ids, False) for ids in reasoning], real)
        warn_template_drift(drift, "qwen3")
    assert drift["real_start"] == [*EMPTY_THINK] and drift["real_start_fraction"] == 1.0
    assert drift["sample_start_fraction"] == 0.0
    assert "100% of the real responses begin with the tokens" in caplog.text

    caplog.clear()
    off = ChatTokenizer(tok)
    real = [off.pair_ids(HELLO, t)[1] for t in texts]
    with caplog.at_level(logging.WARNING, logger="spaceft.drift"):
        drift = template_drift(off, [HELLO], [(0, ids, False) for ids in real], real)
        warn_template_drift(drift, "qwen3")
    assert drift["real_start_fraction"] == 0.0 and caplog.text == ""  # no first token is that common


# ------------------------------------------------------------------------ cut responses, whitespace


def _cut(n: int) -> TokenizedExample:
    return TokenizedExample((1, 2), tuple(range(10, 10 + n)), 0, truncated=True)


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"generation.max_new_tokens": 12}, True),  # cut at 8, samples capped at 12
        ({"generation.max_new_tokens": 6}, True),  # cut at 8, no sample that long
        ({"generation.max_new_tokens": 8}, False),  # the same cap on both sides
        ({"generation.max_new_tokens": 12, "train.loss": "sft"}, False),  # no synthetic side
    ],
)
def test_responses_cut_at_another_length_than_the_samples_are_refused(settings: dict, refused: bool) -> None:
    from spaceft.workspace import _refuse_cut_unlike_samples

    overrides = ["data.train=x.jsonl", "data.overlong=truncate", "data.max_response_tokens=8"]
    cfg = load_config(None, [*overrides, *(f"{k}={v}" for k, v in settings.items())])
    if refused:
        with pytest.raises(ValueError, match=r"cut 1 of 2 real responses to data\.max_response_tokens=8"):
            _refuse_cut_unlike_samples(cfg, [_cut(8), TokenizedExample((1,), (5, 6), 1)])
    else:
        _refuse_cut_unlike_samples(cfg, [_cut(8)])
    _refuse_cut_unlike_samples(cfg, [TokenizedExample((1,), (5, 6), 1)])  # nothing cut: no marker


def test_real_responses_with_edge_whitespace_are_counted_and_can_be_stripped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ChatML keeps a leading space and a trailing newline (Ġ and Ċ before <|im_end|>, tokens the model
    hardly ever writes there); Llama 3's template trims them, so there they are not counted."""
    tok = chatml()
    examples = [Example(tuple(HELLO), " The answer is 12.\n"), Example(tuple(HELLO), "Hello world")]
    limits = {"max_prompt_tokens": 64, "max_response_tokens": 32}
    with caplog.at_level(logging.WARNING, logger="spaceft.chat"):
        kept, counts = tokenize_examples(tok, examples, **limits)
    assert counts["edge_whitespace"] == 1 and "data.strip_responses=true" in caplog.text
    assert tokens(tok, kept[0].response_ids) == ["ĠThe", *ANSWER[1:-1], "Ċ", "<|im_end|>"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spaceft.chat"):
        stripped, counts = tokenize_examples(tok, examples, strip_responses=True, **limits)
    assert counts["edge_whitespace"] == 1 and caplog.text == ""
    assert tokens(tok, stripped[0].response_ids) == ANSWER
    assert stripped[1] == kept[1]
    _, counts = tokenize_examples(llama3(), examples, **limits)
    assert counts["edge_whitespace"] == 0


# --------------------------------------------------------------------------------- the model's stop ids


def test_generation_stops_on_the_end_ids_of_the_models_generation_config(tmp_path: Path) -> None:
    """Llama-3.1 ends a turn on <|eot_id|>, its tokenizer's eos is <|end_of_text|>, and its
    generation_config lists <|eom_id|> too (the end of a tool call): all three stop generation."""
    from spaceft.configfile import config_from_dict as build
    from spaceft.rundir import Manifest
    from spaceft.workspace import Workspace

    tok = llama3()
    tok.add_special_tokens({"additional_special_tokens": ["<|eom_id|>"]})
    eot, eom, end = tok.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
    model = tmp_path / "llama31"
    model.mkdir()
    assert stop_ids(eot, tok, str(model)) == sorted({eot, end})  # no generation_config.json
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, eom, eot]}))
    assert stop_ids(eot, tok, str(model)) == sorted({eot, eom, end})
    cfg = build({"data": {"train": "x.jsonl"}})
    ws = Workspace(cfg, Manifest(tmp_path / "manifest.json", {"iterations": {}}), str(model), tok, [], [])
    assert ws.stop_ids == sorted({eot, eom, end})
