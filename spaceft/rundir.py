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

A crash can still leave the temporary names behind (`.model.tmp-1a2b3c4d/` holding a full model);
`clean_leftovers` removes them at the next start, under the run directory's lock (`lock_run_dir`), which
also keeps a second run from writing into the same directory. Temporary files are created by the code
that writes them, not by `mkstemp`, so their mode follows the umask like every other output.

Parts are the unit of data parallelism too: with several processes, part c is written by the process
whose `Shard` owns it (c mod the number of shards), and the main process joins them. The parts are
cut the same way whatever the number of processes, so the joined table does not depend on it and a
stage resumed with another number of processes reuses every finished part. A part's file name carries
a tag (a hash of everything its content depends on), so a part left by an older input is never read.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised by `maybe_fail` to test resume (SPACEFT_FAULT=stage:count)."""


def maybe_fail(stage: str, count: int) -> None:
    """Fault injection for resume tests: SPACEFT_FAULT=generate:2 fails after 2 generation parts.

    `stage:count:kill` ends the process with SIGKILL instead (a kill -9 at a known point), and a
    trailing `@R` limits the fault to the process of rank R (`generate:1@1`).
    """
    spec = os.environ.get("SPACEFT_FAULT", "")
    if not spec:
        return
    spec, _, rank = spec.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return
    kill = spec.endswith(":kill")
    if spec.removesuffix(":kill") != f"{stage}:{count}":
        return
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault in {stage} after {count} unit(s) of work")


def temp_name(path: Path) -> Path:
    """A fresh temporary name next to `path`, of the form `clean_leftovers` recognises."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (not yet created); rename it onto `path` if the block
    succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_name(path)
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
    tmp = temp_name(path)
    tmp.mkdir()
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
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: Path) -> Any:
    """Read a JSON file; a damaged one raises `DamagedFileError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFileError(path, f"not valid JSON ({e})") from None


class DamagedFileError(ValueError):
    """A file of the run directory cannot be read back; the message names it and what to do."""

    def __init__(self, path: Path, problem: str, remedy: str = "") -> None:
        self.path = path
        super().__init__(f"{path} is damaged: {problem}" + (f"; {remedy}" if remedy else ""))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines log such as metrics.jsonl. A torn last line (a crash while appending) is
    dropped with a warning; a damaged line before it raises `DamagedFileError`."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines):
                log.warning("%s: dropping its torn last line %d (left by an interrupted run)", path, i)
                break
            raise DamagedFileError(
                path, f"line {i} is not a JSON object ({e})", "delete the file (only its log lines are lost)"
            ) from None
        rows.append(row)
    return rows


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def read_table(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def file_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents) in sorted order."""
    return file_hashes(path)[0]


def file_hashes(path: Path, without: str = "") -> tuple[str, str]:
    """`file_hash(path)`, and in the same read the hash of the directory without its file `without` (a
    saved model's weights and tokenizer without the run's config that travels with them)."""
    full = hashlib.sha256()
    rest = hashlib.sha256() if without else full  # nothing left out: one hash, computed once
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        left_out = path.is_dir() and str(f.relative_to(path)) == without
        hashers = [full] if left_out or rest is full else [full, rest]
        if path.is_dir():
            for h in hashers:
                h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                for h in hashers:
                    h.update(block)
    return full.hexdigest()[:16], rest.hexdigest()[:16]


@dataclass(frozen=True)
class Shard:
    """The work units of one process: unit u belongs to shard u mod `count`."""

    index: int = 0
    count: int = 1

    def units(self, n: int) -> range:
        return range(self.index, n, self.count)


ONE_PROCESS = Shard()


def parts_dir(out: Path) -> Path:
    return out.with_name(out.stem + ".parts")


def _part(out: Path, tag: str, c: int) -> Path:
    return parts_dir(out) / f"part-{tag}-{c:05d}.parquet" if tag else parts_dir(out) / f"part-{c:05d}.parquet"


