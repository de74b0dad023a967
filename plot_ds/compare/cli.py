"""``plot-compare`` (also ``python -m plot_ds.compare``) and the evaluation step it launches."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from ..config import ConfigError, load_config, parse_overrides
from ..errors import user_errors

USAGE = """plot-compare [--grid GRID.yaml] [--config BASE.yaml] [--output DIR] [--seeds 1,2,3]
                    [--variants dpo,dpo+plot] [--sweep [VARIANT:]plot.alpha=0.1,0.3,1] [--baseline dpo]
                    [--launcher "torchrun --nproc_per_node 8"] [--discard-weights] [--report-only]
                    [--report NAME] [--section.key VALUE ...]

Trains every (variant, seed) of a grid as its own run under DIR/runs/ on the same data order and
steps, evaluates each final model and the starting model on the same held-out pairs, and writes
DIR/compare.md, compare.json and compare.png (NAME.md, ... with --report NAME). Without --grid:
dpo, dpo+plot, dpo+sft, sft and sft+plot on the base config. Overrides apply to every run. A rerun skips evaluated runs and resumes
unfinished ones. Exit status: 0 all runs done, 1 some run failed (the others went on), 2 a config or
grid error (nothing trained), 130 interrupted (rerun to resume)."""


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="plot-compare", usage=USAGE)
    parser.add_argument("--grid", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--output", default="runs/compare")
    parser.add_argument("--seeds", default=None, help="comma-separated train.seed values")
    parser.add_argument("--variants", default=None, help="comma-separated variant names to run")
    parser.add_argument("--sweep", action="append", default=[])
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--launcher", default=None, help="the command each run starts under (default: python)")
    parser.add_argument(
        "--discard-weights",
        action="store_true",
        help="delete each run's checkpoints and final model once it is evaluated",
    )
    parser.add_argument("--report-only", action="store_true", help="write the report of the runs evaluated so far")
    parser.add_argument(
        "--report",
        default="compare",
        metavar="NAME",
        help="the report's file names: NAME.md, NAME.json, NAME.png (default: compare)",
    )
    known, rest = parser.parse_known_args(argv)
    return known, parse_overrides(rest)


def _launcher(text: str | None) -> list[str]:
    if not text:
        return [sys.executable]
    words = shlex.split(text)
    if not words or shutil.which(words[0]) is None:
        raise ConfigError(f"--launcher {text!r}: '{words[0] if words else ''}' is not a command on PATH")
    return words


def _seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers (e.g. 1,2,3)") from None


@user_errors("plot-compare")
def main(argv: list[str] | None = None) -> int:
    from .grid import build_grid
    from .runner import plan

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    only = [v.strip() for v in args.variants.split(",")] if args.variants else None
    grid = build_grid(args.grid, args.config, overrides, _seeds(args.seeds), only, args.sweep, args.baseline)
    launcher = _launcher(args.launcher)
    output = Path(args.output)
    plan(grid, output)
    from .report import write_report
    from .runner import run_grid

    statuses = {}
    if not args.report_only:
        print(
            f"[plot-compare] {len(grid.variants)} variant(s) x {len(grid.seeds)} seed(s) into {output.resolve()}; "
            f"baseline {grid.baseline}; each run under: {' '.join(launcher)}",
            flush=True,
        )
        try:
            statuses = run_grid(
                grid, output, launcher, keep_weights=not args.discard_weights, say=lambda line: print(line, flush=True)
            )
        except KeyboardInterrupt:
            print("[plot-compare] interrupted; the same command resumes the grid", file=sys.stderr)
            return 130
    write_report(grid, output, args.report)
    print(
        f"[plot-compare] report: {(output / f'{args.report}.md').resolve()} "
        f"(also {args.report}.json, {args.report}.png)"
    )
    print(f"[plot-compare] TensorBoard, every run overlaid: tensorboard --logdir {(output / 'runs').resolve()}")
    failed = [name for name, status in statuses.items() if status == "failed"]
    if failed:
        print(f"[plot-compare] failed: {', '.join(failed)} (see each run's compare.log)", file=sys.stderr)
    return 1 if failed else 0


EVAL_USAGE = "launch_entry.py compare-eval MODEL --config RUN.yaml --start-model START_MODEL --output FILE.json"


@user_errors("plot-compare evaluation")
def evaluate_main(argv: list[str] | None = None) -> int:
    """One model against the starting model (launched by plot-compare under the run's launcher)."""
    parser = argparse.ArgumentParser(prog="plot-compare evaluation", usage=EVAL_USAGE)
    parser.add_argument("model")
    parser.add_argument("--config", required=True)
    parser.add_argument("--start-model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config = load_config(args.config)
    from .model_eval import evaluate_against_start

    evaluate_against_start(config, args.model, args.start_model, Path(args.output))
    return 0
