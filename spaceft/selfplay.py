"""The self-play driver: Algorithm 1 of the SPACE paper, iterated and resumable.

    for t in 0 .. T-1:
        generate  y'_j ~ p_θt(·|x), K per prompt               -> iter_t/synthetic.parquet
        score     log p_θt(y|x), log p_θt(y'_j|x), once          -> iter_t/opponent_logps.parquet
        train     θ ← argmin L(θ; θt) from θ = θt, E epochs      -> iter_t/model/
        evaluate  held-out NLL, task accuracy                    -> iter_t/eval.json
        θt+1 ← θ (the opponent of the next iteration is the trained model itself)

Each stage is recorded in runs/NAME/manifest.json when it finishes; running the same command again
skips finished stages and resumes an unfinished one where it stopped. A config change that would make
finished work stale is refused unless `force=True`, which discards the stale work.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spaceft import data as data_mod
from spaceft.config import RunConfig
from spaceft.data import Example, TokenizedExample
from spaceft.evaluate import evaluate
from spaceft.generate import HFGenerator, VLLMGenerator, generate_stage
from spaceft.models import load_model, load_tokenizer, resolve_model_path
from spaceft.rundir import Manifest, file_hash, library_versions, read_table
from spaceft.score import ScoreItem, logps_by_key, score_stage
from spaceft.train import TrainItem, train_iteration

log = logging.getLogger(__name__)

BUILTIN_ARITHMETIC = "builtin:arithmetic"
DEFAULT_BUILTIN_SIZE = 64


class StaleRunError(RuntimeError):
    """The run directory holds finished work made with a different config."""


@dataclass
class Workspace:
    """What every stage needs: config, paths, tokenizer and the tokenized data."""

    cfg: RunConfig
    manifest: Manifest
    start_model: str
    tokenizer: Any
    train_examples: list[Example]
    train_tok: list[TokenizedExample]
    eval_examples: list[Example] = field(default_factory=list)
    eval_tok: list[TokenizedExample] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def stop_ids(self) -> list[int]:
        return [data_mod.end_of_turn_id(self.tokenizer)]

    def iter_dir(self, t: int) -> Path:
        return self.cfg.run_dir / f"iter_{t}"

    def opponent_path(self, t: int) -> str:
        return self.start_model if t == 0 else str(self.iter_dir(t - 1) / "model")


# ----------------------------------------------------------------------------------------- set-up


def _materialise(spec: str | None, cfg: RunConfig, split: str) -> str | None:
    """Write the builtin task into the run directory; other specs pass through unchanged."""
    if spec != BUILTIN_ARITHMETIC:
        return spec
    from spaceft.tasks import write_arithmetic_jsonl

    n = (cfg.data.train_size if split == "train" else cfg.data.eval_size) or DEFAULT_BUILTIN_SIZE
    path = cfg.run_dir / "data" / f"arithmetic_{split}_{n}_seed{cfg.data.seed}.jsonl"
    if not path.exists():
        write_arithmetic_jsonl(path, n, seed=cfg.data.seed, split=split)
    return str(path)


def _load_split(
    path: str, cfg: RunConfig, tokenizer: Any, *, split: str, limit: int | None
) -> tuple[list[Example], list[TokenizedExample], dict[str, Any]]:
    d = cfg.data
    examples, report = data_mod.load_examples(
        path,
        fmt=d.format,
        prompt_field=d.prompt_field,
        response_field=d.response_field,
        messages_field=d.messages_field,
        system_prompt=d.system_prompt,
        split=split,
        on_bad_row=d.on_bad_row,
        limit=limit,
    )
    tokenized, counts = data_mod.tokenize_examples(
        tokenizer,
        examples,
        max_prompt_tokens=d.max_prompt_tokens,
        max_response_tokens=d.max_response_tokens,
        overlong=d.overlong,
    )
    log.info("%s: %s; tokenized %s", path, report.summary(), counts)
    if not tokenized:
        raise ValueError(f"{path}: no usable examples ({report.summary()}; {counts})")
    return examples, tokenized, {"path": path, "load": report.summary(), "tokenize": counts}


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def _check_resume(manifest: Manifest, cfg: RunConfig, data_hash: str, force: bool) -> None:
    """Refuse to mix finished work from another config (or data) with this one, unless forced."""
    old = manifest.data.get("fingerprint")
    if old is None or not manifest.data["iterations"]:
        return
    stale_train = old != cfg.training_fingerprint() or manifest.data.get("data_hash") != data_hash
    stale_eval = manifest.data.get("eval_fingerprint") != cfg.eval_fingerprint()
    if not (stale_train or stale_eval):
        return
    changes = _diff(manifest.data.get("config", {}), cfg.to_dict())
    if manifest.data.get("data_hash") != data_hash:
        changes.append("the training data changed")
    if not force:
        raise StaleRunError(
            f"{cfg.run_dir} holds finished work made with a different config:\n  "
            + "\n  ".join(changes or ["(unknown)"])
            + "\nUse another run name, or pass --force to discard the stale work."
        )
    if stale_train:
        log.warning("--force: discarding all finished work in %s", cfg.run_dir)
        for child in cfg.run_dir.iterdir():
            if child.is_dir() and (child.name.startswith("iter_") or child.name == "base"):
                shutil.rmtree(child)
        manifest.data["iterations"] = {}
    else:
        log.warning("--force: eval settings changed; re-running evaluations only")
        for it in manifest.data["iterations"].values():
            it.pop("eval", None)


def prepare(cfg: RunConfig, *, force: bool = False) -> Workspace:
    """Resolve the model, load and tokenize the data, check and update the manifest."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    start = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(
        start, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    train_path = _materialise(cfg.data.train, cfg, "train")
    assert train_path is not None
    train_ex, train_tok, train_info = _load_split(
        train_path, cfg, tokenizer, split=cfg.data.split, limit=cfg.data.train_size
    )
    eval_ex: list[Example] = []
    eval_tok: list[TokenizedExample] = []
    eval_info: dict[str, Any] | None = None
    eval_path = _materialise(cfg.data.eval, cfg, "test")
    if eval_path:
        eval_ex, eval_tok, eval_info = _load_split(
            eval_path, cfg, tokenizer, split=cfg.data.eval_split, limit=cfg.data.eval_size
        )
    data_hash = file_hash(Path(train_path)) if Path(train_path).exists() else train_path
    manifest = Manifest.open(cfg.run_dir)
    _check_resume(manifest, cfg, data_hash, force)
    manifest.data.update(
        config=cfg.to_dict(),
        fingerprint=cfg.training_fingerprint(),
        eval_fingerprint=cfg.eval_fingerprint(),
        data_hash=data_hash,
        start_model=start,
        versions=library_versions(),
        data={"train": train_info, "eval": eval_info},
    )
    manifest.save()
    return Workspace(cfg, manifest, start, tokenizer, train_ex, train_tok, eval_ex, eval_tok)


