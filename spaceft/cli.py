"""`spaceft` command line: run self-play, single stages, reports, the demo and the theory lab."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

EPILOG = """examples:
  spaceft run demo                                  # the shipped CPU demo recipe (SPACE on SmolLM2-135M)
  spaceft run my.yaml train.lr=1e-7 selfplay.iterations=5
  spaceft run my.yaml train.loss=spin --force       # discard stale work after a config change
  accelerate launch -m spaceft run paper_space      # multi-GPU: DDP / FSDP / DeepSpeed from accelerate
  spaceft report runs/demo-space
  spaceft lab --iterations 10 --seeds 3
shipped recipes: {recipes}
"""


def shipped_recipes() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("spaceft.recipes").iterdir() if p.name.endswith(".yaml")
    )


def resolve_recipe(name: str) -> Path:
    """A recipe path, or the name of a shipped recipe (`demo`, `paper_space`, ...)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = resources.files("spaceft.recipes") / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise FileNotFoundError(
        f"recipe {name!r} is neither a file nor a shipped recipe ({', '.join(shipped_recipes())})"
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-7")
    p.add_argument(
        "--force", action="store_true", help="discard finished work that the new config makes stale"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spaceft",
        description="Self-play fine-tuning of causal LMs: SPACE (noise-contrastive self-play), SPIN, "
        "S-IPO, S-SimPO and SFT in one resumable pipeline.",
        epilog=EPILOG.format(recipes=", ".join(shipped_recipes())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run or resume all self-play iterations of a recipe")
    _add_run_args(p)
    for stage, text in (
        ("generate", "re-run the generation stage of one iteration"),
        ("score", "re-run the opponent scoring stage of one iteration"),
        ("train", "re-run the training stage of one iteration"),
        ("eval", "re-run the evaluation of one iteration (-1: the start model)"),
    ):
        p = sub.add_parser(stage, help=text)
        _add_run_args(p)
        p.add_argument("--iteration", "-t", type=int, default=0, help="iteration index (default 0)")
    p = sub.add_parser("config", help="print the resolved config of a recipe with overrides, and exit")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("report", help="print the per-iteration table of a run and write its plots")
    p.add_argument("run_dir", help="runs/NAME")
    p = sub.add_parser("demo", help="SPACE self-play on the embedded SmolLM2-135M and arithmetic task")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo recipe")
    p.add_argument("--force", action="store_true")
    sub.add_parser("prepare-model", help="fetch and convert the embedded default model, print its path")
    sub.add_parser("lab", help="the theory lab: exact toy world (spaceft lab --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] == "lab":  # the lab has its own parser (spaceft lab --help)
        from spaceft.lab.cli import main as lab_main

        lab_flags = ["-q"] if any(a in ("-q", "--quiet") for a in argv[:first]) else []
        return lab_main(lab_flags + argv[first + 1 :])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown the stage progress bars
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from spaceft.rundir import InjectedFault

        if args.debug or isinstance(e, InjectedFault):
            raise
        print(f"spaceft: error: {e}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from spaceft.config import load_config

    if args.command == "report":
        from spaceft.report import write_report

        run_dir = Path(args.run_dir)
        if not (run_dir / "manifest.json").exists():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no manifest.json)")
        table, paths = write_report(run_dir)
        print(table)
        print("\n".join(f"wrote {p}" for p in paths))
        return 0
    if args.command == "prepare-model":
        from spaceft.default_model import ensure_default_model

        print(ensure_default_model())
        return 0
    if args.command == "config":
        print(load_config(resolve_recipe(args.recipe), args.overrides).to_yaml())
        return 0
    recipe = resolve_recipe("demo" if args.command == "demo" else args.recipe)
    cfg = load_config(recipe, args.overrides)
    if args.quiet:
        cfg.logging.progress = False
    print(f"# spaceft {args.command} {recipe}\n# resolved config:\n{cfg.to_yaml()}", flush=True)
    from spaceft import selfplay

    if args.command in ("run", "demo"):
        ws = selfplay.run(cfg, force=args.force)
        from accelerate import PartialState

        from spaceft.report import collect, markdown_table

        if PartialState().is_main_process:
            run_dir = ws.cfg.run_dir
            print(f"\n{markdown_table(collect(run_dir))}\n")
            print("\n".join(f"wrote {run_dir / n}" for n in ("report.md", "rewards.png", "eval.png")
                            if (run_dir / n).exists()))  # fmt: skip
        return 0
    selfplay.run(cfg, force=args.force, only_stage=args.command, only_iteration=args.iteration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
