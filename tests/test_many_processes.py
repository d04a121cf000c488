"""Many processes without hidden waits: a first hub download outlasting the process group's timeout,
one vLLM `generate` call per process, and parts tags hashed without building one huge string."""

from __future__ import annotations

import hashlib
import os
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spaceft.config import GenerationConfig
from spaceft.rundir import Shard, content_hash, read_table

from .test_distributed import _free_port


def test_content_hash_is_the_repr_digest_without_building_the_repr() -> None:
    """The digest stays the one of the whole `repr` (recorded tags and cache keys remain valid), while
    the largest allocation while hashing is one token list's text, not the whole table's: 2,000 lists of
    500 ids are ~4.5 MB of `repr`; one list is ~2.3 KB."""
    values = [
        ("opponent", 3, {"temperature": 1.0, "top_k": 0}, [tuple(range(i, i + 7)) for i in range(3)]),
        [[1, 2], (3,), ((4,),), [], (), {"a": [1]}, {}],
        ("real", 0, 1, -1),
    ]
    for value in values:
        old = hashlib.sha256(repr(value).encode() + b"\x00").hexdigest()[:16]
        assert content_hash(value) == old
    assert content_hash(*values) == hashlib.sha256(
        b"".join(repr(v).encode() + b"\x00" for v in values)
    ).hexdigest()[:16]

    table = [(("synthetic", i, 0, 0), tuple(range(100)), tuple(range(i, i + 500))) for i in range(2000)]
    assert len(repr(table)) > 4_000_000
    tracemalloc.start()
    content_hash("opponent", table)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100_000


# ------------------------------------------------------------------------- one vLLM call per process


def test_every_process_asks_its_vllm_engine_once_for_all_its_prompts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """5 prompts in batches of 1 over 2 processes: shards of 3 and 2 batches. A call per batch would be
    3 calls on one engine and 2 on the other (and the engines that run in step would wait on the one
    with fewer); one call each, for all its prompts, with each prompt's own seed. A resumed shard asks
    only for the prompts of its unwritten parts; the joined table is the one of a single process."""
    from spaceft.generate import merge_generate_parts, prompt_seed, write_generate_parts
    from spaceft.generate_vllm import VLLMGenerator

    from .test_distributed import _FakeVLLM

    fake = _FakeVLLM()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    calls: list[list[int]] = []
    real_generate = fake.modules["vllm"].LLM.generate

    def counting(self, prompts, params, use_tqdm=False):
        calls.append([p.seed for p in params])
        return real_generate(self, prompts, params, use_tqdm)

    monkeypatch.setattr(fake.modules["vllm"].LLM, "generate", counting)
    cfg = GenerationConfig(backend="vllm", num_samples=2, batch_size=1, max_new_tokens=4)
    prompts = [(i, [40 + i] * (1 + i % 3)) for i in range(5)]
    seeds = {i: prompt_seed(cfg.seed, 0, i) for i in range(5)}

    def run(out: Path, shards: list[Shard]) -> list[list[int]]:
        calls.clear()
        for shard in shards:  # each process, one after the other
            gen = VLLMGenerator("m", cfg, stop_ids=[9], dtype="bfloat16", num_processes=len(shards))
            write_generate_parts(gen, prompts, out, cfg, iteration=0, decode=str, shard=shard,
                                 progress=False)  # fmt: skip
        merge_generate_parts(out, len(prompts), cfg)
        return list(calls)

    per_process = run(tmp_path / "two.parquet", [Shard(0, 2), Shard(1, 2)])
    assert len(per_process) == 2  # one engine call on each process, not 3 and 2
    assert sorted(s for call in per_process for s in call) == sorted(seeds.values())
    one = run(tmp_path / "one.parquet", [Shard()])
    assert len(one) == 1
    assert read_table(tmp_path / "two.parquet") == read_table(tmp_path / "one.parquet")

    # a resume: shard 0's first batch (the shortest prompt, index 0) was written before a crash
    out = tmp_path / "resumed.parquet"
    write_generate_parts(VLLMGenerator("m", cfg, stop_ids=[9], dtype="bfloat16"), prompts[:1], out,
                         cfg, iteration=0, decode=str, progress=False)  # fmt: skip
    resumed = run(out, [Shard(0, 2), Shard(1, 2)])
    assert len(resumed) == 2 and seeds[0] not in resumed[0] and len(resumed[0]) == 2


# ------------------------------------------------------------------- a first download, many processes


def _pin_worker(rank: int, port: int, run_dir: str, results: dict) -> None:
    from accelerate import PartialState

    from spaceft import workspace
    from spaceft.configfile import config_from_dict
    from spaceft.distributed import init_processes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", ACCELERATE_USE_CPU="1")  # fmt: skip
    PartialState._reset_state()  # a fork of a test process that may hold a one-process state

    def pin_snapshot(repo_id, revision, *, trust_remote_code, commit=None, local_first=False):
        if not local_first:
            time.sleep(DOWNLOAD_S)  # the main process downloads, past the group's timeout
        return Path(run_dir) / "snapshot", "c0ffee"

    workspace.pin_snapshot = pin_snapshot
    state = init_processes(GROUP_TIMEOUT_S)
    cfg = config_from_dict({"data": {"train": "x.jsonl"}, "output_dir": run_dir, "name": "r"})
    try:
        results[rank] = workspace._pin_hub_model(cfg, "org/model", state)
    except Exception as e:  # recorded for the assertion's message
        results[rank] = f"{type(e).__name__}: {e}"
    finally:
        torch.distributed.destroy_process_group()


GROUP_TIMEOUT_S = 1
DOWNLOAD_S = 3


def test_a_first_download_outlasting_the_group_timeout_does_not_kill_the_other_processes(
    tmp_path: Path,
) -> None:
    """The process group's timeout is 1 s; the main process's download takes 3 s. The others wait for it
    in a group with its own limit and then read the same commit: both processes get the snapshot."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_pin_worker, args=(_free_port(), str(tmp_path), results), nprocs=2,
                           start_method="fork")  # fmt: skip
        got = dict(results)
    expected = (str(tmp_path / "snapshot"), "c0ffee")
    assert got == {0: expected, 1: expected}
