"""`spaceft` command line: run self-play, single stages, reports, the demo and the theory lab.

What users can get wrong is reported as one line naming the key or the path (`--debug` shows the
traceback); `section.key=value` overrides may stand anywhere on the line, before or after flags. The
console shows spaceft's own log lines; other libraries' INFO and WARNING lines, which a user cannot act
on, go only to `<run dir>/logs/spaceft.log` (`-v` shows them, and prints the resolved config in full).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from pathlib import Path

from spaceft.recipes import shipped_recipe, shipped_recipe_names

log = logging.getLogger(__name__)

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose", "--debug")
COMMANDS_WITH_OVERRIDES = ("run", "generate", "score", "train", "eval", "config", "demo")
DISK_FULL = ("No space left on device", "os error 28", "unexpected pos", "PytorchStreamWriter failed writing")

EPILOG = """examples:
  spaceft run demo                                  # the shipped CPU demo recipe (SPACE on SmolLM2-135M)
  spaceft run my.yaml train.lr=1e-7 selfplay.iterations=5
  spaceft run my.yaml train.loss=spin --force       # discard stale work after a config change
  accelerate launch -m spaceft run paper_space      # multi-GPU: DDP / FSDP / DeepSpeed from accelerate
  torchrun --nproc_per_node 2 -m spaceft run tiny   # 2 processes (gloo on CPU): same result as one
  spaceft report runs/demo-space
  spaceft lab --iterations 10 --seeds 3