def write_parts(
    out: Path,
    n_chunks: int,
    make_chunk: Callable[[int], list[dict[str, Any]]],
    *,
    stage: str,
    tag: str = "",
    shard: Shard = ONE_PROCESS,
    write: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Write this shard's parts of `out`, skipping the ones a previous (crashed) run finished.

    `make_chunk(c)` must be deterministic in `c` so that a resumed stage equals an uninterrupted one.
    `write=False` runs `make_chunk` without keeping its rows (a process that helps another compute).
    """
    parts_dir(out).mkdir(parents=True, exist_ok=True)
    done = 0
    for c in shard.units(n_chunks):
        part = _part(out, tag, c)
        if part.exists():
            log.info("%s: part %d/%d already done, skipping", stage, c + 1, n_chunks)
        else:
            rows = make_chunk(c)
            if write:
                write_table(part, rows)
            done += 1
            maybe_fail(stage, done)
        if on_chunk is not None:
            on_chunk(c)


def pending_parts(out: Path, n_chunks: int, *, tag: str = "", shard: Shard = ONE_PROCESS) -> list[int]:
    """This shard's parts of `out` that are not written yet (what `write_parts` will compute)."""
    return [c for c in shard.units(n_chunks) if not _part(out, tag, c).exists()]


def merge_parts(out: Path, n_chunks: int, *, tag: str = "") -> list[dict[str, Any]]:
    """Join the parts of `out` in order into `out`, then remove them (and any stale ones)."""
    rows: list[dict[str, Any]] = []
    for c in range(n_chunks):
        part = _part(out, tag, c)
        if not part.exists():
            raise RuntimeError(f"{part} is missing: a process did not finish its share; run the stage again")
        rows.extend(read_table(part))
    write_table(out, rows)
    shutil.rmtree(parts_dir(out))
    return rows


def content_hash(*parts: Any) -> str:
    """A short sha256 of values (ints, strings, sequences of ints) that identify some content.

    The digest is that of each part's `repr`, but the text is fed to the hash piece by piece
    (`_repr_pieces`): a parts tag over 50k prompts' token lists would otherwise build one string of
    hundreds of MB. The digests are the ones the whole `repr` gave, so recorded tags and cache keys stay
    valid."""
    h = hashlib.sha256()
    for p in parts:
        for piece in _repr_pieces(p):
            h.update(piece.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


_CONTAINERS = (list, tuple, dict)


def _repr_pieces(obj: Any) -> Iterator[str]:
    """Pieces whose concatenation is `repr(obj)`, each at most one innermost container's text.

    A list, tuple or dict whose first item is itself a plain container is written item by item; any
    other value (a token list, a key tuple, a number) by its own `repr`. Exact types only: a subclass
    (a named tuple) has its own `repr`, which is used whole."""
    kind = type(obj)
    if kind is dict and obj and type(next(iter(obj.values()))) in _CONTAINERS:
        yield "{"
        for i, (key, value) in enumerate(obj.items()):
            yield f"{', ' if i else ''}{key!r}: "
            yield from _repr_pieces(value)
        yield "}"
    elif (kind is list or kind is tuple) and obj and type(obj[0]) in _CONTAINERS:
        yield "[" if kind is list else "("
        for i, item in enumerate(obj):
            if i:
                yield ", "
            yield from _repr_pieces(item)
        yield "]" if kind is list else ("," if len(obj) == 1 else "") + ")"
    else:
        yield repr(obj)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("spaceft", "torch", "transformers", "accelerate", "datasets", "peft", "tokenizers", "vllm"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


MANIFEST_REMEDY = (
    "rerun with --force to start this run over (its finished work is discarded), or use another name"
)


@dataclass
class Manifest:
    """runs/NAME/manifest.json: what was asked, with what, and which stages are done."""

    path: Path
    data: dict[str, Any]

    @classmethod
    def open(cls, run_dir: Path) -> Manifest:
        path = run_dir / "manifest.json"
        if not path.exists():
            return cls(path, {"iterations": {}})
        problem = ""
        try:
            data = read_json(path)
        except DamagedFileError as e:
            problem = "empty" if path.stat().st_size == 0 else str(e).split(": ", 1)[1]
        else:
            if not (isinstance(data, dict) and isinstance(data.get("iterations"), dict)):
                problem = "not a spaceft manifest (no 'iterations' mapping)"
        if problem:
            raise DamagedFileError(path, problem, MANIFEST_REMEDY)
        return cls(path, data)

    def save(self) -> None:
        write_json(self.path, self.data)

    def reload(self) -> None:
        """Read it again from disk (another process has saved it since)."""
        self.data = Manifest.open(self.path.parent).data

    @property
    def config(self) -> dict[str, Any]:
        """The run's settings as recorded when it started (plain values by section), {} before."""
        return self.data.get("config", {})

    @property
    def start_model(self) -> str | None:
        """The start model as the run named it (None before it is recorded)."""
        return self.data.get("start_model")

    def stage(self, iteration: int | str, stage: str) -> dict[str, Any] | None:
        """The entry of `stage` in iteration `iteration` (done or running), or None."""
        return self.data["iterations"].get(str(iteration), {}).get(stage)

    def is_done(self, iteration: int | str, stage: str) -> bool:
        return is_done(self.data, iteration, stage)

    def mark_done(self, iteration: int | str, stage: str, **info: Any) -> None:
        self.data["iterations"].setdefault(str(iteration), {})[stage] = {"status": "done", **info}
        self.save()

    def mark_running(self, iteration: int | str, stage: str, **info: Any) -> None:
        """Record that `stage` has started (with what a resume must know, such as the process count)."""
        self.data["iterations"].setdefault(str(iteration), {})[stage] = {"status": "running", **info}
        self.save()

    def clear(self, iteration: int | str, stage: str) -> None:
        self.data["iterations"].get(str(iteration), {}).pop(stage, None)
        self.save()

    def records(self) -> list[StageRecord]:
        """Every stage entry: "base" first, then the iterations in order."""
        its = self.data["iterations"]
        order = sorted(its, key=lambda k: -1 if k == "base" else int(k) if k.isdigit() else 1 << 30)
        return [
            StageRecord(int(k) if k.isdigit() else k, stage, str(entry.get("status", "")), entry)
            for k in order
            for stage, entry in its[k].items()
        ]

    def has_iterations(self) -> bool:
        """Whether any iteration (or the base evaluation) has been recorded, even if emptied since."""
        return bool(self.data["iterations"])

    def iterations(self) -> list[int]:
        """The numbered iterations that have an entry."""
        return sorted(int(k) for k in self.data["iterations"] if k.isdigit())

    def drop_after(self, iteration: int) -> None:
        """Forget every iteration after `iteration`."""
        for k in [k for k in self.data["iterations"] if k.isdigit() and int(k) > iteration]:
            del self.data["iterations"][k]
        self.save()

    def drop_all(self) -> None:
        """Forget every stage entry (saved with the caller's other changes)."""
        self.data["iterations"] = {}

    def opponent_hash(self, t: int, start_model: str) -> str:
        """Hash of θt's weights: the start model's (recorded by the workspace), or the hash recorded when
        iteration t-1 trained."""
        if t == 0:
            return str(self.data.get("start_model_hash", start_model))
        return str((self.stage(t - 1, "train") or {}).get("hash", ""))


def is_done(data: dict[str, Any], iteration: int | str, stage: str) -> bool:
    """Whether a manifest's contents (`Manifest.data`) record `stage` of `iteration` as done."""
    entry = data["iterations"].get(str(iteration), {}).get(stage)
    return bool(entry and entry.get("status") == "done")


@dataclass(frozen=True)
class StageRecord:
    """One stage's entry of one iteration in the manifest."""

    iteration: int | str
    stage: str
    status: str
    info: dict[str, Any]
    """The whole entry as recorded (its status, hashes, timings and the stage's own numbers)."""

    @property
    def done(self) -> bool:
        return self.status == "done"


# ----------------------------------------------------------------------------------- crash leftovers

_LEFTOVER = re.compile(
    r"^\..+\.tmp-[0-9a-f]{8}$"  # atomic_path / atomic_dir
    r"|^\..+\.[a-z0-9_]{8}(\.tmp)?$"  # mkstemp-style names (tasks.py's; older releases')
    r"|^\..+\.old$"  # atomic_dir's swap
    r"|^train_state\.(tmp|old)$"  # train.py's state swap
)


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove the temporary files and directories an interrupted write left in `run_dir`.

    Call only while holding the run's lock: another live run's temporaries look the same. A complete
    `train_state.tmp` (it holds its resume marker) without a `train_state` beside it is the newest
    state, caught between the two renames of its swap: it is promoted instead of removed.
    """
    removed = []
    for root, dirs, files in os.walk(run_dir):
        for name in [*dirs, *files]:
            if not _LEFTOVER.match(name):
                continue
            path = Path(root) / name
            live = path.with_name("train_state")
            if name == "train_state.tmp" and not live.exists() and (path / "progress.json").exists():
                os.replace(path, live)
                log.warning("recovered the training state %s from an interrupted save", live)
                continue
            try:  # another process's short-lived probe may already be gone
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
        dirs[:] = [d for d in dirs if (Path(root) / d).exists()]
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted run in %s", len(removed), run_dir)
    return removed


# ------------------------------------------------------------------------------------------- locking


class RunDirBusyError(RuntimeError):
    """Another process holds the run directory's lock."""


_HELD: dict[Path, int] = {}


def lock_run_dir(run_dir: Path, command: str | None = None) -> None:
    """Take `run_dir/spaceft.lock` for this process (again: a no-op), or raise `RunDirBusyError`
    naming its holder. The kernel drops the lock when the process ends, however it ends, so a crashed
    run never leaves the directory locked."""
    key = run_dir.resolve()
    if key in _HELD:
        return
    path = run_dir / "spaceft.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise RunDirBusyError(
            f"{run_dir} is in use by {_holder(path)}: wait for that run to end, or give this one another "
            "name (name=...)"
        ) from None
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _shorten(command or " ".join(["spaceft", *sys.argv[1:]])),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    _HELD[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    fd = _HELD.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        return f"process {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
