"""The grid's results kept in the repository, so that a grid of many hours survives the machine it ran on.

A finished run's tables need only small files: its manifest (which stages finished), each evaluation's
per-problem results, its per-iteration diagnostics and the token counts kept in the grid state. The
weights (~0.5 GB a model) stay behind. `save` copies those files of every finished run into a directory
that is committed (per-problem results gzipped, byte-for-byte reproducible); `restore` copies them back
into a fresh output directory, where the runs count as finished, so the grid goes on with what is left
and `--report-only` rebuilds every table from the archive alone.

Layout: ARCHIVE/grid_state.json (the state's entries for the archived runs, the tuned settings and the
matched SFT epochs), ARCHIVE/RUN/manifest.json, diagnostics.json, report.md and, per evaluation key
(base, iter_T), eval.json, eval_samples.jsonl.gz, metrics.jsonl, train_summary.json.

The shared SFT start models are not archived (they are weights, and a minute to retrain); only their
manifests are, as start-N*/manifest.json, so that a restored grid can check that its retrained start has
the weights the archived runs started from (`check_start`): otherwise new and archived runs would not
share a start and their comparison would be void.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from spaceft.rundir import atomic_path, read_json, temp_name

log = logging.getLogger("replicate")

STATE = "grid_state.json"
DIAGNOSTICS = "diagnostics.json"
RUN_FILES = ("manifest.json", DIAGNOSTICS, "report.md")
STEP_FILES = ("eval.json", "eval_samples.jsonl", "metrics.jsonl", "train_summary.json")
GZIPPED = ("eval_samples.jsonl",)
STATE_KEYS = ("best", "matched_epochs")


def _copy(src: Path, dst: Path, *, pack: bool, gz: bool | None = None) -> None:
    """Copy src to dst atomically; gzip (pack) or gunzip (not pack) it when `gz` (by default: for the
    files named in GZIPPED)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if gz is None:
        gz = src.name.removesuffix(".gz") in GZIPPED
    with atomic_path(dst) as tmp:
        if pack and gz:
            # mtime 0 and no file name: the same results give the same bytes (a clean git diff)
            with src.open("rb") as fin, tmp.open("wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as z:
                shutil.copyfileobj(fin, z)
        elif not pack and gz:
            with gzip.open(src, "rb") as fin, tmp.open("wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(src, tmp)


def save_tree(src: Path, dest: Path) -> None:
    """Every file under src into dest, the .jsonl files gzipped (a benchmark's per-item samples)."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        jsonl = path.suffix == ".jsonl"
        _copy(path, dest / (str(rel) + (".gz" if jsonl else "")), pack=True, gz=jsonl)


def restore_tree(src: Path, dest: Path) -> None:
    """The inverse of `save_tree`."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        packed = path.name.endswith(".jsonl.gz")
        _copy(path, dest / (str(rel).removesuffix(".gz") if packed else rel), pack=False, gz=packed)


def _steps(run_dir: Path) -> list[Path]:
    return sorted(
        p for p in run_dir.iterdir() if p.is_dir() and (p.name == "base" or p.name.startswith("iter_"))
    )


def save_run(run_dir: Path, dest: Path) -> None:
    """The small files of one finished run, into dest (replacing what was there)."""
    tmp = temp_name(dest)  # a fresh name: two savers never share a half-written copy
    tmp.mkdir(parents=True)
    for name in RUN_FILES:
        if (run_dir / name).exists():
            _copy(run_dir / name, tmp / name, pack=True)
    for step in _steps(run_dir):
        for name in STEP_FILES:
            if (step / name).exists():
                suffix = ".gz" if name in GZIPPED else ""
                _copy(step / name, tmp / step.name / (name + suffix), pack=True)
    old = temp_name(dest)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def restore_run(src: Path, run_dir: Path) -> None:
    """An archived run back into run_dir (which must not exist): manifest, evaluations, diagnostics."""
    tmp = temp_name(run_dir)
    restore_tree(src, tmp)  # the only gzipped files are GZIPPED .jsonl files
    tmp.rename(run_dir)


def save(
    out: Path, state: dict[str, Any], archive: Path, finished: list[str], starts: list[str]
) -> list[str]:
    """Archive the finished runs (names in `finished`) and the start runs' manifests. A run already
    archived is copied again only if its manifest changed (a re-run). Returns the runs that could not
    be archived (each logged; the others are archived all the same)."""
    archive.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in finished:
        dest = archive / name
        same = (dest / "manifest.json").exists() and (dest / "manifest.json").read_bytes() == (
            out / name / "manifest.json"
        ).read_bytes()
        if not same or not (dest / DIAGNOSTICS).exists():
            try:
                save_run(out / name, dest)
            except OSError:
                log.exception("could not archive %s", name)
                failed.append(name)
    for name in starts:  # never replaced: the archived runs began from that start (`check_start`)
        if (out / name / "manifest.json").exists() and not (archive / name / "manifest.json").exists():
            _copy(out / name / "manifest.json", archive / name / "manifest.json", pack=True)
    old = read_json(archive / STATE) if (archive / STATE).exists() else {"runs": {}}
    ok = [n for n in [*finished, *starts] if n in state["runs"] and n not in failed]
    saved = {"runs": {**old["runs"], **{n: state["runs"][n] for n in ok}}}
    for key in STATE_KEYS:  # merged, as the runs are: what the archive has and this state lacks stays
        saved[key] = {**old.get(key, {}), **state.get(key, {})}
    with atomic_path(archive / STATE) as tmp:  # sorted and indented: a readable git diff
        tmp.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
    return failed


def restore(out: Path, state: dict[str, Any], archive: Path, size: int | None = None) -> list[str]:
    """Copy every archived run that `out` lacks (of training size `size`, or all) into it and merge its
    grid-state entry; the tuned settings and matched epochs are taken from the archive where the state
    has none. Start runs are never restored (they are retrained; see `check_start`), and a run whose
    directory is in `out` keeps it (its state entry is taken from the archive if the state lost it).
    Returns the names restored."""
    if not (archive / STATE).exists():
        return []
    saved = read_json(archive / STATE)
    restored = []
    for name, entry in sorted(saved["runs"].items()):
        if entry.get("group") == "start" or not (archive / name).is_dir():
            continue
        if size is not None and entry.get("n") != size:
            continue
        if not (out / name).exists():
            restore_run(archive / name, out / name)
            state["runs"][name] = entry
            restored.append(name)
        else:
            state["runs"].setdefault(name, entry)
    for key in STATE_KEYS:
        for k, v in saved.get(key, {}).items():
            state.setdefault(key, {}).setdefault(k, v)
    return restored


def start_weights(manifest: Path) -> str | None:
    """The weights hash of a start run's trained model (its only iteration), from its manifest."""
    if not manifest.exists():
        return None
    return (read_json(manifest).get("iterations", {}).get("0", {}).get("train") or {}).get("weights")


def check_start(out: Path, archive: Path, name: str) -> None:
    """Refuse to go on when the start model just trained is not the one the archived runs started from.
    Called before the runs of that start are restored, so a refused archive leaves nothing in `out`."""
    want, have = start_weights(archive / name / "manifest.json"), start_weights(out / name / "manifest.json")
    if want is not None and have is not None and want != have:
        raise RuntimeError(
            f"{name}: the start model trained here (weights {have[:12]}) is not the one the archived runs "
            f"in {archive} started from ({want[:12]}); their results cannot be mixed with new runs. "
            f"Continue with the code and settings that made the archive, or start afresh with another "
            f"--archive directory and another --out"
        )
    if want is None and have is not None and (archive / STATE).exists():
        log.warning("%s: the archive %s has no manifest of this start to check it against", name, archive)