shipped recipes: {recipes}
"""


def shipped_recipes() -> list[str]:
    return shipped_recipe_names()


def resolve_recipe(name: str) -> Path:
    """A recipe path, or the name of a shipped recipe (`demo`, `paper_space`, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise FileNotFoundError(f"recipe {name!r} is a directory; give a recipe .yaml file")
    shipped = shipped_recipe(name)
    if shipped is not None:
        return shipped
    raise FileNotFoundError(
        f"recipe {name!r} is neither a file nor a shipped recipe ({', '.join(shipped_recipes())})"
    )


OVERRIDES_HELP = (
    "dotted overrides such as train.lr=1e-7, anywhere on the line; `spaceft config RECIPE` prints every "
    "key with its value"
)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
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
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="print the resolved config in full, and other libraries' log lines",
    )  # fmt: skip
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
    p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p = sub.add_parser("report", help="print the per-iteration table of a run and write its plots")
    p.add_argument("run_dir", help="runs/NAME")
    p = sub.add_parser("demo", help="SPACE self-play on the embedded SmolLM2-135M and arithmetic task")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--force", action="store_true")
    sub.add_parser("prepare-model", help="fetch and convert the embedded default model, print its path")
    from spaceft.bench.run import add_arguments as add_bench_arguments

    bench_help = "IFEval, ARC-Easy, HellaSwag, GSM8K (CoT), MMLU offline (lm-eval)"
    add_bench_arguments(sub.add_parser("bench", help=bench_help))
    sub.add_parser("lab", help="the theory lab: exact toy world (spaceft lab --help)", add_help=False)
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `key=value` overrides out of the arguments after the command, wherever they stand, so
    `spaceft run tiny --force name=x` works like `spaceft run tiny name=x --force`; the global flags
    (-q, -v, --debug) may follow the command too."""
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is None:
        return argv, []
    head, rest, overrides = argv[:command], [argv[command]], []
    takes_overrides = argv[command] in COMMANDS_WITH_OVERRIDES
    for i, arg in enumerate(argv[command + 1 :], command + 1):
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg in GLOBAL_FLAGS:
            head.append(arg)
        elif takes_overrides and OVERRIDE.match(arg):
            overrides.append(arg)
        else:
            rest.append(arg)
    return head + rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] == "lab":  # the lab has its own parser (spaceft lab --help)
        from spaceft.lab.cli import main as lab_main

        lab_flags = ["-q"] if any(a in ("-q", "--quiet") for a in argv[:first]) else []
        return lab_main(lab_flags + argv[first + 1 :])
    rest, overrides = split_overrides(argv)
    args = build_parser().parse_args(rest)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
    args.active_run_dir = None  # set once the config is known, to name it in errors
    _setup_console_logging(quiet=args.quiet, verbose=args.verbose)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        resumable = args.command in ("run", "demo", "generate", "score", "train", "eval")
        hint = ": run the same command again to resume where it stopped" if resumable else ""
        print(f"\nspaceft: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        from spaceft.rundir import InjectedFault

        if args.debug or isinstance(e, InjectedFault):
            raise
        message = describe_error(e, args.active_run_dir)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        who = f" (process {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
        print(f"spaceft: error{who}: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    finally:
        if args.active_run_dir is not None:
            from spaceft.rundir import unlock_run_dir

            unlock_run_dir(args.active_run_dir)


def describe_error(e: BaseException, run_dir: Path | None) -> str:
    """The one line for an error: a full disk is said as such, with the path; the rest as raised."""
    text = str(e)
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(s in text for s in DISK_FULL):
        from spaceft.preflight import free_space

        where = Path(getattr(e, "filename", None) or run_dir or Path.cwd())
        return f"no space left on device: {where} ({free_space(where)}): free some space and run again"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return text


class _ConsoleFilter(logging.Filter):
    """spaceft's own records at the chosen level; other libraries' only from ERROR up (unless -v)."""

    def __init__(self, level: int, verbose: bool) -> None:
        super().__init__()
        self.level, self.verbose = level, verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return False
        own = record.name == "spaceft" or record.name.startswith(("spaceft.", "__main__"))
        return own or self.verbose or record.levelno >= logging.ERROR


def _setup_console_logging(*, quiet: bool, verbose: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in [h for h in root.handlers if getattr(h, "_spaceft", False)]:
        root.removeHandler(handler)  # main() may run more than once in a process (tests)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    console.addFilter(_ConsoleFilter(logging.WARNING if quiet else logging.INFO, verbose))
    console._spaceft = True  # type: ignore[attr-defined]
    root.addHandler(console)
    logging.captureWarnings(True)  # warnings.warn from libraries: to the log file, not the console
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown the stage progress bars
    hf_logging.disable_default_handler()  # transformers' records reach the root handlers instead
    hf_logging.enable_propagation()


def _log_to_run_dir(run_dir: Path) -> None:
    """Every record, spaceft's and other libraries', also goes to <run dir>/logs/spaceft.log."""
    root = logging.getLogger()
    path = (run_dir / "logs" / "spaceft.log").resolve()
    if any(getattr(h, "baseFilename", None) == str(path) for h in root.handlers):
        return
    for handler in [h for h in root.handlers if getattr(h, "_spaceft_file", False)]:
        root.removeHandler(handler)
        handler.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    handler._spaceft_file = True  # type: ignore[attr-defined]
    root.addHandler(handler)


def _dispatch(args: argparse.Namespace) -> int:
    from spaceft.configfile import load_config

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
    if args.command == "bench":
        from spaceft.bench.run import main as bench_main

        return bench_main(args)
    if args.command == "config":
        print(load_config(resolve_recipe(args.recipe), args.overrides).to_yaml())
        return 0
    recipe = resolve_recipe("demo" if args.command == "demo" else args.recipe)
    cfg = load_config(recipe, args.overrides)
    if args.quiet:
        cfg.logging.progress = False
    from spaceft import preflight

    args.active_run_dir = cfg.run_dir
    preflight.check_run_dir(cfg.run_dir)
    _log_to_run_dir(cfg.run_dir)
    if args.verbose:
        print(f"# spaceft {args.command} {recipe}\n# resolved config:\n{cfg.to_yaml()}", flush=True)
    else:
        log.info("spaceft %s %s: resolved config in %s (-v prints it)", args.command, recipe,
                 cfg.run_dir / "config.yaml")  # fmt: skip
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
