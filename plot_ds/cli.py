"""Console entry points. Argument parsing only; the work happens in the library."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, parse_overrides

TRAIN_USAGE = """plot-train [--config FILE.yaml] [--section.key VALUE ...]

Runs under `deepspeed`, `torchrun`, `mpirun` or as one plain process. With no arguments it trains
SmolLM2-135M-Instruct with DPO on the built-in CHAMP preference pairs.
Examples: --train.lr 1e-6  --objective.name sft  --deepspeed.config ds_configs/zero2.json"""


def parse_train_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="plot-train", usage=TRAIN_USAGE, add_help=True)
    parser.add_argument("--config", default=None, help="YAML config file")
    # Passed by the deepspeed launcher; the rank also arrives in LOCAL_RANK, which we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    known, rest = parser.parse_known_args(argv)
    return known.config, parse_overrides(rest)


def train_main(argv: list[str] | None = None) -> int:
    try:
        config_path, overrides = parse_train_args(sys.argv[1:] if argv is None else argv)
        config = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"plot-train: config error: {err}", file=sys.stderr)
        return 2
    from .training import train  # heavy imports only after the config is known to be good

    train(config)
    return 0
