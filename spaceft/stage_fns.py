"""What each stage of a self-play iteration computes: its load, work and finish (`STAGE_FNS`).

The stages, their order, outputs and dependencies are declared in `spaceft.stages.TABLE`; the driver
(`spaceft.selfplay.run_step`) calls these three functions for one step: `load` its inputs (every
process), `work` (every process, as the table's `ranks` says), `finish` (the main process: join the
parts, return the manifest entry). The score stage scores training's own micro-batches (`Batches`), so
that at the first step of an iteration policy and opponent log-probs agree exactly.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from spaceft import evalcache
from spaceft.distributed import attempt, broadcast, leads_group, shard_of
from spaceft.drift import template_drift, warn_template_drift
from spaceft.evaluate import finish_eval, reference_answer, run_benchmarks, write_eval_parts
from spaceft.fingerprint import GENERATION_WHERE_KEYS
from spaceft.generate import loads_own_weights, merge_generate_parts, open_generator, write_generate_parts
from spaceft.microbatch import TrainItem, compose, composition_tag
from spaceft.models import whole_weights
from spaceft.rundir import content_hash, file_hashes, read_json, read_table
from spaceft.sampler import Generator
from spaceft.score import merge_score_parts, with_opponent_scores, write_score_parts
from spaceft.stages import STAGES, Step, sources, synthetic_hashes
from spaceft.train import RUN_CONFIG_FILE, train_iteration
from spaceft.workspace import Workspace, loaded_model, release_models

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- items


def _synthetic(ws: Workspace, t: int) -> dict[int, list[tuple[int, ...]]]:
    """prompt_index -> the K synthetic responses of iteration t, in sample order."""
    rows = read_table(ws.iter_dir(t) / "synthetic.parquet")
    out: dict[int, list[tuple[int, ...]]] = {}
    for r in sorted(rows, key=lambda r: (r["prompt_index"], r["sample"])):
        out.setdefault(r["prompt_index"], []).append(tuple(r["response_ids"]))
    return out


def _plain_items(ws: Workspace, t: int) -> tuple[list[TrainItem], list[tuple[int, int]]]:
    """Iteration t's training items, without the opponent's scores, and each one's (prompt index,
    iteration that sampled its synthetic responses)."""
    if not ws.cfg.train.loss.uses_synthetic:
        return [TrainItem(tok.prompt_ids, tok.response_ids, ()) for tok in ws.train_tok], [
            (tok.index, -1) for tok in ws.train_tok
        ]
    # T-SPIN's proto-synthetic y0, drawn once from the start model: iteration 0's first sample (the
    # historical term is off in iteration 0, where it is also one of the synthetic responses)
    protos = {i: s[0] for i, s in _synthetic(ws, 0).items()} if ws.cfg.train.loss.uses_proto else {}
    items, origins = [], []
    for src in sources(ws.cfg.selfplay, t):
        synthetic = _synthetic(ws, src)
        for tok in ws.train_tok:
            items.append(TrainItem(tok.prompt_ids, tok.response_ids, tuple(synthetic[tok.index]),
                                   proto_ids=protos[tok.index] if protos else ()))  # fmt: skip
            origins.append((tok.index, src))
    return items, origins


@dataclass(frozen=True)
class Batches:
    """Iteration t's training items and its micro-batches, which the score stage and training share."""

    items: list[TrainItem]
    origins: list[tuple[int, int]]
    groups: list[tuple[int, ...]]
    composition: str  # `microbatch.composition_tag`: recorded by the score stage, checked by training


def batches(ws: Workspace, t: int) -> Batches:
    items, origins = _plain_items(ws, t)
    groups = compose(items, ws.cfg, t, ws.state.num_processes)
    return Batches(items, origins, groups, composition_tag(groups, items, ws.cfg))


