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
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from spaceft import data as data_mod
from spaceft import preflight
from spaceft.config import RunConfig, eval_view, training_view
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
        return PartialState().device  # this process's device (cuda:LOCAL_RANK under accelerate launch)

    @cached_property
    def stop_ids(self) -> list[int]:
        """End-of-turn, and eos where it differs (Llama-3: <|eot_id|> and <|end_of_text|>)."""
        ids = {data_mod.end_of_turn_id(self.tokenizer)}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

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
    if not tokenized:
        raise ValueError(f"{path}: no usable examples ({report.summary()}; {counts})")
    return examples, tokenized, {"path": path, "load": report.summary(), "tokenize": counts}


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Changed values of the keys both configs have (a field added in a newer spaceft, at its default,
    or one since removed, does not make a run stale)."""
    keys = []
    for k in sorted(set(old) & set(new)):
        a, b = old[k], new[k]
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def _check_resume(manifest: Manifest, cfg: RunConfig, data_hash: str, force: bool) -> None:
    """Refuse to mix finished work from another config (or data) with this one, unless forced."""
    stored = manifest.data.get("config")
    if stored is None:
        return
    new = cfg.to_dict()
    train_changes = _diff(training_view(stored), training_view(new))
    if manifest.data.get("data_hash") != data_hash:
        train_changes.append("the training data changed")
    eval_changes = _diff(eval_view(stored), eval_view(new))
    if not manifest.data["iterations"]:
        if train_changes:  # nothing finished: just drop the partial parts of the old config
            for child in cfg.run_dir.glob("iter_*"):
                shutil.rmtree(child)
        return
    if not (train_changes or eval_changes):
        return
    if not force:
        raise StaleRunError(
            f"{cfg.run_dir} holds finished work made with a different config:\n  "
            + "\n  ".join(train_changes + eval_changes)
            + "\nUse another run name, or pass --force to discard the stale work."
        )
    if train_changes:
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
    state = PartialState()
    preflight.check(cfg, force=force, main_process=state.is_main_process)  # issue 9: fail before any work
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with state.main_process_first():  # one process converts the default model / writes the task data
        start = resolve_model_path(cfg.model.name)
        train_path = _materialise(cfg.data.train, cfg, "train")
        eval_path = _materialise(cfg.data.eval, cfg, "test")
    tokenizer = load_tokenizer(
        start, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    assert train_path is not None
    train_ex, train_tok, train_info = _load_split(
        train_path, cfg, tokenizer, split=cfg.data.split, limit=cfg.data.train_size
    )
    eval_ex: list[Example] = []
    eval_tok: list[TokenizedExample] = []
    eval_info: dict[str, Any] | None = None
    if eval_path:
        eval_ex, eval_tok, eval_info = _load_split(
            eval_path, cfg, tokenizer, split=cfg.data.eval_split, limit=cfg.data.eval_size
        )
    data_hash = file_hash(Path(train_path)) if Path(train_path).exists() else train_path
    manifest = Manifest.open(cfg.run_dir)
    state.wait_for_everyone()
    if not state.is_main_process:  # only the main process writes the manifest and deletes stale work
        return Workspace(cfg, manifest, start, tokenizer, train_ex, train_tok, eval_ex, eval_tok)
    _check_resume(manifest, cfg, data_hash, force)
    manifest.data.update(
        config=cfg.to_dict(),
        fingerprint=cfg.training_fingerprint(),
        eval_fingerprint=cfg.eval_fingerprint(),
        data_hash=data_hash,
        start_model=start,
        versions={**manifest.data.get("versions", {}), **library_versions()},
        effective_beta=cfg.train.beta if cfg.train.beta is not None else cfg.train.loss.default_beta,
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
    try:
        return generate_stage(
            gen,
            prompts,
            ws.iter_dir(t) / "synthetic.parquet",
            cfg.generation,
            iteration=t,
            decode=lambda ids: ws.tokenizer.decode(ids, skip_special_tokens=True),
            progress=cfg.logging.progress,
        )
    finally:
        if hasattr(gen, "close"):
            gen.close()


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
                    _opp(opp, ("real", tok.index, 0, -1), loss.needs_opponent),
                    tuple(
                        _opp(opp, ("synthetic", tok.index, j, src), loss.needs_opponent)
                        for j in range(len(samples))
                    ),
                )
            )
    return items


def _opp(opp: dict[tuple[str, int, int, int], float], key: tuple[str, int, int, int], needed: bool) -> float:
    if not needed:
        return 0.0
    if key not in opp:
        raise RuntimeError(f"opponent_logps.parquet has no score for {key}: re-run `spaceft score` for it")
    return opp[key]


def run_train(ws: Workspace, t: int, model: torch.nn.Module) -> dict[str, Any]:
    info = train_iteration(
        model, ws.tokenizer, train_items(ws, t), ws.cfg, iteration=t, iter_dir=ws.iter_dir(t)
    )
    return {**info, "hash": file_hash(ws.iter_dir(t) / "model")}


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
    """Run (or resume) all iterations; with `only_stage`, re-run that one stage of one iteration
    (which also invalidates everything built on it: its later stages and all later iterations).

    Under `accelerate launch` every process trains; generation, scoring and evaluation run on the main
    process while the others wait (the vLLM backend already uses every GPU it is given).
    """
    ws = prepare(cfg, force=force)
    state = PartialState()
    main = state.is_main_process
    m = ws.manifest
    log.info("run %s: %s, %d iteration(s), %d training pairs, %d held-out", cfg.name, cfg.train.loss,
             cfg.selfplay.iterations, len(ws.train_tok), len(ws.eval_tok))  # fmt: skip
    if only_stage is not None:
        t = only_iteration if only_iteration is not None else 0
        if main:
            if t < 0:
                m.clear("base", "eval")
            else:
                _invalidate_from(m, t, only_stage)
        iterations = [t] if t >= 0 else []
    else:
        iterations = list(range(cfg.selfplay.iterations))
    if main:
        for t in iterations:
            if _applies("score", ws, t) and _score_is_stale(ws, t):
                _invalidate_from(m, t, "score")

    def sync() -> None:
        """Barrier; then the other processes re-read what the main process recorded."""
        state.wait_for_everyone()
        if not main:
            m.data = Manifest.open(cfg.run_dir).data

    sync()

    def wanted(stage: str, t: int | str) -> bool:
        if only_stage is not None and stage != only_stage:
            return False
        return not m.is_done(t, stage)

    def on_main(stage: str, t: int | str, work: Any) -> None:
        """Run `work` (called at once, so closing over the loop variable is safe) on the main process."""
        if main:
            m.mark_done(t, stage, **work())
        sync()

    if cfg.eval.enabled and ws.eval_tok and wanted("eval", "base") and only_iteration in (None, -1):
        log.info("evaluating the start model")
        on_main("eval", "base", lambda: run_eval(ws, "base", ws.start_model))
    for t in iterations:
        if only_stage is None and all(m.is_done(t, s) or not _applies(s, ws, t) for s in STAGES):
            continue
        for prev in range(t):
            if not m.is_done(prev, "train"):
                raise RuntimeError(f"iteration {t} needs iteration {prev}'s model: run `spaceft run` first")
        model: torch.nn.Module | None = None

        def opponent(t: int = t) -> torch.nn.Module:
            """The opponent θt, loaded once per iteration and trained in place into the main player."""
            nonlocal model
            model = model or _load(ws, ws.opponent_path(t))
            return model

        if wanted("generate", t) and _applies("generate", ws, t):
            on_main(
                "generate",
                t,
                lambda t=t: run_generate(ws, t, opponent() if cfg.generation.backend == "hf" else None),
            )
        if wanted("score", t) and _applies("score", ws, t):
            _require(m, t, "score", [(src, "generate") for src in _sources(ws, t)])
            on_main(
                "score", t, lambda t=t: {**run_score(ws, t, opponent()), "inputs": _synthetic_hashes(ws, t)}
            )
        if wanted("train", t):
            if _applies("score", ws, t):
                _require(m, t, "train", [(t, "score")])
            elif _applies("generate", ws, t) or cfg.train.loss.uses_synthetic:
                _require(m, t, "train", [(src, "generate") for src in _sources(ws, t)])
            info = run_train(ws, t, opponent())
            if main:
                m.mark_done(t, "train", **info)
            sync()
        model = None
        if wanted("eval", t) and _applies("eval", ws, t):
            _require(m, t, "eval", [(t, "train")])
            on_main("eval", t, lambda t=t: run_eval(ws, f"iter_{t}", str(ws.iter_dir(t) / "model")))
    if only_stage is None and main:
        from spaceft.report import write_report

        write_report(cfg.run_dir)
    return ws


STAGES = ("generate", "score", "train", "eval")


def _invalidate_from(m: Manifest, t: int, stage: str) -> None:
    """Forget `stage` of iteration t and everything computed from it."""
    for s in STAGES[STAGES.index(stage) :]:
        m.clear(t, s)
    later = [k for k in m.data["iterations"] if k.isdigit() and int(k) > t]
    if later:
        log.warning("re-running %s of iteration %d invalidates iteration(s) %s", stage, t, ", ".join(later))
    for k in later:
        m.data["iterations"].pop(k)
    m.save()


def _require(m: Manifest, t: int, stage: str, needs: list[tuple[int, str]]) -> None:
    missing = [f"{s} of iteration {i}" for i, s in needs if not m.is_done(i, s)]
    if missing:
        raise RuntimeError(f"{stage} of iteration {t} needs {', '.join(missing)}: run `spaceft run` first")


def _synthetic_hashes(ws: Workspace, t: int) -> dict[str, str]:
    return {str(src): (ws.manifest.stage(src, "generate") or {}).get("hash", "") for src in _sources(ws, t)}


def _score_is_stale(ws: Workspace, t: int) -> bool:
    """Scores made for other synthetic samples (e.g. after `spaceft generate -t T`) are recomputed."""
    entry = ws.manifest.stage(t, "score")
    if entry is None or entry.get("inputs") == _synthetic_hashes(ws, t):
        return False
    log.warning("iteration %d: synthetic samples changed since scoring; re-scoring", t)
    return True


def _applies(stage: str, ws: Workspace, t: int) -> bool:
    loss = ws.cfg.train.loss
    if stage == "generate":
        return loss.uses_synthetic and (t == 0 or ws.cfg.selfplay.resample)
    if stage == "score":
        return loss.needs_opponent
    if stage == "eval":
        return ws.cfg.eval.enabled and bool(ws.eval_tok)
    return True
