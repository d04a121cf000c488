"""Chat-template tokenization: the one rule by which a (prompt, response) pair becomes token ids.

SPACE's reward compares log p_θ and log p_θt of the *same token sequences the model itself writes*.
A synthetic response is stored as the ids the opponent sampled after the generation prompt, so a real
response must be tokenized the way the model would have written it in the same place. Tokenizing the
response text on its own does not do that for most chat models: a SentencePiece (Metaspace) tokenizer
encodes a standalone "Hello" as ``▁Hello`` while after zephyr's ``<|assistant|>`` the model writes
``\\n``, ``Hello``; Llama-2's template ends an answer with ``' ' + eos`` (``… 12. ▁ </s>``). Any token that
every real response has and no synthetic one has is a marker the real-vs-synthetic classifier can learn
instead of the data (SPIN's released code had such a template mismatch).

The rule (`ChatTokenizer.pair_ids`):

1. Render the whole conversation — prompt turns plus the assistant's response — with the chat template,
   and the prompt alone with the generation prompt; tokenize both texts once, the same way.
2. The prompt ids must be a prefix of the conversation's ids. When they are not (a merge across the
   boundary, or a template that renders the last assistant turn differently from the generation prompt)
   the pair is refused with an error naming the row.
3. The response ids are what follows the prompt ids, up to and including the first end-of-turn token
   (`end_of_turn_id`); what the template puts after it (ChatML's ``\\n``) belongs to the next turn.
4. BOS exactly once, as the model was trained: texts are encoded without special tokens, and the BOS is
   prepended only when the tokenizer's normal encoding adds one and the template did not render it
   (zephyr: added; Llama-2, Llama-3, Gemma: rendered by the template, never doubled; ChatML: none).
5. The rule is checked against what the model writes: every iteration the generate stage re-renders
   the model's own samples by the rule (`template_drift`) and records how many come back as different
   ids; when most differ at the start or end of the response, the template renders the assistant turn
   otherwise than the model was trained on (Mistral-Instruct v0.1/v0.2's hub template), every real
   response carries a marker, and the run warns.

A template without a system role (Gemma's raises on one) gets the system turn merged into the first user
turn, separated by a blank line, with a warning once per tokenizer. Without any chat template the
prompt is plain text (the turns' contents, one per line) and the response ends with eos.

Over-long pairs (`tokenize_examples`): a real response longer than ``max_response_tokens`` is cut to
exactly that many tokens *without* an end-of-turn token and flagged ``truncated`` — the same shape as a
synthetic sample capped at ``max_new_tokens``, so truncation adds no marker. A prompt longer than
``max_prompt_tokens`` loses its oldest turns (whole user/assistant exchanges after the system turn) until
it fits, keeping BOS, the system turn and the question; a prompt whose last user turn alone is too long
is skipped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any

from spaceft.data import DataError, Example

logger = logging.getLogger(__name__)

__all__ = [
    "ChatTemplateError",
    "ChatTokenizer",
    "TokenizedExample",
    "end_of_turn_id",
    "render_prompt_ids",
    "template_drift",
    "tokenize_examples",
    "warn_template_drift",
]

OVERLONG_POLICIES = ("error", "skip", "truncate")
_PROBE = "spaceft end-of-turn probe"
_warned: set[str] = set()


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot turn into consistent prompt and response ids."""


@dataclass(frozen=True)
class TokenizedExample:
    """An `Example` as token ids, ready for scoring and training."""

    prompt_ids: tuple[int, ...]
    """The prompt rendered by the chat template with the assistant generation prompt appended."""
    response_ids: tuple[int, ...]
    """What follows the prompt in the rendered conversation, up to and including the end-of-turn id."""
    index: int
    """Position in the examples list: the stable prompt id used across stages."""
    truncated: bool = False
    """The response was cut to ``max_response_tokens`` (and so has no end-of-turn id, like a capped
    synthetic sample)."""


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _warn_once(tokenizer: Any, what: str, message: str) -> None:
    key = f"{_name(tokenizer)}:{what}"
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def end_of_turn_id(tokenizer: Any) -> int:
    """The token id that closes an assistant turn, which generation stops on and responses end with.

    The rule: render a probe conversation (user, assistant) with the chat template and take the first
    special token that follows the assistant's text. For ChatML models (SmolLM2, Qwen) that is
    ``<|im_end|>``, which is also their ``eos_token``; for Llama 3 it is ``<|eot_id|>``, for Mistral and
    Zephyr ``</s>``, for Gemma ``<end_of_turn>`` — the token a chat model was trained to end a turn with,
    whatever the tokenizer calls eos. Without a chat template (or one that closes turns with no special
    token) it is ``tokenizer.eos_token_id``.

    Raises:
        ValueError: when neither rule gives an id.
    """
    if getattr(tokenizer, "chat_template", None):
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
        at = rendered.rfind(_PROBE)
        if at >= 0:
            special = _special_ids(tokenizer)
            for token_id in tokenizer(rendered[at + len(_PROBE) :], add_special_tokens=False)["input_ids"]:
                if token_id in special:
                    return int(token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "cannot tell the end-of-turn token: the chat template closes an assistant turn with "
            "no special token and the tokenizer has no eos_token"
        )
    return int(tokenizer.eos_token_id)


