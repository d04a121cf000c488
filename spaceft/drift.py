"""Whether real responses look like what the model writes: checks run on each iteration's samples.

`spaceft.chat` tokenizes a real response as the chat template renders it. Two things can still make
every real response carry tokens that no synthetic one has, which the real-vs-synthetic classifier
would learn instead of the data:

* the template renders the assistant turn otherwise than the model was trained on (Mistral-Instruct
  v0.1/v0.2's hub template): `template_drift` re-renders the model's own samples by the rule and
  counts those that come back as other ids at the start or end of the response;
* the template adds something to every real answer that the generation prompt lacks (a thinking
  template's empty think block with thinking on): `template_drift` compares the start most real
  responses share (`shared_start`) with how the samples start.

`warn_template_drift` logs either finding; the generate stage records the numbers in the manifest.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from spaceft.chat import ChatTemplateError, ChatTokenizer

logger = logging.getLogger(__name__)

__all__ = ["shared_start", "template_drift", "warn_template_drift"]

DRIFT_SAMPLE = 512
"""Synthetic samples `template_drift` re-renders per iteration (the first rows of the table)."""
DRIFT_WARN = 0.5
"""Share of checked samples re-rendered differently at a response boundary above which a run warns."""


START_TOKENS = 8
"""The longest shared start of real responses that `shared_start` looks for."""


def shared_start(responses: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], float]:
    """The longest start (at most `START_TOKENS` ids) that more than `DRIFT_WARN` of `responses` begin
    with, and the share that do; ``((), 0.0)`` when no first token is that common."""
    best: tuple[tuple[int, ...], float] = ((), 0.0)
    for k in range(1, START_TOKENS + 1):
        counts = Counter(tuple(r[:k]) for r in responses if len(r) >= k)
        if not counts:
            break
        start, n = counts.most_common(1)[0]
        if n / len(responses) <= DRIFT_WARN:
            break
        best = (tuple(int(i) for i in start), n / len(responses))
    return best


def template_drift(
    chat: ChatTokenizer,
    prompts: Mapping[int, Sequence[dict[str, str]]] | Sequence[Sequence[dict[str, str]]],
    samples: Sequence[tuple[int, Sequence[int], bool]],
    real: Sequence[Sequence[int]] | None = None,
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

    With `real` (the real responses' ids) it also compares how the two sides begin: the longest start
    that most real responses share (`shared_start`) and the share of samples that begin with it. A
    template that adds something to every real answer and not to the generation prompt (a thinking
    template's empty ``<think>\n\n</think>\n\n`` with thinking on) gives most real responses a start
    that the samples lack.

    Returns ``{"checked", "mismatch_fraction", "boundary_fraction"}`` and, when some sample differs at a
    boundary, ``"example"``: its first differing tokens as written and as re-rendered; with `real`, also
    ``"real_start"`` (tokens), ``"real_start_fraction"`` and ``"sample_start_fraction"``.
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
    if real is not None:
        start, share = shared_start(real)
        begin = sum(1 for _, ids, _ in samples if start and tuple(ids[: len(start)]) == start)
        out.update(real_start=tokenizer.convert_ids_to_tokens(list(start)), real_start_fraction=share,
                   sample_start_fraction=begin / max(len(samples), 1))  # fmt: skip
    return out


def warn_template_drift(drift: dict[str, Any], name: str, has_template: bool = True) -> None:
    """Log `template_drift`'s findings: most samples re-render differently at a boundary, or most real
    responses share a start that at most half as large a share of the samples has."""
    real_share, sample_share = drift.get("real_start_fraction", 0.0), drift.get("sample_start_fraction", 0.0)
    if real_share > DRIFT_WARN and sample_share <= real_share / 2:
        logger.warning(
            "%.0f%% of the real responses begin with the tokens %s, and only %.0f%% of the model's own "
            "samples do: those first tokens alone tell most real responses from synthetic ones. If the "
            "chat template puts them there (a thinking template's empty think block: see "
            "data.chat_template_kwargs), render the prompts so that the generation prompt ends where the "
            "real answers start; if the data all begin that way, the model does not yet write like it",
            100 * real_share, drift.get("real_start"), 100 * sample_share,
        )  # fmt: skip
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