def train_items(ws: Workspace, t: int) -> list[TrainItem]:
    """Iteration t's items with the opponent's log-probs, which were computed in these micro-batches.

    Scores are looked up by item and checked against (θt's weights hash, token ids): a score of other
    tokens, of another opponent or of other micro-batches is an error, never a silent reuse.
    """
    b = batches(ws, t)
    if not ws.cfg.train.loss.needs_opponent:
        return b.items
    path = ws.iter_dir(t) / "opponent_logps.parquet"
    if (ws.manifest.stage(t, "score") or {}).get("composition") != b.composition:
        raise RuntimeError(
            f"{path} was scored in other micro-batches than training would use (another micro-batch size, "
            f"length grouping, number of processes or data): re-run `spaceft score -t {t}` with this "
            "training's settings and processes"
        )
    return with_opponent_scores(b.items, read_table(path), ws.opponent_hash(t), str(path))


# ----------------------------------------------------------------------------------------- stages
# Each stage: load(ws, step) -> inputs on every process; work(ws, step, inputs) -> result on every
# process (see the table's `ranks`); finish(ws, step, inputs, result) -> manifest entry on the main process.


def load_generate(ws: Workspace, step: Step) -> str:
    t = int(step.iteration)
    if loads_own_weights(ws.cfg.generation):
        release_models(ws)  # the backend needs the GPU memory the HF model holds
    gen = {k: v for k, v in ws.cfg.to_dict()["generation"].items() if k not in GENERATION_WHERE_KEYS}
    return content_hash(ws.opponent_hash(t), t, gen, [tok.prompt_ids for tok in ws.train_tok])


def work_generate(ws: Workspace, step: Step, tag: str) -> None:
    t, cfg, state = int(step.iteration), ws.cfg, ws.state
    group = cfg.generation.tensor_parallel_size  # processes that share one engine
    gen = _generator(ws, ws.opponent_path(t))
    try:
        write_generate_parts(
            gen,
            [(tok.index, tok.prompt_ids) for tok in ws.train_tok],
            ws.iter_dir(t) / "synthetic.parquet",
            cfg.generation,
            iteration=t,
            decode=ws.decode,
            shard=shard_of(state, group),
            write=leads_group(state, group),
            progress=cfg.logging.progress and state.is_main_process,
            tag=tag,
        )
    finally:
        ws.generations_left -= 1
        if gen.kept and ws.generations_left > 0:
            gen.sleep()  # frees its GPU memory for scoring and training
        else:
            close_generator(ws, gen)  # it goes before scoring and training need the memory


def close_generator(ws: Workspace, gen: Generator) -> None:
    """Release a generator; a failure to do so is logged, never raised over the error that may be on its
    way out of the stage."""
    ws.generator = None
    try:
        gen.close()
    except Exception:
        log.exception("could not release the generation backend; continuing")


def _generator(ws: Workspace, model_path: str) -> Generator:
    """A generator holding `model_path`'s weights: the one kept from the last generate step of this
    invocation, with the weights loaded in place, or a new one (kept if the backend can be and more
    generate steps follow)."""
    if ws.generator is not None:
        started = time.perf_counter()
        ws.generator.load(model_path)
        log.info("generation backend: weights of %s loaded in place in %.1f s", model_path,
                 time.perf_counter() - started)  # fmt: skip
        return ws.generator
    gen = open_generator(model_path, ws.cfg, stop_ids=ws.stop_ids, pad_id=ws.tokenizer.pad_token_id,
                         device=ws.device, num_processes=ws.state.num_processes,
                         longest_prompt=max(len(tok.prompt_ids) for tok in ws.train_tok),
                         prompts=len(ws.train_tok), keep=ws.generations_left > 1,
                         model=partial(loaded_model, ws))  # fmt: skip
    if gen.kept:
        ws.generator = gen
    return gen


def finish_generate(ws: Workspace, step: Step, tag: str, _: None) -> dict[str, Any]:
    t = int(step.iteration)
    out = ws.iter_dir(t) / "synthetic.parquet"
    eot = ws.end_of_turn
    entry = merge_generate_parts(out, len(ws.train_tok), ws.cfg.generation, tag=tag, end_of_turn=eot)
    rows = read_table(out)
    prompts = {tok.index: ws.train_examples[tok.index].prompt for tok in ws.train_tok}
    chat = ws.chat
    samples = [(r["prompt_index"], r["response_ids"], r["hit_cap"]) for r in rows]
    drift = template_drift(chat, prompts, samples, [tok.response_ids for tok in ws.train_tok])
    warn_template_drift(drift, ws.cfg.model.name, chat.has_template)
    return {**entry, "template_drift": drift, "opponent": ws.opponent_hash(t)}