# ----------------------------------------------------------------------------------------- stages


def _load(ws: Workspace, path: str) -> torch.nn.Module:
    return load_model(path, ws.cfg.model).to(ws.device)


def _synthetic(ws: Workspace, t: int) -> dict[int, list[tuple[int, ...]]]:
    """prompt_index -> the K synthetic responses of iteration t, in sample order."""
    rows = read_table(ws.iter_dir(t) / "synthetic.parquet")
    out: dict[int, list[tuple[int, ...]]] = {}
    for r in sorted(rows, key=lambda r: (r["prompt_index"], r["sample"])):
        out.setdefault(r["prompt_index"], []).append(tuple(r["response_ids"]))
    return out


def _sources(ws: Workspace, t: int) -> list[int]:
    """Iterations whose synthetic responses iteration t trains on (t, and t-1 when mixing; 0 when
    resampling is off)."""
    if not ws.cfg.selfplay.resample:
        return [0]
    return [t, t - 1] if ws.cfg.selfplay.mix_previous and t > 0 else [t]


def run_generate(ws: Workspace, t: int, model: torch.nn.Module | None) -> dict[str, Any]:
    cfg = ws.cfg
    prompts = [(tok.index, tok.prompt_ids) for tok in ws.train_tok]
    if cfg.generation.backend == "vllm":
        gen: Any = VLLMGenerator(
            ws.opponent_path(t), cfg.generation, stop_ids=ws.stop_ids, dtype=cfg.model.dtype
        )
    else:
        assert model is not None
        gen = HFGenerator(model, cfg.generation, stop_ids=ws.stop_ids, pad_id=ws.tokenizer.pad_token_id,
                          device=ws.device)  # fmt: skip
    return generate_stage(
        gen,
        prompts,
        ws.iter_dir(t) / "synthetic.parquet",
        cfg.generation,
        iteration=t,
        decode=lambda ids: ws.tokenizer.decode(ids, skip_special_tokens=True),
        progress=cfg.logging.progress,
    )


def run_score(ws: Workspace, t: int, model: torch.nn.Module) -> dict[str, Any]:
    items = [ScoreItem("real", tok.index, 0, -1, tok.prompt_ids, tok.response_ids) for tok in ws.train_tok]
    by_index = {tok.index: tok for tok in ws.train_tok}
    for src in _sources(ws, t):
        for index, samples in sorted(_synthetic(ws, src).items()):
            for j, ids in enumerate(samples):
                items.append(ScoreItem("synthetic", index, j, src, by_index[index].prompt_ids, ids))
    return score_stage(
        model,
        items,
        ws.iter_dir(t) / "opponent_logps.parquet",
        pad_id=ws.tokenizer.pad_token_id,
        batch_size=ws.cfg.train.micro_batch_size * (1 + ws.cfg.generation.num_samples),
        device=ws.device,
        progress=ws.cfg.logging.progress,
    )


