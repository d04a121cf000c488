"""A run's real pairs: the rows its `data` config selects, tokenized as the run trains on them.

The one loader used wherever a run's data is read: the workspace loads it to train, and the costs and
the report load it again, after the fact, from the config recorded in the run's manifest. One loader,
so that every setting that selects or changes the pairs (`subset: random`, `overlong`, the template
date, ...) is honoured by all three.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from spaceft.chat import TokenizedExample, tokenize_examples
from spaceft.config import DataConfig
from spaceft.data import Example, load_examples
from spaceft.rundir import read_json


def load_split(
    path: str, d: DataConfig, tokenizer: Any, *, split: str, limit: int | None
) -> tuple[list[Example], list[TokenizedExample], dict[str, Any]]:
    """The pairs of `path` that `d` selects (at most `limit`), tokenized, and what loading them did
    (for the manifest: the path, the load and tokenize counts, and the random draw, if any)."""
    draw = d.subset == "random" and limit is not None
    examples, report = load_examples(
        path,
        fmt=d.format,
        prompt_field=d.prompt_field,
        response_field=d.response_field,
        messages_field=d.messages_field,
        system_prompt=d.system_prompt,
        split=split,
        on_bad_row=d.on_bad_row,
        limit=None if draw else limit,
        response_turn=d.response_turn,
    )
    subset = None
    if draw and limit is not None and len(examples) > limit:  # every usable row is read, then drawn from
        keep = sorted(random.Random(d.seed).sample(range(len(examples)), limit))
        subset = f"random {limit} of {len(examples)} usable rows (seed {d.seed})"
        examples = [examples[i] for i in keep]
    tokenized, counts = tokenize_examples(
        tokenizer,
        examples,
        max_prompt_tokens=d.max_prompt_tokens,
        max_response_tokens=d.max_response_tokens,
        overlong=d.overlong,
        template_date=d.template_date,
        on_bad_row=d.on_bad_row,
        chat_template_kwargs=d.chat_template_kwargs,
        strip_responses=d.strip_responses,
    )
    if not tokenized:
        raise ValueError(f"{path}: no usable examples ({report.summary()}; {counts})")
    info = {"path": path, "load": report.summary(), "tokenize": counts}
    return examples, tokenized, {**info, "subset": subset} if subset else info


def recorded_data_config(data: dict[str, Any]) -> DataConfig:
    """The `data` section a run's manifest recorded, as a `DataConfig`: a key added since the run was
    made takes its default (as the run behaved then), a key since removed is left out."""
    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in data.items() if k in names})


def training_data(run_dir: Path) -> list[TokenizedExample]:
    """The run's real training pairs, tokenized exactly as the run did (from its manifest's config)."""
    from spaceft.models import load_tokenizer

    manifest = read_json(Path(run_dir) / "manifest.json")
    cfg = manifest["config"]
    tokenizer = load_tokenizer(
        manifest["start_model"],
        revision=cfg["model"].get("revision"),
        trust_remote_code=cfg["model"].get("trust_remote_code", False),
    )
    d = recorded_data_config(cfg["data"])
    path = manifest["data"]["train"]["path"]
    _, tokenized, _ = load_split(path, d, tokenizer, split=d.split, limit=d.train_size)
    return tokenized