def load_score(ws: Workspace, step: Step) -> Batches:
    return batches(ws, int(step.iteration))


def work_score(ws: Workspace, step: Step, b: Batches) -> dict[str, float]:
    t = int(step.iteration)
    return write_score_parts(
        loaded_model(ws, ws.opponent_path(t)),
        b.items,
        b.groups,
        b.origins,
        ws.iter_dir(t) / "opponent_logps.parquet",
        pad_id=ws.tokenizer.pad_token_id,
        device=ws.device,
        opponent=ws.opponent_hash(t),
        composition=b.composition,
        shard=shard_of(ws.state),
        progress=ws.cfg.logging.progress and ws.state.is_main_process,
        mixed_precision=ws.cfg.train.mixed_precision,  # the same autocast as training
        path=ws.cfg.train.logps_path,  # and the same log-prob path
        shared=ws.cfg.train.shared_prompt,  # and the same rows
    )


def finish_score(ws: Workspace, step: Step, b: Batches, speed: dict[str, float] | None) -> dict[str, Any]:
    t = int(step.iteration)
    out = ws.iter_dir(t) / "opponent_logps.parquet"
    info = merge_score_parts(out, b.groups, opponent=ws.opponent_hash(t), composition=b.composition)
    return {**info, **(speed or {}), "inputs": synthetic_hashes(ws.cfg, ws.manifest, t)}


def load_train(ws: Workspace, step: Step) -> list[TrainItem]:
    """The training items; a training state saved by another number of processes is dropped (its data
    slices and random states belong to that number)."""
    t, state = int(step.iteration), ws.state
    if state.is_main_process:
        entry = ws.manifest.stage(t, "train") or {}
        state_dir = ws.iter_dir(t) / "train_state"
        if state_dir.exists() and entry.get("processes", 1) != state.num_processes:
            log.warning("iteration %d: the saved training state is from %s process(es), this run has %d; "
                        "training the iteration from its start", t, entry.get("processes", 1),
                        state.num_processes)  # fmt: skip
            shutil.rmtree(state_dir)
        ws.manifest.mark_running(t, "train", processes=state.num_processes)
    return train_items(ws, t)


def work_train(ws: Workspace, step: Step, items: list[TrainItem]) -> dict[str, Any]:
    t = int(step.iteration)
    d = ws.iter_dir(t)
    # a run stopped after the model was saved (the summary is written after it) but before the manifest
    # said so: the training is complete, do not train it again
    if (d / "train_summary.json").exists() and (d / "model").is_dir() and not (d / "train_state").exists():
        log.info("iteration %d: its trained model was saved before the last run stopped; not retraining", t)
        return dict(read_json(d / "train_summary.json"))
    model = loaded_model(ws, ws.opponent_path(t))
    ws.models.clear()  # trained in place: from here on it is no longer the opponent saved at that path
    return train_iteration(model, ws.tokenizer, items, ws.cfg, iteration=t, iter_dir=ws.iter_dir(t))


def finish_train(ws: Workspace, step: Step, _: list[TrainItem], info: dict[str, Any]) -> dict[str, Any]:
    full, weights = file_hashes(ws.iter_dir(step.iteration) / "model", without=RUN_CONFIG_FILE)
    # "hash": the saved directory (checked on read-back); "weights": without the run's config, the same for
    # every run that trains the same weights (the evaluation cache's key)
    return {**info, "processes": ws.state.num_processes, "hash": full, "weights": weights}


def _eval_model_dir(ws: Workspace, step: Step) -> str:
    return ws.start_model if step.iteration == "base" else str(ws.iter_dir(step.iteration) / "model")


def _eval_model_hash(ws: Workspace, step: Step) -> str:
    if step.iteration == "base":
        return ws.opponent_hash(0)
    return str((ws.manifest.stage(step.iteration, "train") or {}).get("weights", ""))


@dataclass(frozen=True)
class EvalInputs:
    tag: str
    key: str | None
    """The evaluation cache's key (None: not cached: `eval.cache=false`, weights without a content hash,
    or lm-eval tasks other than `spaceft bench`'s)."""
    hit: str | None
    """The cached entry that holds this evaluation already (the main process's lookup, on every process)."""


