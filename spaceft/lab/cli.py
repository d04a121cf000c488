"""``spaceft lab``: run the theory lab's default grid (or a variant) and write its report.

Writes ``lab.json`` (every record of every method, seed and iteration, plus the resolved config),
``lab.md`` (method × iteration tables, mean ± std over seeds) and ``lab.png`` (KL vs iteration with
bands over seeds) into ``--out``, and prints the Markdown report.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch

from spaceft.lab.grid import MODES, LabConfig, run_lab
from spaceft.lab.methods import DEFAULT_METHODS, METHOD_NAMES
from spaceft.lab.policies import POLICY_KINDS
from spaceft.lab.population import STARTS, PopulationConfig
from spaceft.lab.report import markdown_report, plot, write_json, write_text
from spaceft.lab.sampled import SampledConfig
from spaceft.lab.world import WorldConfig

logger = logging.getLogger(__name__)

_EPILOG = """\
examples:
  spaceft lab                                   # default grid: 8 methods x 3 seeds x 10 iterations
  spaceft lab --mode sampled --N 64 --epochs 8  # more data, more epochs per iteration
  spaceft lab --methods spin space --mu 1 --spin-beta 1.0 --out lab_spin_beta1
"""


def build_parser() -> argparse.ArgumentParser:
    d_world, d_sampled, d_pop, d_lab = WorldConfig(), SampledConfig(), PopulationConfig(), LabConfig()
    p = argparse.ArgumentParser(
        prog="spaceft lab",
        description="Theory lab: self-play objectives in a toy world where p_data is known exactly, so "
        "KL(p_data||p_theta) is computed exactly. Population mode uses exact expectations (SPACE's "
        "Theorems 2 and 3); sampled mode runs self-play as practitioners do (N real samples per prompt, "
        "K synthetic per real pair, E epochs of RMSProp per iteration).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("lab_out"), help="output directory (default: lab_out/)")
    p.add_argument("--mode", choices=MODES, default=d_lab.mode, help="which modes to run (default: both)")
    p.add_argument("--seeds", type=int, default=len(d_lab.seeds), help="number of seeds (%(default)s)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed; runs seed-start .. +seeds-1 (0)")
    p.add_argument(
        "--iterations",
        type=int,
        default=d_sampled.iterations,
        help="sampled-mode self-play iterations T (%(default)s)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_NAMES,
        default=list(DEFAULT_METHODS),
        help="method families; 'space' runs once per --mu (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; the lab is tiny)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the report")
    p.add_argument("-v", "--verbose", action="store_true", help="log every method and seed")

    m = p.add_argument_group("method hyper-parameters")
    m.add_argument(
        "--mu", type=float, nargs="+", default=list(d_lab.mus), help="SPACE noise ratios (%(default)s)"
    )
    m.add_argument(
        "--K",
        type=int,
        default=None,
        dest="num_synthetic",
        help="synthetic responses per real pair for every method (default: round(mu) for "
        "SPACE, 1 for the pairwise losses)",
    )
    m.add_argument("--spin-beta", type=float, default=d_lab.spin_beta, help="SPIN's lambda (%(default)s)")
    m.add_argument(
        "--space-beta",
        type=float,
        default=d_lab.space_beta,
        help="SPACE's beta (%(default)s; 1 is the paper's objective)",
    )
    m.add_argument("--tau", type=float, default=d_lab.tau, help="S-IPO's tau (%(default)s)")
    m.add_argument("--simpo-beta", type=float, default=d_lab.simpo_beta, help="S-SimPO's beta (%(default)s)")
    m.add_argument("--gamma", type=float, default=d_lab.gamma, help="S-SimPO's margin gamma (%(default)s)")
    m.add_argument(
        "--tspin-alpha", type=float, default=d_lab.tspin_alpha, help="T-SPIN's alpha (%(default)s)"
    )
    m.add_argument(
        "--tspin-beta",
        type=float,
        default=d_lab.tspin_beta,
        help="T-SPIN's beta, weight of the historical term from iteration 2 on (%(default)s)",
    )

    s = p.add_argument_group("sampled mode")
    s.add_argument(
        "--N",
        type=int,
        default=d_sampled.num_real,
        dest="num_real",
        help="real responses per prompt (%(default)s)",
    )
    s.add_argument("--epochs", type=int, default=d_sampled.epochs, help="epochs per iteration (%(default)s)")
    s.add_argument("--lr", type=float, default=d_sampled.lr, help="peak RMSProp learning rate (%(default)s)")
    s.add_argument(
        "--warmup-ratio",
        type=float,
        default=d_sampled.warmup_ratio,
        help="warm-up fraction of each iteration's steps, then linear decay (%(default)s)",
    )
    s.add_argument(
        "--batch-size", type=int, default=d_sampled.batch_size, help="pairs per step (%(default)s)"
    )
    s.add_argument(
        "--sft-start-epochs",
        type=int,
        default=d_sampled.sft_start_epochs,
        help="epochs of SFT that make the starting model (%(default)s)",
    )
    s.add_argument(
        "--model", choices=POLICY_KINDS, default=d_sampled.policy, help="model family (%(default)s)"
    )
    s.add_argument(
        "--rank", type=int, default=d_sampled.rank, help="rank of the factored model (%(default)s)"
    )
    s.add_argument(
        "--init-scale", type=float, default=d_sampled.init_scale, help="std of initial logits (%(default)s)"
    )

    q = p.add_argument_group("population mode")
    q.add_argument("--pop-iterations", type=int, default=d_pop.iterations, help="iterations (%(default)s)")
    q.add_argument(
        "--pop-steps", type=int, default=d_pop.max_steps, help="L-BFGS steps per iteration (%(default)s)"
    )
    q.add_argument(
        "--pop-start",
        choices=STARTS,
        default=d_pop.start,
        help="random logits, or p_data itself for Theorem 3 (%(default)s)",
    )

    w = p.add_argument_group("world")
    w.add_argument(
        "--prompts", type=int, default=d_world.num_prompts, help="number of prompts P (%(default)s)"
    )
    w.add_argument("--alphabet", type=int, default=d_world.alphabet_size, help="letters A (%(default)s)")
    w.add_argument(
        "--max-len", type=int, default=d_world.max_len, help="maximum response letters (%(default)s)"
    )
    w.add_argument(
        "--teacher-scale",
        type=float,
        default=d_world.teacher_scale,
        help="std of the p_data logits (%(default)s)",
    )
    w.add_argument(
        "--teacher-rank",
        type=int,
        default=d_world.teacher_rank,
        help="0: free teacher table; r > 0: rank-r structure shared across prompts (%(default)s)",
    )
    w.add_argument("--world-seed", type=int, default=d_world.seed, help="seed of the teacher (%(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> LabConfig:
    """The :class:`LabConfig` of parsed arguments (raises ``ValueError`` on inconsistent values)."""
    world = WorldConfig(
        num_prompts=args.prompts,
        alphabet_size=args.alphabet,
        max_len=args.max_len,
        teacher_scale=args.teacher_scale,
        teacher_rank=args.teacher_rank,
        seed=args.world_seed,
    )
    sampled = SampledConfig(
        num_real=args.num_real,
        iterations=args.iterations,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        sft_start_epochs=args.sft_start_epochs,
        policy=args.model,
        rank=args.rank,
        init_scale=args.init_scale,
    )
    population = PopulationConfig(
        iterations=args.pop_iterations, max_steps=args.pop_steps, start=args.pop_start
    )
    return LabConfig(
        world=world,
        sampled=sampled,
        population=population,
        methods=tuple(args.methods),
        mus=tuple(args.mu),
        num_synthetic=args.num_synthetic,
        spin_beta=args.spin_beta,
        space_beta=args.space_beta,
        tau=args.tau,
        simpo_beta=args.simpo_beta,
        gamma=args.gamma,
        tspin_alpha=args.tspin_alpha,
        tspin_beta=args.tspin_beta,
        seeds=tuple(range(args.seed_start, args.seed_start + args.seeds)),
        mode=args.mode,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``spaceft lab``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        level = logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    command = ("spaceft lab " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    logger.info("lab config: %s", config)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run_lab(config)
    finally:
        torch.set_num_threads(threads)
    result["command"] = command
    report = markdown_report(result, command)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out / "lab.json")
    write_text(report, args.out / "lab.md")
    plot(result, args.out / "lab.png")
    logger.info("wrote %s/lab.json, lab.md, lab.png in %.1f s", args.out, result["wall_time_s"])
    if not args.quiet:
        print(report)  # the CLI's product; library code logs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