def _bos_added_by_encoding(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer's normal encoding (``add_special_tokens=True``) prepends one."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if with_special[:1] == [bos] and without[:1] != [bos] else None


DEFAULT_TEMPLATE_DATE = "2024-07-26"
"""The date that chat templates which print today's date render (Llama 3.2/3.3 and SmolLM3 call
transformers' `strftime_now`). Fixed, so that a prompt's ids are the same on every day: resuming a run,
running a later stage, counting its cost or reusing a cached evaluation all tokenize the data again, and
synthetic samples must be scored and trained with the prompt ids they were sampled from. It is the date
Llama 3.1's own template falls back to."""


@contextmanager
def _today_is(day: date) -> Iterator[None]:
    """Inside the block, transformers' template function `strftime_now` formats `day`.

    transformers renders every value passed to a template as text, so a function cannot be handed in;
    its `strftime_now` reads `datetime.now()` of its own module, which is swapped here. Where a release
    no longer has that module attribute nothing is swapped, and tests/test_chat.py fails on the date.
    """
    from transformers.utils import chat_template_utils as templates

    real = getattr(templates, "datetime", None)
    if real is None:
        yield
        return

    class Pinned(real):  # type: ignore[misc, valid-type]
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return cls(day.year, day.month, day.day, tzinfo=tz)

    templates.datetime = Pinned
    try:
        yield
    finally:
        templates.datetime = real


class ChatTokenizer:
    """A tokenizer plus the facts the tokenization rule needs, worked out once (see the module doc)."""

    def __init__(self, tokenizer: Any, template_date: str = DEFAULT_TEMPLATE_DATE) -> None:
        self.tokenizer = tokenizer
        self.day = date.fromisoformat(template_date)
        # Llama 3.x templates take a `date_string` variable before they call strftime_now
        self.template_kwargs = {"date_string": self.day.strftime("%d %b %Y")}
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eot = end_of_turn_id(tokenizer)
        self.bos = _bos_added_by_encoding(tokenizer)
        self.supports_system = self._probe_system() if self.has_template else True
        if not self.has_template:
            _warn_once(
                tokenizer,
                "template",
                f"tokenizer {_name(tokenizer)} has no chat template; prompts are "
                "rendered as plain text '<turns>\\n' and responses end with eos",
            )

    def _probe_system(self) -> bool:
        import jinja2

        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        try:
            self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError:
            return False
        return True

    # ------------------------------------------------------------------------------------------ text

    def _turns(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        turns = [dict(m) for m in messages]
        if turns and turns[0]["role"] == "system" and not self.supports_system:
            _warn_once(
                self.tokenizer,
                "system",
                f"the chat template of {_name(self.tokenizer)} has no system "
                "role: each system turn is merged into the first user turn (a blank line between)",
            )
            system = turns.pop(0)
            if turns and turns[0]["role"] == "user":
                turns[0]["content"] = f"{system['content']}\n\n{turns[0]['content']}"
            else:
                turns.insert(0, {"role": "user", "content": system["content"]})
        return turns

    def prompt_text(self, prompt: Sequence[dict[str, str]]) -> str:
        """The prompt as the model sees it before it answers (generation prompt included)."""
        if not self.has_template:
            return "\n".join(turn["content"] for turn in prompt) + "\n"
        with _today_is(self.day):
            return self.tokenizer.apply_chat_template(
                self._turns(prompt), tokenize=False, add_generation_prompt=True, **self.template_kwargs
            )

    def conversation_text(self, prompt: Sequence[dict[str, str]], response: str) -> str:
        """The prompt and the assistant's response, rendered as one conversation."""
        if not self.has_template:
            return self.prompt_text(prompt) + response
        turns = self._turns([*prompt, {"role": "assistant", "content": response}])
        with _today_is(self.day):
            return self.tokenizer.apply_chat_template(turns, tokenize=False, **self.template_kwargs)

    # ------------------------------------------------------------------------------------------ ids

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Rendered texts to ids: no special tokens added, BOS prepended only where rule 4 says so."""
        out = []
        for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            ids = [int(i) for i in ids]
            if self.bos is not None and ids[:1] != [self.bos]:
                ids.insert(0, self.bos)
            out.append(ids)
        return out

    def prompt_ids(self, prompt: Sequence[dict[str, str]]) -> list[int]:
        return self.encode([self.prompt_text(prompt)])[0]

    def split(self, prompt_ids: list[int], whole: list[int], source: str) -> list[int]:
        """Rules 2 and 3: the response ids that follow `prompt_ids` in the conversation's ids `whole`."""
        n = len(prompt_ids)
        if whole[:n] != prompt_ids:
            at = next((i for i, (a, b) in enumerate(zip(prompt_ids, whole, strict=False)) if a != b), n)
            convert = self.tokenizer.convert_ids_to_tokens
            raise ChatTemplateError(
                f"{source}: the prompt's tokens are not a prefix of the whole conversation's tokens, so "
                f"the response cannot be cut out exactly (from token {at}: prompt "
                f"{convert(prompt_ids[at : at + 4])} vs conversation {convert(whole[at : at + 4])}). The "
                "chat template renders the assistant turn differently from its generation prompt, or a "
                "token merges across the boundary; fix the tokenizer's chat template or the row"
            )
        tail = whole[n:]
        if self.eot in tail:
            return tail[: tail.index(self.eot) + 1]
        return [*tail, self.eot]  # no template, or one that closes turns without a special token

    def pair_ids(
        self, prompt: Sequence[dict[str, str]], response: str, source: str = "example"
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of one pair by the module's rule."""
        prompt_ids, whole = self.encode([self.prompt_text(prompt), self.conversation_text(prompt, response)])
        response_ids = self.split(prompt_ids, whole, source)
        if not any(i != self.eot for i in response_ids):
            raise ChatTemplateError(
                f"{source}: the response has no tokens once rendered by the chat template"
            )
        return prompt_ids, response_ids


def render_prompt_ids(
    tokenizer: Any, prompt: Sequence[dict[str, str]], template_date: str = DEFAULT_TEMPLATE_DATE
) -> list[int]:
    """The prompt's token ids as the model sees them before it answers (see `ChatTokenizer`)."""
    return ChatTokenizer(tokenizer, template_date).prompt_ids(prompt)


def _shorter_prompts(prompt: Sequence[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The prompt without its oldest exchanges, longest first: the system turn (if any) plus the turns
    from each later user turn on."""
    system = [dict(prompt[0])] if prompt and prompt[0]["role"] == "system" else []
    turns = [dict(t) for t in prompt[len(system) :]]
    starts = [i for i, t in enumerate(turns) if t["role"] == "user" and i > 0]
    return [system + turns[i:] for i in starts]


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    overlong: str = "error",
    batch_size: int = 512,
    template_date: str = DEFAULT_TEMPLATE_DATE,
    on_bad_row: str = "error",
) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Tokenizes examples by the module's rule and applies the over-long policy.

    1. Render each prompt (with the generation prompt) and each whole conversation; encode them in
       batches; cut the response ids out (`ChatTokenizer.split`).
    2. An example whose prompt has more than ``max_prompt_tokens`` ids or whose response (end-of-turn
       included) has more than ``max_response_tokens`` is over-long, and ``overlong`` decides:
       ``"error"`` raises `DataError` naming its source; ``"skip"`` drops it; ``"truncate"`` drops the
       prompt's oldest exchanges until it fits (skipping the example if even its last user turn does
       not) and cuts the response to its first ``max_response_tokens`` ids, without end-of-turn.

    3. A row that cannot be tokenized exactly raises `DataError` naming it, or with ``on_bad_row="skip"``
       is counted in ``skipped_bad`` and dropped: a response holding the end-of-turn token's text (it
       would end the response there, unflagged), or a pair whose prompt ids are not a prefix of the
       conversation's (a token merged across the boundary).

    Returns:
        The kept examples (``index`` is the position in ``examples``) and the counts ``{"kept",
        "skipped_overlong", "skipped_bad", "truncated", "prompt_turns_dropped"}``; truncated examples
        count as kept.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {list(OVERLONG_POLICIES)}, got {overlong!r}")
    if max_prompt_tokens < 1 or max_response_tokens < 2:
        raise ValueError(
            "max_prompt_tokens must be >= 1 and max_response_tokens >= 2 (one content token and "
            f"the end-of-turn), got {max_prompt_tokens} and {max_response_tokens}"
        )
    chat = ChatTokenizer(tokenizer, template_date)
    eot_text = tokenizer.convert_ids_to_tokens(chat.eot)
    counts = {"kept": 0, "skipped_overlong": 0, "skipped_bad": 0, "truncated": 0, "prompt_turns_dropped": 0}
    tokenized: list[TokenizedExample] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        # step 1
        texts = [chat.prompt_text(ex.prompt) for ex in batch]
        texts += [chat.conversation_text(ex.prompt, ex.response) for ex in batch]
        encoded = chat.encode(texts)
        for offset, example in enumerate(batch):
            source = example.source or f"example {start + offset}"
            try:
                if chat.has_template and eot_text in example.response:
                    raise ChatTemplateError(
                        f"{source}: the response contains {eot_text!r}, the end-of-turn token's text: "
                        "it would be encoded as that token and end the response there; remove it from "
                        "the row, or set data.on_bad_row=skip"
                    )
                prompt = encoded[offset]
                response = chat.split(prompt, encoded[len(batch) + offset], source)
            except ChatTemplateError as exc:
                if on_bad_row != "skip":
                    raise DataError(str(exc)) from None
                counts["skipped_bad"] += 1
                logger.debug("skipped: %s", exc)
                continue
            # step 2
            if len(prompt) <= max_prompt_tokens and len(response) <= max_response_tokens:
                tokenized.append(TokenizedExample(tuple(prompt), tuple(response), start + offset))
                counts["kept"] += 1
                continue
            if overlong == "error":
                raise DataError(
                    f"{source}: over-long: prompt {len(prompt)} tokens "
                    f"(max_prompt_tokens={max_prompt_tokens}), response {len(response)} tokens with "
                    f"end-of-turn (max_response_tokens={max_response_tokens}); raise the limits or set "
                    "data.overlong to 'skip' or 'truncate'"
                )
            if overlong == "skip":
                counts["skipped_overlong"] += 1
                continue
            if len(prompt) > max_prompt_tokens:
                fitted = None
                for shorter in _shorter_prompts(example.prompt):
                    ids, whole = chat.encode(
                        [chat.prompt_text(shorter), chat.conversation_text(shorter, example.response)]
                    )
                    if len(ids) <= max_prompt_tokens:
                        fitted = (ids, chat.split(ids, whole, source))
                        break
                if fitted is None:  # even the last question does not fit: no honest way to cut it
                    counts["skipped_overlong"] += 1
                    continue
                prompt, response = fitted
                counts["prompt_turns_dropped"] += 1
            cut = len(response) > max_response_tokens
            if cut:
                response = response[:max_response_tokens]
            tokenized.append(TokenizedExample(tuple(prompt), tuple(response), start + offset, truncated=cut))
            counts["kept"] += 1
            counts["truncated"] += 1
    bad = f", {counts['skipped_bad']} that cannot be tokenized exactly" if counts["skipped_bad"] else ""
    logger.log(
        logging.WARNING if counts["skipped_overlong"] or counts["truncated"] or bad else logging.INFO,
        "tokenized %d examples: kept %d (truncated %d, of which %d lost old prompt turns), "
        "skipped %d over-long%s",
        len(examples),
        counts["kept"],
        counts["truncated"],
        counts["prompt_turns_dropped"],
        counts["skipped_overlong"],
        bad,
    )
    if examples and not tokenized and counts["skipped_overlong"]:
        raise DataError(
            f"every one of the {len(examples)} examples is over-long (max_prompt_tokens="
            f"{max_prompt_tokens}, max_response_tokens={max_response_tokens}); raise the limits "
            "or set overlong='truncate'"
        )
    return tokenized, counts


DRIFT_SAMPLE = 512
"""Synthetic samples `template_drift` re-renders per iteration (the first rows of the table)."""
DRIFT_WARN = 0.5
"""Share of checked samples re-rendered differently at a response boundary above which a run warns."""


def template_drift(
    chat: ChatTokenizer,
    prompts: Mapping[int, Sequence[dict[str, str]]] | Sequence[Sequence[dict[str, str]]],
    samples: Sequence[tuple[int, Sequence[int], bool]],
) -> dict[str, Any]:
    """Whether real responses, tokenized by the rule, look like what the model writes.

    The rule tokenizes a real response as the chat template renders it. That is what the model writes
    only if the template renders the assistant turn the way the model was trained on: Mistral-Instruct
    v0.1/v0.2's template renders ``[/INST]The answer`` (no space: ``The``) where the model, trained on
    ``[/INST]`` followed by ``▁The``, writes ``▁The``. Then every real response starts with a token
    that no synthetic one does, and the classifier learns that instead of the data.

    The check runs the rule on the model's own output: each of the first `DRIFT_SAMPLE` samples
    `(prompt_index, response_ids, hit_cap)` is decoded, stripped (as datasets store responses; a capped
    one only at its start), rendered after its prompt and tokenized again; a sample the model wrote the
    way the rule writes it comes back as the same ids (a capped one as a prefix). An untrained model's
    random tokens do not (a leading space is stripped away). Samples that are empty or that stopped on a
    stop id other than end-of-turn (counted by the generate stage's `other_stop_fraction`) are not
    checked.
    A healthy template leaves a few samples different, mostly in the middle (a name split into unusual
    pieces): of the 576 samples SmolLM2-135M drew at temperature 1 in the N = 16 grid of
    experiments/replicate.py, 4.3 % differed, 1.2 % at a boundary. A template that drifts changes nearly
    all of them at a boundary (the first token, or the last one or two).

    Returns ``{"checked", "mismatch_fraction", "boundary_fraction"}`` and, when some sample differs at a
    boundary, ``"example"``: its first differing tokens as written and as re-rendered.
    """
    tokenizer = chat.tokenizer
    checked = mismatched = boundary = 0
    example: dict[str, list[str]] | None = None
    for prompt_index, ids, hit_cap in samples[:DRIFT_SAMPLE]:
        written = [int(i) for i in ids]
        if not hit_cap and written[-1:] != [chat.eot]:
            continue  # stopped on eos, not end-of-turn: `other_stop_fraction` counts those
        text = tokenizer.decode(written, skip_special_tokens=True)
        text = text.lstrip() if hit_cap else text.strip()  # as a dataset stores it (a cut one keeps its end)
        if not text.strip():
            continue  # an empty answer: no dataset holds one, and the rule refuses it
        try:
            _, rendered = chat.pair_ids(prompts[prompt_index], text)
        except ChatTemplateError:
            rendered = []
        checked += 1
        same = rendered[: len(written)] == written if hit_cap else rendered == written
        if same:
            continue
        mismatched += 1
        at = next((i for i, (a, b) in enumerate(zip(written, rendered, strict=False)) if a != b),
                  min(len(written), len(rendered)))  # fmt: skip
        at_end = not hit_cap and len(written) - at <= 2 and len(rendered) - at <= 2  # the last token or two
        if at == 0 or at_end:
            boundary += 1
            if example is None:
                start = max(0, min(at, len(written) - 1) - 2)
                convert = tokenizer.convert_ids_to_tokens
                example = {"written": convert(written[start : at + 3]),
                           "rendered": convert(rendered[start : at + 3])}  # fmt: skip
    out: dict[str, Any] = {
        "checked": checked,
        "mismatch_fraction": mismatched / max(checked, 1),
        "boundary_fraction": boundary / max(checked, 1),
    }
    if example is not None:
        out["example"] = example
    return out


def warn_template_drift(drift: dict[str, Any], name: str, has_template: bool = True) -> None:
    """Log `template_drift`'s finding when most samples re-render differently at a boundary."""
    if drift["checked"] < 4 or drift["boundary_fraction"] <= DRIFT_WARN:
        return
    ex = drift.get("example", {})
    if not has_template:
        logger.warning(
            "%.0f%% of the model's own samples come back as different tokens at the start or end of the "
            "response when rendered as plain text (%s has no chat template; the model wrote %s, plain text "
            "gives %s). Real responses are tokenized that way, so each carries a token the synthetic ones "
            "do not: give the tokenizer the chat template the model was trained with",
            100 * drift["boundary_fraction"], name, ex.get("written"), ex.get("rendered"),
        )  # fmt: skip
        return
    logger.warning(
        "%.0f%% of the model's own samples come back as different tokens at the start or end of the "
        "response when the chat template of %s renders them (the model wrote %s, the template gives %s). "
        "Real responses are tokenized the template's way, so each carries a token the synthetic ones do "
        "not, and the real-vs-synthetic classifier can learn that instead of the data. Fix the chat "
        "template to render the assistant turn as the model was trained on (Mistral-Instruct v0.1/v0.2's "
        "hub template leaves out the space after [/INST]), save the tokenizer with the model, and point "
        "model.name at that directory",
        100 * drift["boundary_fraction"], name, ex.get("written"), ex.get("rendered"),
    )  # fmt: skip
