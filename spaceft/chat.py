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
5. The rule is checked against what the model writes (`spaceft.drift`): every iteration the generate
   stage re-renders the model's own samples by the rule and records how many come back as different
   ids, and how the samples start compared with the start most real responses share; a template that
   renders the assistant turn otherwise than the model was trained on (Mistral-Instruct v0.1/v0.2's hub
   template) gives every real response a marker, and the run warns.
6. Every render, the prompt's and the whole conversation's, gets the same template variables:
   ``data.chat_template_kwargs``, plus ``enable_thinking=False`` for templates that take that switch
   (Qwen3, SmolLM3) unless it is given (`template_kwargs` says why). A template that still puts text
   between the generation prompt and a real answer (an empty think block with thinking on) is warned
   about when the tokenizer is first used.

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
from dataclasses import dataclass, replace
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
    "template_kwargs",
    "tokenize_examples",
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


def takes_thinking_switch(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template reads an `enable_thinking` variable (Qwen3, SmolLM3 and
    the hybrid reasoning models after them)."""
    return "enable_thinking" in str(getattr(tokenizer, "chat_template", None) or "")


def template_kwargs(tokenizer: Any, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The variables every render of this tokenizer's template gets: `given` (data.chat_template_kwargs),
    and ``enable_thinking=False`` where the template takes that switch and `given` does not set it.

    Why off: a thinking template renders the last assistant turn of a conversation as ``<think>\n\n
    </think>\n\n`` + answer, while with thinking on its generation prompt ends at ``<|im_start|>
    assistant\n`` and the model goes on to write its reasoning. Every real response would then start
    with an empty think block that no sample starts with: a constant marker of realness. With thinking
    off the template puts that empty block at the end of the generation prompt instead, so it is part of
    the prompt of both sides, the model answers straight after it, and a real response is the answer
    alone, as the samples are. (With thinking on, the data would need real reasoning traces in every
    response for the two sides to look alike; ChatTokenizer warns when the template adds to real
    responses a prefix that the generation prompt lacks.)
    """
    out = dict(given or {})
    if takes_thinking_switch(tokenizer):
        out.setdefault("enable_thinking", False)
    return out


class ChatTokenizer:
    """A tokenizer plus the facts the tokenization rule needs, worked out once (see the module doc).

    `chat_template_kwargs` are passed to every render, the prompt's and the whole conversation's
    (`template_kwargs` adds the safe default of a thinking switch)."""

    def __init__(
        self,
        tokenizer: Any,
        template_date: str = DEFAULT_TEMPLATE_DATE,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.day = date.fromisoformat(template_date)
        # Llama 3.x templates take a `date_string` variable before they call strftime_now
        self.template_kwargs = {
            "date_string": self.day.strftime("%d %b %Y"),
            **template_kwargs(tokenizer, chat_template_kwargs),
        }
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eot = end_of_turn_id(tokenizer)
        self.bos = _bos_added_by_encoding(tokenizer)
        self.supports_system = self._probe_system() if self.has_template else True
        self.answer_prefix = self._probe_answer_prefix() if self.has_template else ""
        if self.answer_prefix.strip():
            _warn_once(
                tokenizer,
                "answer_prefix",
                f"the chat template of {_name(tokenizer)} (with {self.template_kwargs}) puts "
                f"{self.answer_prefix!r} before every assistant answer in a conversation but not at the end "
                "of its generation prompt: every real response starts with it, while the model writes "
                "its own text there (a thinking template with enable_thinking on writes reasoning), so "
                "that prefix alone marks a response as real. Set data.chat_template_kwargs so that the "
                "generation prompt ends where the answer starts (enable_thinking: false for thinking "
                "templates, the default)",
            )
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

    def keeps_edge_whitespace(self) -> bool:
        """Whether a response's leading or trailing whitespace reaches its tokens (templates that
        `trim` the content, as Llama 3's and Gemma's do, drop it)."""
        prompt = [{"role": "user", "content": "hi"}]
        try:
            return self.pair_ids(prompt, f" {_PROBE}\n")[1] != self.pair_ids(prompt, _PROBE)[1]
        except ChatTemplateError:
            return True

    def _probe_answer_prefix(self) -> str:
        """What the conversation's render puts between the generation prompt and the answer's text
        (whitespace for most templates; an empty think block for a thinking template with thinking on)."""
        prompt = [{"role": "user", "content": "hi"}]
        head, whole = self.prompt_text(prompt), self.conversation_text(prompt, _PROBE)
        at = whole.find(_PROBE)
        if not whole.startswith(head) or at < len(head):
            return ""  # a template that renders the prompt otherwise: `split` refuses those rows
        return whole[len(head) : at]

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
    tokenizer: Any,
    prompt: Sequence[dict[str, str]],
    template_date: str = DEFAULT_TEMPLATE_DATE,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """The prompt's token ids as the model sees them before it answers (see `ChatTokenizer`)."""
    return ChatTokenizer(tokenizer, template_date, chat_template_kwargs).prompt_ids(prompt)


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
    chat_template_kwargs: Mapping[str, Any] | None = None,
    strip_responses: bool = False,
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

    Responses that begin or end with whitespace are counted in ``edge_whitespace`` where the template
    keeps it (Llama 3's and Gemma's trim it): a model hardly ever writes a space or a newline before
    its answer or before its end-of-turn, so those tokens mark such a response as real. With
    ``strip_responses`` they are stripped first (and still counted); without it a warning suggests it.

    Returns:
        The kept examples (``index`` is the position in ``examples``) and the counts ``{"kept",
        "skipped_overlong", "skipped_bad", "truncated", "prompt_turns_dropped", "edge_whitespace"}``;
        truncated examples count as kept.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {list(OVERLONG_POLICIES)}, got {overlong!r}")
    if max_prompt_tokens < 1 or max_response_tokens < 2:
        raise ValueError(
            "max_prompt_tokens must be >= 1 and max_response_tokens >= 2 (one content token and "
            f"the end-of-turn), got {max_prompt_tokens} and {max_response_tokens}"
        )
    chat = ChatTokenizer(tokenizer, template_date, chat_template_kwargs)
    eot_text = tokenizer.convert_ids_to_tokens(chat.eot)
    counts = {"kept": 0, "skipped_overlong": 0, "skipped_bad": 0, "truncated": 0, "prompt_turns_dropped": 0,
              "edge_whitespace": 0}  # fmt: skip
    keeps_whitespace = chat.keeps_edge_whitespace()
    tokenized: list[TokenizedExample] = []
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start : start + batch_size])
        if keeps_whitespace:
            edged = [i for i, ex in enumerate(batch) if ex.response != ex.response.strip()]
            counts["edge_whitespace"] += len(edged)
            for i in edged if strip_responses else ():
                batch[i] = replace(batch[i], response=batch[i].response.strip())
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
    if counts["edge_whitespace"] and not strip_responses:
        logger.warning(
            "%d of %d real responses begin or end with whitespace, which the chat template keeps: the model "
            "hardly ever writes those tokens before its answer or its end-of-turn, so they mark those "
            "responses as real; set data.strip_responses=true to strip them",
            counts["edge_whitespace"], len(examples),
        )  # fmt: skip
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
