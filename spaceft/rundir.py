"""The run directory: atomic files, the manifest, and resumable chunked tables.

Layout (see docs/ARCHITECTURE.md):
    runs/NAME/manifest.json          resolved config, versions, per-iteration stage status + hashes
    runs/NAME/base/eval.json         evaluation of the starting model
    runs/NAME/iter_T/synthetic.parquet, opponent_logps.parquet, model/, train_state/,
                     metrics.jsonl, eval.json

Every file is written under a temporary name and renamed, so a crash leaves either the old file or
the new one, never half of one. A stage that produces a table writes it in numbered parts first;
a re-run skips the parts that exist and the stage ends by joining them into one file, so a crash in
the middle of a stage loses at most one part of work and never duplicates a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

STAGES = ("generate", "score", "train", "eval")


class InjectedFault(RuntimeError):
    """Raised by `maybe_fail` to test resume (SPACEFT_FAULT=stage:count)."""


def maybe_fail(stage: str, count: int) -> None:
    """Fault injection for resume tests: SPACEFT_FAULT=generate:2 fails after 2 generation parts."""
    spec = os.environ.get("SPACEFT_FAULT", "")
    if spec and spec == f"{stage}:{count}":
        raise InjectedFault(f"injected fault in {stage} after {count} unit(s) of work")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory; it replaces `path` (removing an old one) if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def read_table(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def file_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents) in sorted order."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def chunked_table(
    out: Path,
    n_chunks: int,
    make_chunk: Callable[[int], list[dict[str, Any]]],
    *,
    stage: str,
    on_chunk: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Build `out` from `n_chunks` parts, skipping the parts a previous (crashed) run finished.

    `make_chunk(c)` must be deterministic in `c` so that a resumed stage equals an uninterrupted one.
    """
    parts_dir = out.with_name(out.stem + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    done = 0
    for c in range(n_chunks):
        part = parts_dir / f"part-{c:05d}.parquet"
        if part.exists():
            log.info("%s: part %d/%d already done, skipping", stage, c + 1, n_chunks)
        else:
            write_table(part, make_chunk(c))
            done += 1
            maybe_fail(stage, done)
        if on_chunk is not None:
            on_chunk(c)
    rows: list[dict[str, Any]] = []
    for c in range(n_chunks):
        rows.extend(read_table(parts_dir / f"part-{c:05d}.parquet"))
    write_table(out, rows)
    shutil.rmtree(parts_dir)
    return rows


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("spaceft", "torch", "transformers", "accelerate", "datasets", "peft", "tokenizers", "vllm"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


@dataclass
class Manifest:
    """runs/NAME/manifest.json: what was asked, with what, and which stages are done."""

    path: Path
    data: dict[str, Any]

    @classmethod
    def open(cls, run_dir: Path) -> Manifest:
        path = run_dir / "manifest.json"
        data = read_json(path) if path.exists() else {"iterations": {}}
        return cls(path, data)

    def save(self) -> None:
        write_json(self.path, self.data)

    def stage(self, iteration: int | str, stage: str) -> dict[str, Any] | None:
        return self.data["iterations"].get(str(iteration), {}).get(stage)

    def is_done(self, iteration: int | str, stage: str) -> bool:
        entry = self.stage(iteration, stage)
        return bool(entry and entry.get("status") == "done")

    def mark_done(self, iteration: int | str, stage: str, **info: Any) -> None:
        self.data["iterations"].setdefault(str(iteration), {})[stage] = {"status": "done", **info}
        self.save()

    def clear(self, iteration: int | str, stage: str) -> None:
        self.data["iterations"].get(str(iteration), {}).pop(stage, None)
        self.save()
