"""A run's workspace: its config, start model, tokenized data, manifest and loaded model; preparing it.

`prepare` starts the process group (with the configured timeout), resolves the start model, loads and
tokenizes the data on every process, and — on the main process — checks the run directory against the
config (finished work from another config is refused unless forced) and updates the manifest, including
the hash of the start model's weights that keys the opponent's cached scores of iteration 0.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoConfig

from spaceft import preflight
from spaceft.batching import ModelShape, auto_batch_size
from spaceft.chat import ChatTokenizer, TokenizedExample, end_of_turn_id
from spaceft.config import RunConfig
from spaceft.data import Example
from spaceft.distributed import agree, attempt, broadcast, check_launch, init_processes, patient_group
from spaceft.generate import stop_ids
from spaceft.hub import pin_snapshot
from spaceft.models import load_model, load_tokenizer, resolve_model_path
from spaceft.rundata import load_split
from spaceft.rundir import Manifest, content_hash, file_hash, library_versions
from spaceft.runstate import check_resume
from spaceft.sampler import Generator

log = logging.getLogger(__name__)

BUILTIN_ARITHMETIC = "builtin:arithmetic"
DEFAULT_BUILTIN_SIZE = 64


@dataclass
class Workspace:
    """What every stage needs: config, paths, tokenizer, the tokenized data and the loaded model."""

    cfg: RunConfig
    manifest: Manifest
    start_model: str
    tokenizer: Any
    train_examples: list[Example]
    train_tok: list[TokenizedExample]
    eval_examples: list[Example] = field(default_factory=list)
    eval_tok: list[TokenizedExample] = field(default_factory=list)
    models: dict[str, torch.nn.Module] = field(default_factory=dict)
    """At most one model, by the directory it was loaded from (the opponent, kept across stages)."""
    generator: Generator | None = None
    """The generation backend kept between this invocation's generate steps (`Generator.kept`)."""
    generations_left: int = 0
    """Generate steps this invocation has still to run (a backend is kept only while more remain)."""

    @property
    def state(self) -> PartialState:
        return PartialState()

    @property
    def device(self) -> torch.device:
        return self.state.device  # this process's device (cuda:LOCAL_RANK under accelerate launch)

    @cached_property
    def end_of_turn(self) -> int:
        """The id every real response ends on (spaceft.chat.end_of_turn_id)."""
        return end_of_turn_id(self.tokenizer)

    @cached_property
    def stop_ids(self) -> list[int]:
        """What generation stops on (spaceft.generate.stop_ids): end-of-turn, the tokenizer's eos and
        the start model's own generation_config end ids."""
        return stop_ids(self.end_of_turn, self.tokenizer, self.start_model)

    @cached_property
    def chat(self) -> ChatTokenizer:
        """The tokenization rule with this run's template settings (the ones its data was tokenized by)."""
        d = self.cfg.data
        return ChatTokenizer(self.tokenizer, d.template_date, d.chat_template_kwargs)

    def decode(self, ids: Sequence[int]) -> str:
        """A response's text for people reading the tables (training uses the ids)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def iter_dir(self, t: int | str) -> Path:
        return self.cfg.run_dir / ("base" if t == "base" else f"iter_{t}")

    def opponent_path(self, t: int) -> str:
        return self.start_model if t == 0 else str(self.iter_dir(t - 1) / "model")

    def opponent_hash(self, t: int) -> str:
        """Hash of θt's weights (the start model's, or the hash recorded when iteration t-1 trained)."""
        return self.manifest.opponent_hash(t, self.start_model)


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


def _start_model_hash(manifest: Manifest, start: str, commit: str | None) -> str:
    """A hub snapshot's commit (it names the files' contents), else the hash of the start model's files,
    recomputed only when their names, sizes or times change."""
    if commit:
        old = manifest.data.get("start_model_hash")
        if old is not None and old == manifest.data.get("start_model") and manifest.has_iterations():
            # a run from before hub ids were pinned hashed the id itself: keep it, so that its finished
            # work is not made stale by the new naming (its start model is pinned from now on)
            log.warning("this run began before hub models were pinned to a commit; from now on it reads "
                        "commit %s of %s", commit, old)  # fmt: skip
            return str(old)
        return commit[:16]
    path = Path(start)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stamp = content_hash([(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    cached = manifest.data.get("start_model_stamp")
    if cached == stamp and manifest.data.get("start_model_hash"):
        return str(manifest.data["start_model_hash"])
    manifest.data["start_model_stamp"] = stamp
    return file_hash(path)


def prepare(cfg: RunConfig, *, force: bool = False, trains: bool = True, generates: bool = True) -> Workspace:
    """Start the process group, resolve the model, load and tokenize the data, update the manifest
    (`trains`, `generates`: whether this command may train or generate, for the checks of what those
    need)."""
    check_launch(lora_rank=cfg.model.lora.r)
    state = init_processes(cfg.selfplay.distributed_timeout_s)
    check = partial(
        preflight.check, cfg, force=force, main_process=state.is_main_process, trains=trains,
        generates=generates, processes=state.num_processes,
    )  # fmt: skip
    agree(state, attempt(check)[1], "checking the run")  # fail before any work, on every process
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with state.main_process_first():  # one process converts the default model / writes the task data
        start = resolve_model_path(cfg.model.name)
        train_path = _materialise(cfg.data.train, cfg, "train")
        eval_path = _materialise(cfg.data.eval, cfg, "test")
    hub_id = commit = None
    if not Path(start).is_dir():  # a hub id: one commit, local, for the whole run (spaceft/hub.py)
        hub_id = start
        start, commit = _pin_hub_model(cfg, hub_id, state)
    tokenizer = load_tokenizer(start, trust_remote_code=cfg.model.trust_remote_code)
    assert train_path is not None
    train_ex, train_tok, train_info = load_split(
        train_path, cfg.data, tokenizer, split=cfg.data.split, limit=cfg.data.train_size
    )
    eval_ex: list[Example] = []
    eval_tok: list[TokenizedExample] = []
    eval_info: dict[str, Any] | None = None
    if eval_path:
        eval_ex, eval_tok, eval_info = load_split(
            eval_path, cfg.data, tokenizer, split=cfg.data.eval_split, limit=cfg.data.eval_size
        )
    _refuse_cut_unlike_samples(cfg, train_tok)  # the same on every process: no agree needed
    if state.is_main_process:
        _warn_longer_than_samples(cfg, train_tok)
    data_hash = file_hash(Path(train_path)) if Path(train_path).exists() else train_path
    manifest = Manifest.open(cfg.run_dir)
    ws = Workspace(cfg, manifest, start, tokenizer, train_ex, train_tok, eval_ex, eval_tok)
    error = None
    if state.is_main_process:  # only the main process writes the manifest and deletes stale work
        hub = {"start_model_id": hub_id, "start_model_commit": commit} if hub_id else {}
        data_info = {"train": train_info, "eval": eval_info}
        _, error = attempt(_update_manifest, ws, data_hash, data_info, force, hub)
    agree(state, error, "checking the run directory")
    if not state.is_main_process:
        manifest.reload()
    _resolve_batch_sizes(ws)
    return ws


def _refuse_cut_unlike_samples(cfg: RunConfig, train_tok: list[TokenizedExample]) -> None:
    """Refuse real responses cut (data.overlong=truncate) at a length no synthetic sample is cut at.

    A cut real response is exactly `data.max_response_tokens` = L tokens without end-of-turn; a capped
    sample is `generation.max_new_tokens` = M tokens without it. With L != M every cut real response
    has a shape no sample has. Cutting the samples at L instead is no way out: for L < M it is the same
    as sampling with M = L (a sample's first L tokens are drawn the same whether generation goes on or
    not), which the config can say openly instead of spaceft overriding M behind it; for L > M no
    sample is long enough to be cut at L. So the two caps must agree, and the run stops before any work
    (only when some response was cut: with none, no such marker exists)."""
    d, cap = cfg.data, cfg.generation.max_new_tokens
    cut = sum(t.truncated for t in train_tok)
    if cut and cfg.train.loss.uses_synthetic and d.max_response_tokens != cap:
        raise ValueError(
            f"data.overlong=truncate cut {cut} of {len(train_tok)} real responses to "
            f"data.max_response_tokens={d.max_response_tokens} tokens without end-of-turn, but synthetic "
            f"samples are capped at generation.max_new_tokens={cap}: the cut length alone marks those "
            "responses as real. Set both to the same number"
        )


def _warn_longer_than_samples(cfg: RunConfig, train_tok: list[TokenizedExample]) -> None:
    """Real responses longer than any synthetic sample can be make length alone tell them apart."""
    cap = cfg.generation.max_new_tokens
    longer = sum(len(t.response_ids) > cap for t in train_tok)
    if longer and cfg.train.loss.uses_synthetic:
        log.warning(
            "%d of %d real responses are longer than generation.max_new_tokens=%d, which no synthetic "
            "sample can be (length alone tells those apart): raise generation.max_new_tokens to "
            "data.max_response_tokens=%d, or lower the latter with data.overlong=truncate",
            longer, len(train_tok), cap, cfg.data.max_response_tokens,
        )  # fmt: skip


def _resolve_batch_sizes(ws: Workspace) -> None:
    """Turn `auto` batch sizes into numbers: the ones recorded in the manifest, else chosen from memory
    (spaceft.batching) by the main process and recorded, the same on every process."""
    cfg, state = ws.cfg, ws.state
    auto = [name for name, section in (("generation", cfg.generation), ("eval", cfg.eval))
            if section.batch_size == "auto"]  # fmt: skip
    if not auto:
        return
    chosen, error = {}, None
    if state.is_main_process:
        chosen, error = attempt(_choose_batch_sizes, ws, auto)
    agree(state, error, "choosing the batch sizes")
    chosen = broadcast(state, chosen)
    # a resolved copy: the caller's config keeps `auto`, so running it again (another stage, as a library
    # call) is not mistaken for a changed config (GPU check: "generation.batch_size: 'auto' -> 128")
    ws.cfg = replace(
        cfg,
        generation=replace(cfg.generation, batch_size=chosen.get("generation", cfg.generation.batch_size)),
        eval=replace(cfg.eval, batch_size=chosen.get("eval", cfg.eval.batch_size)),
    )


def _choose_batch_sizes(ws: Workspace, auto: list[str]) -> dict[str, int]:
    cfg = ws.cfg
    recorded = ws.manifest.data.get("batch_sizes", {})
    new_tokens = {"generation": cfg.generation.max_new_tokens,
                  "eval": max(cfg.eval.max_new_tokens, cfg.data.max_response_tokens)}  # fmt: skip
    shape = None
    for name in auto:
        if name not in recorded:
            m = cfg.model
            shape = shape or ModelShape.of(AutoConfig.from_pretrained(
                ws.start_model, revision=m.revision, trust_remote_code=m.trust_remote_code))  # fmt: skip
            rows = cfg.generation.num_samples if name == "generation" else 1
            recorded[name] = auto_batch_size(shape, prompt_tokens=cfg.data.max_prompt_tokens,
                                             new_tokens=new_tokens[name], dtype=cfg.model.dtype,
                                             device=ws.device, rows_per_prompt=rows)  # fmt: skip
            log.info("%s.batch_size=auto: %d prompts per batch (recorded in the manifest)", name,
                     recorded[name])  # fmt: skip
    ws.manifest.data["batch_sizes"] = recorded
    ws.manifest.save()
    return {name: int(recorded[name]) for name in auto}


HUB_DOWNLOAD_LIMIT_S = 12 * 3600
"""How long the other processes wait for the main process to download the start model: a first
download of a 70B model's 140 GB takes hours on a slow link, far past the process group's timeout
(`selfplay.distributed_timeout_s`, 30 min by default), which a collective waiting on it would die of."""


def _pin_hub_model(cfg: RunConfig, repo_id: str, state: PartialState) -> tuple[str, str]:
    """The local snapshot of `repo_id` and its commit: the commit this run recorded, else the one the
    main process resolves from `model.revision` (or the default branch); every process uses it.

    The others wait for the main process's download in a `patient_group` with its own limit
    (`HUB_DOWNLOAD_LIMIT_S`), not in the process group, whose timeout is meant for quick collectives."""
    pin = partial(pin_snapshot, repo_id, cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)

    def pin_as_recorded() -> tuple[Path, str]:
        old = Manifest.open(cfg.run_dir).data
        model = old.get("config", {}).get("model", {})
        same = old.get("start_model_id") == repo_id and model.get("revision") == cfg.model.revision
        return pin(commit=old.get("start_model_commit") if same else None)

    pinned: tuple[Path, str] | None = None
    error = None
    patient = patient_group(state, HUB_DOWNLOAD_LIMIT_S)
    if state.is_main_process:  # everything that can fail here is inside attempt: the others wait at agree
        pinned, error = attempt(pin_as_recorded)
    agree(state, error, f"fetching the model {repo_id}", group=patient)
    commit = broadcast(state, pinned[1] if pinned else None, group=patient)
    if pinned is None:  # the main process has downloaded it: read the cache (another node downloads)
        pinned, error = attempt(partial(pin, commit=commit, local_first=True))
    agree(state, error, f"reading the model {repo_id} at commit {commit}", group=patient)
    if patient is not None:
        torch.distributed.destroy_process_group(patient)
    assert pinned is not None
    path = pinned[0]
    log.info("model %s: commit %s, read from %s", repo_id, commit, path)
    return str(path), commit


def _update_manifest(
    ws: Workspace, data_hash: str, data_info: dict[str, Any], force: bool, hub: dict[str, Any]
) -> None:
    cfg, manifest = ws.cfg, ws.manifest
    check_resume(manifest, cfg, data_hash, force)
    for key in ("start_model_id", "start_model_commit"):
        manifest.data.pop(key, None)
    manifest.data.update(
        **hub,
        config=cfg.to_dict(),
        fingerprint=cfg.training_fingerprint(),
        eval_fingerprint=cfg.eval_fingerprint(),
        data_hash=data_hash,
        start_model=ws.start_model,
        start_model_hash=_start_model_hash(manifest, ws.start_model, hub.get("start_model_commit")),
        versions={**manifest.data.get("versions", {}), **library_versions()},
        effective_beta=cfg.train.beta if cfg.train.beta is not None else cfg.train.loss.default_beta,
        data=data_info,
    )
    manifest.save()


def loaded_model(ws: Workspace, path: str) -> torch.nn.Module:
    """The model saved at `path`, loaded once and kept until another is needed (or training changes it)."""
    if path not in ws.models:
        release_models(ws)
        ws.models[path] = load_model(path, ws.cfg.model).to(ws.device)
    return ws.models[path]


def release_models(ws: Workspace) -> None:
    """Drop the loaded model and free its memory (before a generation backend loads its own copy of the
    weights, or another model loads)."""
    ws.models.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
