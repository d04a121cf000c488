"""lm-evaluation-harness offline on the tiny model: local task YAMLs, provenance, a run's eval and report."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lm_eval")

from spaceft.cli import main
from spaceft.lmeval import (
    ARITHMETIC_TASK,
    HarnessModel,
    LocalTask,
    arithmetic_task,
    harness_task_yaml,
    offline,
    run_lm_eval,
    sha256_file,
    write_task_yaml,
    yaml_hash,
)
from spaceft.rundir import read_json

from .conftest import tiny_overrides

ARC_ROWS = [
    {"id": f"q{i}", "question": f"Which number is {i}?", "answerKey": "B",
     "choices": {"text": [str(i + 1), str(i), str(i + 2)], "label": ["A", "B", "C"]}}
    for i in range(5)
]  # fmt: skip


@pytest.fixture(scope="module")
def arc_task(tmp_path_factory: pytest.TempPathFactory):
    """A local ARC task deriving from the harness's own arc_easy.yaml, on five hand-made rows."""
    d = tmp_path_factory.mktemp("arc")
    data = d / "arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ARC_ROWS))
    include = harness_task_yaml("arc/arc_easy.yaml")
    return write_task_yaml(d / "tasks", "local_arc", data, split="test", include=include)


def test_model_args_carry_dtype_revision_and_trust_remote_code() -> None:
    assert HarnessModel("m").model_args() == {"pretrained": "m", "dtype": "float32"}
    full = HarnessModel("org/m", dtype="bfloat16", revision="abc123", trust_remote_code=True)
    assert full.model_args() == {"pretrained": "org/m", "dtype": "bfloat16", "revision": "abc123",
                                 "trust_remote_code": True}  # fmt: skip


