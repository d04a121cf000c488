"""What a finished run cost, per iteration, counted from its artefacts: tokens forwarded and trained.

The compute of a self-play iteration is spent in three stages, each a forward or forward+backward pass
over known token sequences, so it can be counted exactly after the fact (no hook in the trainer):

* generate: the opponent reads each prompt once per sample (prefill) and decodes the sampled tokens;
* score: the opponent reads every (prompt, response) it scores, real and synthetic (forward only);
* train: every epoch, the policy reads and back-propagates (prompt, real), each (prompt, synthetic)
  and, for T-SPIN, each (prompt, proto-synthetic).

`compute` is in *forward-token equivalents*: a token that is only forwarded counts 1, a trained token 3
(its backward pass costs about twice its forward). Multiplied by 2 × parameters it approximates FLOPs
(the usual 2N forward / 6N training estimate); attention's share and padding are ignored. Evaluation
is measurement, not training, so it is left out of `compute`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from spaceft import stages
from spaceft.chat import TokenizedExample
from spaceft.config import SelfPlayConfig
from spaceft.losses import LossType
from spaceft.rundata import training_data
from spaceft.rundir import Manifest, read_table

log = logging.getLogger(__name__)

TRAIN_FACTOR = 3
"""Forward-token equivalents of one trained token (forward + backward ≈ 3 forwards)."""


@dataclass(frozen=True)
class IterationCost:
    """Tokens one iteration forwarded and trained on."""

    iteration: int
    generated: int
    """Sampled tokens (decoded one at a time)."""
    forwarded: int
    """Tokens only forwarded: generation (prompt prefill + sampled tokens) and opponent scoring."""
    trained: int
    """Tokens forwarded and back-propagated in training, all epochs."""

    @property
    def compute(self) -> int:
        """Forward-token equivalents: forwarded + 3 × trained."""
        return self.forwarded + TRAIN_FACTOR * self.trained

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "compute": self.compute}


def _recorded_selfplay(section: dict[str, Any]) -> SelfPlayConfig:
    """The `selfplay` section a run recorded (a key added since at its default, one removed left out)."""
    names = {f.name for f in fields(SelfPlayConfig)}
    return SelfPlayConfig(**{k: v for k, v in section.items() if k in names})


def run_costs(run_dir: Path, tokenized: list[TokenizedExample] | None = None) -> list[IterationCost]:
    """Per-iteration token counts of every trained iteration of `run_dir`."""
    run_dir = Path(run_dir)
    manifest = Manifest.open(run_dir)
    cfg = manifest.config
    tokenized = training_data(run_dir) if tokenized is None else tokenized
    prompt_len = {t.index: len(t.prompt_ids) for t in tokenized}
    real_tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in tokenized)
    epochs = cfg["train"]["epochs"]
    costs = []
    t = 0
    selfplay = _recorded_selfplay(cfg["selfplay"])
    while manifest.is_done(t, "train"):
        d = run_dir / f"iter_{t}"
        generated = forwarded = 0
        if (d / "synthetic.parquet").exists():
            rows = read_table(d / "synthetic.parquet")
            generated = sum(r["length"] for r in rows)
            forwarded += generated + sum(prompt_len[r["prompt_index"]] for r in rows)
        if (d / "opponent_logps.parquet").exists():
            forwarded += sum(
                prompt_len[r["prompt_index"]] + r["length"] for r in read_table(d / "opponent_logps.parquet")
            )
        sources = stages.sources(selfplay, t) if LossType(cfg["train"]["loss"]).uses_synthetic else []
        per_epoch = real_tokens * max(len(sources), 1)  # each source repeats the real pairs
        for src in sources:
            rows = read_table(run_dir / f"iter_{src}" / "synthetic.parquet")
            per_epoch += sum(prompt_len[r["prompt_index"]] + r["length"] for r in rows)
        if LossType(cfg["train"]["loss"]).uses_proto:  # each item's y0 too: iteration 0's sample 0
            protos = [r for r in read_table(run_dir / "iter_0" / "synthetic.parquet") if r["sample"] == 0]
            per_epoch += len(sources) * sum(prompt_len[r["prompt_index"]] + r["length"] for r in protos)
        costs.append(IterationCost(t, generated, forwarded, epochs * per_epoch))
        t += 1
    return costs
