"""A start model named by hub id: one commit, downloaded once, for the whole run.

Loading `org/name` by id in every stage would let each stage (generation, scoring, evaluation, vLLM,
lm-eval) resolve the branch again: a push to the repository during a run, or between a run and its
resume, would silently give the opponent of iteration 0 other weights than the ones that were scored.
So `prepare` resolves the id once to a commit (`model.revision` if it names one, else the branch's
current commit; a resumed run keeps the commit it recorded), downloads that commit's files into the
Hugging Face cache, and every stage reads the local snapshot directory. The manifest records the id and
the commit; the commit is the start model's hash (a git commit names its files' contents).

What is downloaded is what `from_pretrained` reads, not the whole repository: the top-level JSON and
tokenizer files (Python files only with `trust_remote_code`), then the weights the index names — so a
repository that also ships a `consolidated.safetensors` or an `original/` folder does not cost twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SMALL_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".jinja")
WEIGHT_LAYOUTS = (  # in from_pretrained's order of preference: (index file, single file)
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def small_files(files: Sequence[str], *, trust_remote_code: bool) -> list[str]:
    """The repository's top-level config and tokenizer files (and its code, when it is trusted)."""
    top = [f for f in files if "/" not in f]
    return [f for f in top if f.endswith(SMALL_SUFFIXES) or f.startswith("tokenizer")
            or (trust_remote_code and f.endswith(".py"))]  # fmt: skip


def weight_files(files: Sequence[str], snapshot: Path) -> list[str]:
    """The weight files `from_pretrained` loads: an index's shards (the index is in `snapshot` already),
    or the single file."""
    for index, single in WEIGHT_LAYOUTS:
        if index in files:
            shards = json.loads((snapshot / index).read_text(encoding="utf-8"))["weight_map"].values()
            return sorted(set(shards))
        if single in files:
            return [single]
    raise ValueError(
        "the repository has no weights that transformers loads (model.safetensors, pytorch_model.bin, or "
        "their sharded index)"
    )


def pin_snapshot(
    repo_id: str, revision: str | None, *, trust_remote_code: bool, commit: str | None = None,
    local_first: bool = False,
) -> tuple[Path, str]:  # fmt: skip
    """The local snapshot of `repo_id` at one commit, and the commit.

    `commit` (recorded by an earlier invocation of the run, or chosen by the main process) wins over
    `revision`. Offline, the snapshot must be in the cache already; online with the Hub unreachable, a
    cached snapshot is used with a warning (as `from_pretrained` would). `local_first`: read the cache
    before asking the Hub (the other processes, once the main process has downloaded).
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    wanted = commit or revision
    if hub_offline() or local_first:
        try:
            path = Path(snapshot_download(repo_id, revision=wanted, local_files_only=True))
            return path, path.name
        except Exception:
            if hub_offline():
                raise
    try:
        info = HfApi().model_info(repo_id, revision=wanted)
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception as e:  # no network, proxy, timeout: whatever the HTTP stack raises
        path = Path(snapshot_download(repo_id, revision=wanted, local_files_only=True))
        log.warning("the Hugging Face Hub is unreachable (%s); using the cached %s at commit %s",
                    type(e).__name__, repo_id, path.name)  # fmt: skip
        return path, path.name
    assert info.sha is not None
    files = [s.rfilename for s in info.siblings or []]
    small = small_files(files, trust_remote_code=trust_remote_code)
    path = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=small))
    snapshot_download(repo_id, revision=info.sha, allow_patterns=weight_files(files, path))
    return path, info.sha