def train_items(ws: Workspace, t: int) -> list[TrainItem]:
    """Assemble (prompt, real, K synthetic, opponent log-probs) for iteration t."""
    loss = ws.cfg.train.loss
    if not loss.uses_synthetic:
        return [TrainItem(tok.prompt_ids, tok.response_ids, ()) for tok in ws.train_tok]
    opp = logps_by_key(read_table(ws.iter_dir(t) / "opponent_logps.parquet")) if loss.needs_opponent else {}
    items = []
    for src in _sources(ws, t):
        synthetic = _synthetic(ws, src)
        for tok in ws.train_tok:
            samples = synthetic[tok.index]
            items.append(
                TrainItem(
                    tok.prompt_ids,
                    tok.response_ids,
                    tuple(samples),
                    opp.get(("real", tok.index, 0, -1), 0.0),
                    tuple(opp.get(("synthetic", tok.index, j, src), 0.0) for j in range(len(samples))),
                )
            )
    return items


def run_train(ws: Workspace, t: int, model: torch.nn.Module) -> dict[str, Any]:
    info = train_iteration(
        model, ws.tokenizer, train_items(ws, t), ws.cfg, iteration=t, iter_dir=ws.iter_dir(t)
    )
    return {**info, "hash": file_hash(ws.iter_dir(t) / "model" / "model.safetensors")}


def run_eval(ws: Workspace, key: str, model_dir: str) -> dict[str, Any]:
    out_dir = ws.cfg.run_dir / key
    model = _load(ws, model_dir)
    return evaluate(
        model,
        ws.tokenizer,
        ws.eval_examples,
        ws.eval_tok,
        ws.cfg.eval,
        out_dir,
        stop_ids=ws.stop_ids,
        device=ws.device,
        model_dir=model_dir,
        progress=ws.cfg.logging.progress,
    )


# ----------------------------------------------------------------------------------------- driver


def run(
    cfg: RunConfig,
    *,
    force: bool = False,
    only_stage: str | None = None,
    only_iteration: int | None = None,
) -> Workspace:
    """Run (or resume) all iterations; with `only_stage`, re-run that one stage of one iteration."""
    ws = prepare(cfg, force=force)
    m = ws.manifest
    loss = cfg.train.loss
    log.info("run %s: %s, %d iteration(s), %d training pairs, %d held-out", cfg.name, loss,
             cfg.selfplay.iterations, len(ws.train_tok), len(ws.eval_tok))  # fmt: skip
    if only_stage is not None:
        t = only_iteration if only_iteration is not None else 0
        if only_stage == "eval" and t < 0:
            m.clear("base", "eval")
        else:
            m.clear(t, only_stage)
        iterations = [t] if t >= 0 else []
    else:
        iterations = list(range(cfg.selfplay.iterations))

    def wanted(stage: str, t: int | str) -> bool:
        if only_stage is not None and stage != only_stage:
            return False
        return not m.is_done(t, stage)

    if (
        cfg.eval.enabled
        and ws.eval_tok
        and wanted("eval", "base")
        and (only_stage is None or only_iteration == -1)
    ):
        log.info("evaluating the start model")
        m.mark_done("base", "eval", **run_eval(ws, "base", ws.start_model))
    for t in iterations:
        if only_stage is None and all(
            m.is_done(t, s) or not _applies(s, ws, t) for s in ("generate", "score", "train", "eval")
        ):
            continue
        for prev in range(t):
            if not m.is_done(prev, "train"):
                raise RuntimeError(f"iteration {t} needs iteration {prev}'s model: run it first")
        model: torch.nn.Module | None = None
        if wanted("generate", t) and _applies("generate", ws, t):
            if cfg.generation.backend == "hf":
                model = _load(ws, ws.opponent_path(t))
            m.mark_done(t, "generate", **run_generate(ws, t, model))
        if wanted("score", t) and _applies("score", ws, t):
            model = model or _load(ws, ws.opponent_path(t))
            m.mark_done(t, "score", **run_score(ws, t, model))
        if wanted("train", t):
            model = model or _load(ws, ws.opponent_path(t))
            m.mark_done(t, "train", **run_train(ws, t, model))
        del model
        if wanted("eval", t) and _applies("eval", ws, t):
            m.mark_done(t, "eval", **run_eval(ws, f"iter_{t}", str(ws.iter_dir(t) / "model")))
    if only_stage is None:
        from spaceft.report import write_report

        write_report(cfg.run_dir)
    return ws


def _applies(stage: str, ws: Workspace, t: int) -> bool:
    loss = ws.cfg.train.loss
    if stage == "generate":
        return loss.uses_synthetic and (t == 0 or ws.cfg.selfplay.resample)
    if stage == "score":
        return loss.needs_opponent
    if stage == "eval":
        return ws.cfg.eval.enabled and bool(ws.eval_tok)
    return True