def load_eval(ws: Workspace, step: Step) -> EvalInputs:
    model_hash = _eval_model_hash(ws, step)
    cfg = ws.cfg.to_dict()
    heldout = [(t.prompt_ids, t.response_ids) for t in ws.eval_tok]
    opponent = ws.opponent_hash(0) if step.iteration == "base" else ws.opponent_hash(int(step.iteration) + 1)
    tag = content_hash(opponent, cfg["eval"], heldout)
    key = hit = None
    if ws.cfg.eval.cache and evalcache.is_content_hash(model_hash) and evalcache.cacheable(cfg["eval"]):
        answers = [reference_answer(ws.eval_examples[t.index]) for t in ws.eval_tok]
        key = evalcache.cache_key(model_hash, cfg["eval"], cfg["model"], [heldout, answers], ws.device,
                                  ws.state.num_processes)  # fmt: skip
        # the main process decides for all (a failed lookup is a miss: nothing may raise before the broadcast)
        entry = attempt(evalcache.lookup, key)[0] if ws.state.is_main_process else None
        hit = broadcast(ws.state, None if entry is None else str(entry))
    return EvalInputs(tag, key, hit)


def work_eval(ws: Workspace, step: Step, inputs: EvalInputs) -> dict[str, Any]:
    if inputs.hit is not None:
        return {}  # finish copies the cached evaluation
    write_eval_parts(
        loaded_model(ws, _eval_model_dir(ws, step)),
        ws.tokenizer,
        ws.eval_examples,
        ws.eval_tok,
        ws.cfg.eval,
        ws.iter_dir(step.iteration),
        stop_ids=ws.stop_ids,
        device=ws.device,
        shard=shard_of(ws.state),
        progress=ws.cfg.logging.progress and ws.state.is_main_process,
        tag=inputs.tag,
    )
    # lm-eval on every process: the harness shards its requests across them itself. It loads its own copy
    # of the model, so ours goes first (two copies of a 7B model in float32 would be 56 GB per GPU)
    if ws.cfg.eval.lm_eval_tasks:
        release_models(ws)
    with whole_weights():  # lm-eval's from_pretrained too (spaceft.models.whole_weights)
        return run_benchmarks(ws.cfg.eval, ws.cfg.model, ws.iter_dir(step.iteration),
                              model_dir=_eval_model_dir(ws, step), every_rank=True)  # fmt: skip


def finish_eval_step(
    ws: Workspace, step: Step, inputs: EvalInputs, benchmarks: dict[str, Any]
) -> dict[str, Any]:
    out = ws.iter_dir(step.iteration)
    if inputs.hit is not None:
        evalcache.restore(Path(inputs.hit), out)
        log.info("%s: the same weights were evaluated with the same settings before; reusing %s", step,
                 inputs.hit)  # fmt: skip
        return {**read_json(out / "eval.json"), "cached": inputs.key}
    result = finish_eval(ws.eval_examples, ws.eval_tok, ws.cfg.eval, out, lm_eval=benchmarks, tag=inputs.tag)
    if inputs.key is not None:  # only what this evaluation wrote (an older one's files may lie beside it)
        wrote = ["eval.json", "eval_outputs.parquet"]
        wrote += ["eval_samples.jsonl"] if "accuracy" in result else []
        wrote += ["lm_eval_tasks"] if ws.cfg.eval.lm_eval_tasks else []
        evalcache.store(inputs.key, out, wrote)
    return result


@dataclass(frozen=True)
class StageFns:
    load: Callable[[Workspace, Step], Any]
    work: Callable[[Workspace, Step, Any], Any]
    finish: Callable[[Workspace, Step, Any, Any], dict[str, Any]]


STAGE_FNS = {
    "generate": StageFns(load_generate, work_generate, finish_generate),
    "score": StageFns(load_score, work_score, finish_score),
    "train": StageFns(load_train, work_train, finish_train),
    "eval": StageFns(load_eval, work_eval, finish_eval_step),
}
"""The functions of each stage of `spaceft.stages.TABLE`, by its name."""
if tuple(STAGE_FNS) != STAGES:
    raise ImportError(f"STAGE_FNS covers {tuple(STAGE_FNS)}, the stage table {STAGES}")
