"""Which settings of a resolved config decide the trained models and which the evaluations.

The views below are what the training and evaluation fingerprints hash (`RunConfig.training_fingerprint`,
recorded in the manifest) and what `runstate.py` compares to say which finished work a changed config
makes stale. A setting that only says where or how something runs (memory, GPUs, a cache) is in neither.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENERATION_WHERE_KEYS = ("vllm_memory_fraction", "tensor_parallel_size", "vllm_keep_alive")
"""Generation settings that say where and how the sampling runs (memory, GPUs, the engine's lifetime),
not what it samples."""


def training_view(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (as a dict) that decides the trained models."""
    d = json.loads(json.dumps(config))
    for key in ("name", "output_dir", "eval", "logging"):
        d.pop(key, None)
    d.get("selfplay", {}).pop("iterations", None)  # raising it continues a run
    d.get("selfplay", {}).pop("distributed_timeout_s", None)  # how long to wait, not results
    for key in GENERATION_WHERE_KEYS:
        d.get("generation", {}).pop(key, None)
    for key in EVAL_DATA_KEYS:  # the held-out set changes evaluations, not the trained models
        d.get("data", {}).pop(key, None)
    for key, default in DATA_DEFAULTS_UNHASHED.items():  # newer keys at their default: the hash stays
        if d.get("data", {}).get(key, default) == default:
            d.get("data", {}).pop(key, None)
    for key, default in TRAIN_DEFAULTS_UNHASHED.items():
        if d.get("train", {}).get(key, default) == default:
            d.get("train", {}).pop(key, None)
    train = d.get("train", {})
    if "logps_path" in train:  # hashed as the boolean it replaced, so recorded fingerprints still match;
        train["chunked_logps"] = train.pop("logps_path") != "logits"  # auto only rounds differently
    return d


def eval_view(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that decides the evaluations (besides the models)."""
    data = config.get("data", {})
    settings = {k: v for k, v in config.get("eval", {}).items() if k not in EVAL_WHERE_KEYS}
    held_out = {k: data[k] for k in EVAL_DATA_KEYS if k in data}
    if data.get("subset", "first") != "first" and data.get("eval_size"):  # a random draw: which rows
        held_out.update(subset=data["subset"], seed=data.get("seed"))  # default: no key, recorded views stay
    return {"eval": settings, "data": held_out}


EVAL_DATA_KEYS = ("eval", "eval_split", "eval_size")
DATA_DEFAULTS_UNHASHED: dict[str, Any] = {"subset": "first", "chat_template_kwargs": {},
                                          "strip_responses": False}  # fmt: skip
"""data keys added after runs existed, left out of the training fingerprint at their default (so those
runs' fingerprints, and the grid's adoptions, do not change)."""
TRAIN_DEFAULTS_UNHASHED = {"history_weight": 0.1, "history_start_iteration": 1}
"""train keys added after runs existed (T-SPIN's), left out of the training fingerprint at their default."""
EVAL_WHERE_KEYS = ("cache",)
"""eval keys that change where a result comes from, not what it is."""


def digest(view: Any) -> str:
    """A short sha256 of a view (JSON with sorted keys): the fingerprint recorded in the manifest."""
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:16]
