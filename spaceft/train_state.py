"""The resumable training state of one iteration: written whole or not at all, read without unpickling.

`train_state/` holds Accelerate's state (model and optimizer as safetensors, random states) and
`progress.json` (the step and the scheduler's state as JSON), the marker that says the state is
complete. A save goes to a temporary directory and is swapped in; a load refuses pickles other than
Accelerate's random states and turns any unreadable file into a `DamagedFileError` that says how to
restart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from spaceft.rundir import DamagedFileError, atomic_path, read_json, read_jsonl, write_json

log = logging.getLogger(__name__)

STATE_FORMAT = 2  # 1: scheduler pickled by Accelerate (custom_checkpoint_0.pkl), never loaded again


def save_state(accelerator: Accelerator, state_dir: Path, step: int, scheduler: Any) -> None:
    """Write the training state to a temporary directory, then swap it in (a crash keeps the old one).

    The resume marker `progress.json` (step and scheduler state, as JSON) is written last, and the old
    state loses its marker before it is renamed away, so no interruption leaves a marker beside an
    incomplete state.
    """
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scheduler_state = json.loads(json.dumps(scheduler.state_dict()))  # plain JSON, or this raises
        write_json(
            tmp / "progress.json", {"format": STATE_FORMAT, "step": step, "scheduler": scheduler_state}
        )
        old = state_dir.with_name(state_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)  # left by a crash between the two renames of an earlier save
        if state_dir.exists():
            drop_state(state_dir, keep_dir=True)
            os.replace(state_dir, old)
        os.replace(tmp, state_dir)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def drop_state(state_dir: Path, *, keep_dir: bool = False) -> None:
    """Remove the resume marker first, then (unless `keep_dir`) the rest of the state."""
    (state_dir / "progress.json").unlink(missing_ok=True)
    if not keep_dir:
        shutil.rmtree(state_dir, ignore_errors=True)


def load_state(accelerator: Accelerator, state_dir: Path, scheduler: Any, iteration: int) -> int:
    """Restore a saved training state; return its step (0: no usable state, start the iteration over)."""
    marker = state_dir / "progress.json"
    if not marker.exists():
        if state_dir.exists() and accelerator.is_main_process:
            shutil.rmtree(state_dir)  # an incomplete state: its save was interrupted before the marker
        accelerator.wait_for_everyone()
        return 0
    restart = f"delete {state_dir} to restart iteration {iteration}'s training from its first step"
    progress = read_json(marker)
    if not isinstance(progress, dict) or progress.get("format") != STATE_FORMAT:
        log.warning(
            "%s was written by an earlier spaceft (its scheduler is a pickle, which is never loaded): "
            "iteration %d's training restarts from its first step", state_dir, iteration,
        )  # fmt: skip
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            drop_state(state_dir)
        accelerator.wait_for_everyone()
        return 0
    pickles = sorted(p.name for p in state_dir.glob("*.pkl") if not p.name.startswith("random_states_"))
    if pickles:
        raise DamagedFileError(state_dir, f"it holds {', '.join(pickles)}, which spaceft never writes "
                               "(a pickle runs code when loaded, so it is not)", restart)  # fmt: skip
    try:
        accelerator.load_state(str(state_dir))  # model and optimizer; Accelerate uses weights_only=True
        scheduler.load_state_dict(progress["scheduler"])
        step = int(progress["step"])
    except Exception as e:  # unpickling refused, truncated safetensors, shapes that do not fit: all damage
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        problem = f"cannot load it ({type(e).__name__}: {first_line})"
        if type(e).__name__ == "UnpicklingError":  # torch's weights_only refusal
            problem = "a file in it is a pickle of more than tensors: refused, loading it could run code"
        raise DamagedFileError(state_dir, problem, restart) from None
    return step


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metric lines of steps <= last_step, so a resumed run never logs a step twice (a torn last
    line left by a crash is dropped with a warning)."""
    if not path.exists():
        return
    keep = [row for row in read_jsonl(path) if int(row.get("step", 0)) <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in keep), encoding="utf-8")