def test_lm_eval_tasks_entries_resolve_to_local_tasks_or_names(tmp_path: Path, arc_task) -> None:
    from spaceft.bench.in_run import resolve_tasks

    specs = ["some_harness_task:5", "arithmetic", str(arc_task.yaml_path), "harness:hellaswag:10"]
    tasks, env, entries = resolve_tasks(specs, tmp_path)
    names = ["some_harness_task", ARITHMETIC_TASK, "local_arc", "hellaswag"]
    assert [getattr(t, "name", t) for t in tasks] == names  # in the order written
    assert tasks[2].data_file == arc_task.data_file.resolve() and env == {}
    assert {n: (e.kind, e.shots) for n, e in entries.items()} == {
        "some_harness_task": ("harness", 5), ARITHMETIC_TASK: ("bench", None), "local_arc": ("yaml", None),
        "hellaswag": ("harness", 10),
    }
    # a local task serving only the split it evaluates would take its shots from the evaluated items
    with pytest.raises(ValueError, match=r"'arithmetic:3': .* serves only the split it evaluates, so 3 few"):
        resolve_tasks(["arithmetic:3"], tmp_path)
    with pytest.raises(ValueError, match=r"local_arc\.yaml:2': .* serves only the split it evaluates"):
        resolve_tasks([f"{arc_task.yaml_path}:2"], tmp_path)
    with pytest.raises(ValueError, match=r"'arithmetic' and '.*\.yaml' both run task spaceft_arithmetic"):
        resolve_tasks(["arithmetic", str(tmp_path / f"{ARITHMETIC_TASK}.yaml")], tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: x\ndataset_path: json\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: a local task YAML needs `task:` and `dataset_kwargs"):
        resolve_tasks([str(bad)], tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        from spaceft.bench.run import prepare

        prepare(["truthfulqa_mc1"], tmp_path)


def test_offline_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as read at import, online
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with offline():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
        # the libraries read the variables at import: their constants must say offline too
        assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
    assert "HF_DATASETS_OFFLINE" not in os.environ and os.environ["HF_HUB_OFFLINE"] == "0"
    assert not datasets.config.HF_HUB_OFFLINE and not huggingface_hub.constants.HF_HUB_OFFLINE
    with offline(hub=True):  # a harness task by name: the environment decides
        assert "HF_DATASETS_OFFLINE" not in os.environ and not datasets.config.HF_HUB_OFFLINE


def test_harness_runs_local_yamls_offline_and_records_provenance(
    tiny_model_dir: Path, tmp_path: Path, arc_task
) -> None:
    arith = arithmetic_task(tmp_path / "tasks", n=6, seed=0)
    rows = [json.loads(line) for line in arith.data_file.read_text().splitlines()]
    assert len(rows) == 6 and all(r["answer"].rsplit("#### ", 1)[1].isdigit() for r in rows)
    out = run_lm_eval(HarnessModel(str(tiny_model_dir), batch_size=4), [arith, arc_task], limit=3,
                      gen_kwargs={"max_gen_toks": 4}, samples_dir=tmp_path / "samples")  # fmt: skip
    res = out["results"]
    assert set(res) == {ARITHMETIC_TASK, "local_arc"}
    assert set(res[ARITHMETIC_TASK]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert set(res["local_arc"]) == {"acc", "acc_norm"}
    # three items each; ARC accuracy over 3 items is a multiple of 1/3
    assert out["provenance"]["n_samples"] == {ARITHMETIC_TASK: 3, "local_arc": 3}
    # the per-item samples agree with the aggregate: ARC accuracy is the mean of the items' acc
    items = [json.loads(line) for line in (tmp_path / "samples" / "local_arc.jsonl").read_text().splitlines()]
    assert len(items) == 3 and items[0]["prompt"] == "Question: Which number is 0?\nAnswer:"
    assert res["local_arc"]["acc"] == pytest.approx(sum(i["acc"] for i in items) / 3, abs=1e-12)
    prov = out["provenance"]
    assert prov["lm_eval"] == metadata.version("lm_eval") and prov["limit"] == 3
    assert prov["tasks"]["local_arc"]["data_sha256"] == sha256_file(arc_task.data_file)
    # the YAML hash covers the harness YAML it includes: it differs from the hash of our file alone
    ours = prov["tasks"]["local_arc"]["yaml_sha256"]
    assert ours == yaml_hash(arc_task.yaml_path)
    import hashlib

    assert ours != hashlib.sha256(arc_task.yaml_path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mmlu_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two test questions and one dev question for each subject the harness's MMLU defines."""
    from spaceft.bench.mmlu import harness_subjects

    d = tmp_path_factory.mktemp("mmlu")
    for i, subject in enumerate(harness_subjects()):
        for split, n in (("test", 2), ("dev", 1)):
            rows = [{"question": f"{subject} {split} {k}?", "subject": subject,
                     "choices": ["w", "x", "y", "z"], "answer": (i + k) % 4} for k in range(n)]  # fmt: skip
            (d / f"{subject}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "source.json").write_text("{}\n")
    return d


def test_mmlu_runs_as_the_harness_groups_of_subjects_offline_and_quietly(
    tiny_model_dir: Path, tmp_path: Path, mmlu_data: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """`spaceft bench --tasks mmlu,mmlu_continuation`: for each, 57 subject tasks, 4 category groups
    and the top group as in the harness, one item per subject."""
    from spaceft.bench import sources
    from spaceft.bench.run import format_scores, run_bench

    monkeypatch.setattr(sources, "ensure_data", lambda name, cache_dir=None: mmlu_data)
    monkeypatch.chdir(tmp_path)  # not a git repository: the harness's `git describe` must stay quiet
    out = run_bench(HarnessModel(str(tiny_model_dir), batch_size=8), ["mmlu", "mmlu_continuation"],
                    tmp_path / "out", limit=1, log_samples=True)  # fmt: skip
    assert "not a git repository" not in capfd.readouterr().err
    assert read_json(tmp_path / "out" / "bench.json")["benchmarks"] == out["benchmarks"]
    assert set(out["benchmarks"]) == {"mmlu", "mmlu_continuation"}
    assert format_scores(out).splitlines()[0].startswith("mmlu              acc ")
    assert all(line.endswith("(n=57)") for line in format_scores(out).splitlines())
    task_dir = tmp_path / "out" / "tasks"
    categories = {"mmlu": [f"spaceft_mmlu_{c}" for c in ("stem", "humanities", "social_sciences", "other")],
                  "mmlu_continuation": [f"spaceft_mmlu_continuation::{c}" for c in
                                        ("stem", "humanities", "social sciences", "other")]}  # fmt: skip
    for name, group in (("mmlu", "spaceft_mmlu"), ("mmlu_continuation", "spaceft_mmlu_continuation")):
        assert out["provenance"]["n_samples"][group] == 57
        assert out["provenance"]["chat_template"][group] is False
        prov = out["provenance"]["tasks"][group]
        subjects = {n: out["subtasks"][n]["acc"] for n in prov["subtasks"]}
        assert len(subjects) == 57 and all(c in out["subtasks"] for c in categories[name])
        # weighted by size with one item per subject: the group is the mean over subjects, and so
        # is STEM over the 19 subjects its tag puts in it
        assert out["benchmarks"][name]["acc"] == pytest.approx(sum(subjects.values()) / 57, abs=1e-12)
        tags = {n: yaml.safe_load((task_dir / f"{n}.yaml").read_text())["tag"] for n in subjects}
        stem = [acc for n, acc in subjects.items() if tags[n].startswith("spaceft_mmlu_stem_")]
        assert len(stem) == 19
        assert out["subtasks"][categories[name][0]]["acc"] == pytest.approx(sum(stem) / 19)
        anatomy = next(v for k, v in prov["subtasks"].items() if k.startswith("spaceft_mmlu_anatomy"))
        assert anatomy["fewshot_sha256"] == sha256_file(mmlu_data / "anatomy.dev.jsonl")
        assert anatomy["data_sha256"] == sha256_file(mmlu_data / "anatomy.test.jsonl")
        assert prov["data_sha256"] == sha256_file(mmlu_data / "source.json")
    # the harness's own prompts: the subject's description, then the question with lettered choices
    # (scored on the letter) or alone (scored on each choice's text)
    samples = tmp_path / "out" / "samples"
    letters = json.loads((samples / "spaceft_mmlu_anatomy.jsonl").read_text().splitlines()[0])
    assert letters["prompt"] == ("The following are multiple choice questions (with answers) about "
                                 "anatomy.\n\nanatomy test 0?\nA. w\nB. x\nC. y\nD. z\nAnswer:")  # fmt: skip
    cloze = json.loads((samples / "spaceft_mmlu_anatomy_continuation.jsonl").read_text().splitlines()[0])
    assert cloze["prompt"] == ("The following are questions (with answers) about anatomy.\n\n"
                               "Question: anatomy test 0?\nAnswer:")  # fmt: skip


def test_a_run_records_a_groups_headline_under_its_benchmark_name_and_members_apart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from spaceft.bench import catalog, in_run
    from spaceft.config import EvalConfig

    harness_out = {"results": {"spaceft_mmlu": {"acc": 0.3}}, "stderr": {"spaceft_mmlu": {"acc": 0.01}},
                   "subtasks": {"spaceft_mmlu_anatomy": {"acc": 0.5, "acc_stderr": 0.1}},
                   "provenance": {"n_samples": {"spaceft_mmlu": 57}}}  # fmt: skip
    entries = {"spaceft_mmlu": catalog.parse_task_entry("mmlu")}
    monkeypatch.setattr(in_run, "resolve_tasks", lambda specs, task_dir, cache_dir=None: (specs, {}, entries))
    monkeypatch.setattr(in_run, "run_lm_eval_chat", lambda *a, **k: harness_out)
    out = in_run.lm_eval_for_run("m", EvalConfig(lm_eval_tasks=["mmlu"]), None, tmp_path)
    assert out["lm_eval"] == {"mmlu": {"acc": 0.3}}
    assert out["lm_eval_subtasks"] == {"spaceft_mmlu_anatomy": {"acc": 0.5, "acc_stderr": 0.1}}


def test_mmlu_data_must_hold_the_harness_subjects(tmp_path: Path, mmlu_data: Path) -> None:
    from spaceft.bench.mmlu import write_mmlu_tasks

    data = tmp_path / "data"
    data.mkdir()
    for f in mmlu_data.iterdir():
        if not f.name.startswith("virology"):
            (data / f.name).write_bytes(f.read_bytes())
    (data / "klingon.test.jsonl").write_text("{}\n")
    with pytest.raises(RuntimeError, match=r"differ from the harness's \(missing \['virology'\], unknown "
                       r"\['klingon'\]\)"):  # fmt: skip
        write_mmlu_tasks(tmp_path / "tasks", data)


def test_a_task_that_needs_the_hub_fails_clearly_instead_of_downloading(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The harness's arc_easy, renamed but still reading allenai/ai2_arc: offline, it must fail."""
    yaml_path = tmp_path / "hub_arc.yaml"
    yaml_path.write_text(f"include: {harness_task_yaml('arc/arc_easy.yaml')}\ntask: hub_arc\n")
    task = LocalTask("hub_arc", yaml_path, yaml_path)
    with pytest.raises(RuntimeError, match=r"task\(s\) hub_arc need the Hugging Face Hub.*allenai/ai2_arc"):
        run_lm_eval(HarnessModel(str(tiny_model_dir)), [task], limit=1)


def test_lm_eval_from_the_main_process_only_is_refused_under_several_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The harness would shard across 2 processes and wait forever for the one that never joins."""
    import accelerate

    from spaceft.bench.in_run import lm_eval_for_run
    from spaceft.config import EvalConfig

    class TwoProcesses:
        num_processes = 2

    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    cfg = EvalConfig(lm_eval_tasks=["arithmetic"])
    with pytest.raises(RuntimeError, match="under 2 processes: lm-eval must run on every rank"):
        lm_eval_for_run("m", cfg, None, tmp_path)


@pytest.mark.slow
def test_run_records_lm_eval_in_eval_json_manifest_and_report(
    tiny_model_dir: Path,
    tmp_path: Path,
    arc_task,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spaceft import stage_fns

    calls: list[str] = []  # lm-eval loads its own copy of the model: ours must be released first
    release, bench = stage_fns.release_models, stage_fns.run_benchmarks
    monkeypatch.setattr(stage_fns, "release_models", lambda ws: (calls.append("release"), release(ws))[1])
    monkeypatch.setattr(
        stage_fns, "run_benchmarks", lambda *a, **k: (calls.append("bench"), bench(*a, **k))[1]
    )
    extra = {"name": "lmeval", "train.loss": "sft", "selfplay.iterations": 1,
             "eval.lm_eval_tasks": f"[arithmetic, {arc_task.yaml_path}]", "eval.lm_eval_limit": 2,
             "eval.lm_eval_max_gen_toks": 4}  # fmt: skip
    assert main(["run", "tiny", *tiny_overrides(tmp_path, tiny_model_dir, **extra)]) == 0
    benches = [i for i, c in enumerate(calls) if c == "bench"]
    assert len(benches) == 2 and all(calls[i - 1] == "release" for i in benches)  # base and iteration 0
    run = tmp_path / "runs" / "lmeval"
    for key in ("base", "iter_0"):
        ev = read_json(run / key / "eval.json")
        assert set(ev["lm_eval"]) == {"arithmetic", "local_arc"}
        assert ev["lm_eval_provenance"]["lm_eval"] == metadata.version("lm_eval")
        # chat template "auto": on for the generation task, off for the log-likelihood one
        assert ev["lm_eval_provenance"]["chat_template"] == {ARITHMETIC_TASK: True, "local_arc": False}
    manifest = read_json(run / "manifest.json")
    entry = manifest["iterations"]["0"]["eval"]
    task = entry["lm_eval_provenance"]["tasks"][ARITHMETIC_TASK]
    assert task["yaml_sha256"] == yaml_hash(Path(task["yaml"]))
    assert main(["report", str(run)]) == 0
    report = capsys.readouterr().out
    assert "Benchmarks (lm-eval; percent)" in report
    assert "| model | arithmetic (exact_match, 0-shot) | local_arc (acc, 0-shot) |" in report


def test_entries_are_parsed_with_their_few_shot_counts_and_malformed_ones_refused() -> None:
    from spaceft.bench.catalog import parse_task_entry
    from spaceft.config import EvalConfig

    def parsed(text: str) -> tuple[str, str, int | None]:
        e = parse_task_entry(text)
        return e.kind, e.target, e.shots

    assert parsed("hellaswag") == ("bench", "hellaswag", None)  # the offline copy
    assert parsed("harness:hellaswag:10") == ("harness", "hellaswag", 10)  # the harness's own, 10-shot
    assert parsed("arc_challenge:25") == ("harness", "arc_challenge", 25)
    assert parsed("harness:gsm8k:5") == ("harness", "gsm8k", 5)  # the leaderboard's
    with pytest.raises(ValueError, match=r"now named gsm8k_cot; .* is harness:gsm8k:5"):
        parse_task_entry("gsm8k")  # it meant the chain-of-thought copy before: never silently the other
    assert parsed("gsm8k_cot") == ("bench", "gsm8k_cot", None)
    assert parsed("tasks/mine.yaml:3") == ("yaml", "tasks/mine.yaml", 3)
    for bad in ("harness:", "arc:x", ":5"):
        with pytest.raises(ValueError, match="write NAME, NAME:SHOTS"):
            parse_task_entry(bad)
    with pytest.raises(ValueError, match="'arc_challenge' and 'arc_challenge:25' run one task"):
        EvalConfig(lm_eval_tasks=["arc_challenge", "arc_challenge:25"])


def test_each_few_shot_count_and_chat_setting_is_one_harness_call_and_only_local_ones_are_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, arc_task
) -> None:
    """Named harness tasks read the Hub as the environment allows; local ones run with it off."""
    from spaceft import lmeval

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls: list[tuple[list[str], int | None, bool, str | None]] = []

    def harness(lm_eval, model, names, manager, limit, gen_kwargs, log_samples, num_fewshot=None, *_):
        calls.append((names, num_fewshot, model.chat_template, os.environ.get("HF_HUB_OFFLINE")))
        return {"results": {n: {"acc": 0.5} for n in names}, "n-shot": dict.fromkeys(names, num_fewshot or 0)}

    monkeypatch.setattr(lmeval, "_simple_evaluate", harness)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", lambda **kwargs: None)  # no indexing of its tasks
    arith = arithmetic_task(tmp_path / "tasks", n=2, seed=0)
    tasks = ["winogrande", "arc_challenge", arith, arc_task, "piqa"]
    shots = {"winogrande": 5, "arc_challenge": 25}
    out = lmeval.run_lm_eval_chat(HarnessModel("m"), tasks, "auto", fewshot=shots)
    assert sorted(calls, key=str) == sorted([
        (["winogrande"], 5, False, None),
        (["arc_challenge"], 25, False, None),
        ([ARITHMETIC_TASK], None, True, "1"),  # the generation task under the chat template, Hub off
        (["local_arc"], None, False, "1"),  # not in piqa's call: that one has the Hub on
        (["piqa"], None, False, None),
    ], key=str)  # fmt: skip
    shots = {"winogrande": 5, "arc_challenge": 25, ARITHMETIC_TASK: 0, "local_arc": 0, "piqa": 0}
    assert out["provenance"]["n_shot"] == shots
    assert out["provenance"]["chat_template"] == {"winogrande": False, "arc_challenge": False,
                                                  ARITHMETIC_TASK: True, "local_arc": False,
                                                  "piqa": False}  # fmt: skip
    assert "HF_HUB_OFFLINE" not in os.environ  # restored
    calls.clear()
    out = lmeval.run_lm_eval_chat(HarnessModel("m"), [arith, arc_task], "off")  # one setting: one call
    assert calls == [([ARITHMETIC_TASK, "local_arc"], None, False, "1")]
    assert out["provenance"]["chat_template"] == {ARITHMETIC_TASK: False, "local_arc": False}


def test_auto_templates_named_generation_tasks_and_groups_that_only_generate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`auto` reads a named task's output type (a group's or tag's: its members') from the harness's task
    index: IFEval and GSM8K are templated, as their offline copies are; MMLU and HellaSwag are not."""
    from types import SimpleNamespace

    from lm_eval.tasks import TaskManager

    from spaceft import lmeval

    index = dict(TaskManager().task_index)
    types = {n: lmeval.harness_output_types(index, n) for n in
             ("gsm8k", "ifeval", "hellaswag", "mmlu", "mmlu_stem_tasks", "leaderboard_math_hard", "nope")}
    assert types == {"gsm8k": {"generate_until"}, "ifeval": {"generate_until"},
                     "hellaswag": {"multiple_choice"}, "mmlu": {"multiple_choice"},
                     "mmlu_stem_tasks": {"multiple_choice"},
                     "leaderboard_math_hard": {"generate_until"}, "nope": {"?"}}  # fmt: skip
    index["mixed"] = SimpleNamespace(kind="Kind.GROUP", cfg={"task": ["gsm8k", "hellaswag"]}, tags=None)
    calls: list[tuple[list[str], bool]] = []

    def harness(lm_eval, model, names, manager, limit, gen_kwargs, log_samples, num_fewshot=None, *_):
        calls.append((names, model.chat_template))
        return {"results": {n: {"acc": 0.5} for n in names}, "n-shot": dict.fromkeys(names, 0)}

    monkeypatch.setattr(lmeval, "_simple_evaluate", harness)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", lambda **kwargs: SimpleNamespace(task_index=index))
    with caplog.at_level("WARNING", logger="spaceft.lmeval"):
        lmeval.run_lm_eval_chat(HarnessModel("m"), ["gsm8k", "ifeval", "hellaswag", "mixed"], "auto")
    assert sorted(calls) == [(["gsm8k", "ifeval"], True), (["hellaswag", "mixed"], False)]
    assert "lm-eval mixed mixes generation with other tasks (generate_until, multiple_choice)" in caplog.text
    calls.clear()
    lmeval.run_lm_eval_chat(HarnessModel("m"), ["gsm8k", "hellaswag"], "off")
    assert calls == [(["gsm8k", "hellaswag"], False)]


def test_the_harness_task_index_is_built_once_per_process(
    tmp_path: Path, arc_task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preflight, `auto`'s output-type lookup and every harness call of every evaluation share one
    default task manager (each used to index the harness's ~15,000 task files again); local tasks still
    get a manager of their own directories."""
    from types import SimpleNamespace

    from spaceft import lmeval, preflight

    made: list[dict[str, Any]] = []
    index = {
        name: SimpleNamespace(kind="Kind.TASK", cfg={"output_type": output}, tags=None)
        for name, output in (("gsm8k", "generate_until"), ("hellaswag", "multiple_choice"))
    }

    class Manager:  # a stand-in class: a real index built by another test is never reused for it
        def __init__(self, **kwargs: Any) -> None:
            made.append(kwargs)
            self.task_index, self.all_tasks = index, list(index)

    managers: list[Any] = []

    def harness(lm_eval, model, names, manager, limit, gen_kwargs, log_samples, num_fewshot=None, *_):
        managers.append(manager)
        return {"results": {n: {"acc": 0.5} for n in names}, "n-shot": dict.fromkeys(names, 0)}

    monkeypatch.setattr(lmeval, "_simple_evaluate", harness)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", Manager)
    preflight.check_lm_eval_tasks(["harness:gsm8k", "harness:hellaswag"])
    for _ in range(2):  # two evaluations, each of two harness calls (templated or not)
        lmeval.run_lm_eval_chat(HarnessModel("m"), ["gsm8k", "hellaswag"], "auto")
    assert made == [{}] and len(managers) == 4 and len({id(m) for m in managers}) == 1
    lmeval.run_lm_eval_chat(HarnessModel("m"), [arc_task], "auto")  # a local task: its directory indexed
    assert made[1] == {"include_path": [str(arc_task.yaml_path.parent)], "include_defaults": False}


def test_a_local_task_with_a_train_split_runs_few_shot_from_it(
    tiny_model_dir: Path, tmp_path: Path, arc_task, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, train = tmp_path / "arc.jsonl", tmp_path / "arc_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ARC_ROWS[:2]))
    train.write_text("".join(json.dumps(r) + "\n" for r in ARC_ROWS[2:]))
    include = harness_task_yaml("arc/arc_easy.yaml")
    task = write_task_yaml(tmp_path / "tasks", "arc_fewshot", data, split="test", include=include,
                           overrides={"training_split": "train",
                                      "dataset_kwargs": {"data_files": {"test": str(data),
                                                                        "train": str(train)}}})  # fmt: skip
    from spaceft.bench.in_run import has_fewshot_source
    from spaceft.lmeval import run_lm_eval_chat

    assert has_fewshot_source(task)
    from transformers import AutoModelForCausalLM

    loads, load = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        staticmethod(lambda *a, **k: loads.append(a) or load(*a, **k)))  # fmt: skip
    out = run_lm_eval_chat(HarnessModel(str(tiny_model_dir), batch_size=4), [task, arc_task], "off", limit=2,
                           fewshot={"arc_fewshot": 2}, samples_dir=tmp_path / "samples")  # fmt: skip
    assert out["provenance"]["n_shot"] == {"arc_fewshot": 2, "local_arc": 0}  # two harness calls
    assert len(loads) == 1  # on one loaded model
    item = json.loads((tmp_path / "samples" / "arc_fewshot.jsonl").read_text().splitlines()[0])
    # two solved examples from the train split (rows 2-4), then the evaluated question (row 0)
    assert item["prompt"].count("Answer:") == 3
    assert item["prompt"].endswith("Question: Which number is 0?\nAnswer:")
    assert "Which number is 0?" not in item["prompt"].rsplit("\n\n", 1)[0]


def test_benchmark_table_names_metric_and_shots_and_sets_paper_numbers_by_task_name(tmp_path: Path) -> None:
    from spaceft.report import benchmark_rows, benchmark_table
    from spaceft.rundir import write_json

    em = "exact_match,strict-match"
    ev = {"lm_eval": {"arc_challenge:25": {"acc": 0.40, "acc_norm": 0.45}, "harness:gsm8k:5": {em: 0.3},
                      "gsm8k_cot": {em: 0.2}, "harness:hellaswag:10": {"acc": 0.5, "acc_norm": 0.6}},
          "lm_eval_shots": {"arc_challenge:25": 25, "harness:gsm8k:5": 5, "gsm8k_cot": 8,
                            "harness:hellaswag:10": 10}}  # fmt: skip
    (tmp_path / "base").mkdir()
    write_json(tmp_path / "base" / "eval.json", ev)
    table = benchmark_table(benchmark_rows(tmp_path)).splitlines()
    assert table[0] == ("| model | arc_challenge:25 (acc_norm, 25-shot) | gsm8k_cot (exact_match, 8-shot) | "
                        "harness:gsm8k:5 (exact_match, 5-shot) | "
                        "harness:hellaswag:10 (acc_norm, 10-shot) |")  # fmt: skip
    assert table[2] == "| base | 45.0 | 20.0 | 30.0 | 60.0 |"  # the leaderboard's acc_norm, not the first
    # the paper's GSM8K sits under the harness's gsm8k, not under the chain-of-thought variant
    assert table[3] == "| SPACE paper, start model |  |  | 37.7 |  |"
