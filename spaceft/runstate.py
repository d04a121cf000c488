"""Done, stale and redo: what of a run's finished work still holds, all of it read off the stage table.

A finished stage is redone, with everything built on it (its later stages in the iteration and, unless
it is an evaluation, every later iteration), when
- the user re-runs it (`spaceft generate -t T`): `invalidate_from`;
- the rule its row of `spaceft.stages.TABLE` states says it is stale (another opponent, other samples,
  other micro-batches): `drop_stale_work`;
- an output a pending stage will read no longer matches the hash recorded when it was written:
  `verify_pending_inputs`;
- the config that decides it changed: `check_resume` refuses, or with `force` discards it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spaceft.config import RunConfig
from spaceft.fingerprint import eval_view, training_view
from spaceft.rundir import Manifest, file_hash, is_done
from spaceft.stages import BY_NAME, STAGES, TABLE, Iteration, from_stage

log = logging.getLogger(__name__)


class StaleRunError(RuntimeError):
    """The run directory holds finished work made with a different config."""


def iter_dir(run_dir: Path, t: Iteration) -> Path:
    return run_dir / ("base" if t == "base" else f"iter_{t}")


def unfinished(cfg: RunConfig, manifest: Manifest, stage: str) -> list[int]:
    """The iterations whose `stage` has not finished."""
    return [t for t in range(cfg.selfplay.iterations) if not is_done(manifest.data, t, stage)]


# ----------------------------------------------------------------------------------- re-runs and rules


def invalidate_from(m: Manifest, run_dir: Path, t: Iteration, stage: str) -> None:
    """Forget `stage` of iteration t and everything computed from it, in the manifest and on disk: its
    later stages, and (unless nothing reads it: an evaluation) every later iteration."""
    for s in from_stage(stage):
        m.clear(t, s.name)
        for name in s.outputs:
            path = iter_dir(run_dir, t) / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if not BY_NAME[stage].eval_only:
        on_disk = {int(p.name[5:]) for p in run_dir.glob("iter_*") if p.name[5:].isdigit()}
        later = sorted(k for k in on_disk | set(m.iterations()) if k > int(t))
        if later:
            log.warning("re-running %s of iteration %s invalidates iteration(s) %s", stage, t,
                        ", ".join(map(str, later)))  # fmt: skip
        m.drop_after(int(t))
        for k in later:
            shutil.rmtree(iter_dir(run_dir, k), ignore_errors=True)
    m.save()


def drop_stale_work(
    m: Manifest,
    cfg: RunConfig,
    only_stage: str | None,
    only_iteration: int | None,
    *,
    opponent: Callable[[int], str],
    composition: Callable[[int], str],
) -> None:
    """Main process: what a stage re-run (`spaceft generate -t T`) or a stage's stale rule makes stale
    (`opponent(t)`: the hash of θt's weights now; `composition(t)`: training's micro-batches now)."""
    if only_stage is not None:
        t = only_iteration if only_iteration is not None else 0
        invalidate_from(m, cfg.run_dir, "base" if t < 0 else t, "eval" if t < 0 else only_stage)
    for t in range(cfg.selfplay.iterations):
        for stage in TABLE:
            why = None
            if stage.stale is not None and stage.applies(cfg, t):
                why = stage.stale(cfg, m, t, opponent(t), lambda t=t: composition(t))  # type: ignore[misc]
            if why:
                log.warning("iteration %d: %s", t, why)
                invalidate_from(m, cfg.run_dir, t, stage.name)
                break


# ----------------------------------------------------------------------------------- damaged outputs


def verify_output(run_dir: Path, iteration: Iteration, stage: str, entry: dict[str, Any]) -> str | None:
    """Check a finished stage's output against the hash recorded in the manifest when it was written;
    return what is wrong with it, or None."""
    name = BY_NAME[stage].hashed
    expected = entry.get("hash")
    if name is None or not expected:
        return None
    path = iter_dir(run_dir, iteration) / name
    if not path.exists():
        return f"{path} is missing, though manifest.json records {stage} as done"
    if file_hash(path) != expected:
        return f"{path} does not match the hash recorded in manifest.json (truncated or changed since)"
    return None


def _pending_reads(m: Manifest, cfg: RunConfig) -> set[tuple[int, str]]:
    """The (iteration, stage) outputs that a stage still to run will read."""
    total = cfg.selfplay.iterations
    return {
        need
        for u in range(total)
        for s in TABLE
        if s.applies(cfg, u) and not m.is_done(u, s.name)
        for need in s.needs(cfg, u)
    }


def verify_pending_inputs(manifest: Manifest, cfg: RunConfig) -> None:
    """Check, against the manifest's hashes, each finished output that a stage still to run will read;
    a damaged one is redone, with what was built on it, instead of failing the run (or every re-run).

    Outputs nothing will read again are not hashed (a 7B model takes a while), nor are the outputs of
    a run whose training config changed (they are stale and handled by `check_resume`).
    """
    if manifest.data.get("fingerprint") != cfg.training_fingerprint():
        return
    changed = True
    while changed:  # redoing a stage makes its inputs needed again: check until nothing changes
        changed = False
        needed = _pending_reads(manifest, cfg)
        for t in range(cfg.selfplay.iterations):
            for s in TABLE:
                entry = manifest.stage(t, s.name)
                if s.hashed is None or (t, s.name) not in needed or not manifest.is_done(t, s.name):
                    continue
                problem = verify_output(cfg.run_dir, t, s.name, entry or {})
                if problem:
                    log.warning("%s: redoing %s of iteration %d and what was built on it", problem, s.name, t)
                    forget_from(manifest, t, s.name)
                    changed = True
                    break
            if changed:
                break


def forget_from(manifest: Manifest, t: int, stage: str) -> None:
    """Mark `stage` of iteration t, its later stages and every later iteration as not done (the files
    stay: a stage that runs again replaces them)."""
    for s in from_stage(stage):
        manifest.clear(t, s.name)
    manifest.drop_after(t)


# ----------------------------------------------------------------------------------- config changes


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


def check_resume(manifest: Manifest, cfg: RunConfig, data_hash: str, force: bool) -> None:
    """Refuse to mix finished work from another config (or data) with this one, unless forced."""
    stored = manifest.data.get("config")
    if stored is None:
        return
    current = cfg.to_dict()
    new = _as_recorded(current, stored)
    for section in ("generation", "eval"):  # a run from before `auto` keeps its number (dropped if stale)
        if new[section]["batch_size"] != current[section]["batch_size"]:
            manifest.data.setdefault("batch_sizes", {}).setdefault(section, new[section]["batch_size"])
    train_changes = _diff(training_view(stored), training_view(new))
    if manifest.data.get("data_hash") != data_hash:
        train_changes.append("the training data changed")
    eval_changes = _diff(eval_view(stored), eval_view(new))
    if not manifest.has_iterations():
        if train_changes:  # nothing finished: just drop the partial parts of the old config
            for child in cfg.run_dir.glob("iter_*"):
                shutil.rmtree(child)
            manifest.data.pop("batch_sizes", None)  # chosen for the old config
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
        manifest.drop_all()
        manifest.data.pop("batch_sizes", None)  # chosen for the old model and lengths
    else:
        log.warning("--force: eval settings changed; re-running evaluations only")
        manifest.data.get("batch_sizes", {}).pop("eval", None)
        for r in manifest.records():
            if r.stage in BY_NAME and BY_NAME[r.stage].eval_only:
                manifest.clear(r.iteration, r.stage)


def _as_recorded(new: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """The new config with `batch_size: auto` read as the number a run made before `auto` existed
    recorded (the default was 16): that run's batches stay as they were, and it is not stale."""
    for section in ("generation", "eval"):
        old = stored.get(section, {}).get("batch_size")
        if new.get(section, {}).get("batch_size") == "auto" and isinstance(old, int):
            new = {**new, section: {**new[section], "batch_size": old}}
    return new


__all__ = ["STAGES", "StaleRunError", "check_resume", "drop_stale_work", "invalidate_from", "unfinished",
           "verify_output", "verify_pending_inputs"]  # fmt: skip
