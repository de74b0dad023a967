"""Console entry points. Argument parsing only; the work happens in the library."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, parse_overrides

TRAIN_USAGE = """plot-train [--config FILE.yaml] [--section.key VALUE ...]

Runs under `deepspeed`, `torchrun`, `mpirun` or as one plain process. With no arguments it trains
SmolLM2-135M-Instruct with DPO on the built-in CHAMP preference pairs.
Examples: --train.lr 1e-6  --objective.name sft  --deepspeed.config ds_configs/zero2.json"""


def parse_train_args(argv: list[str], prog: str = "plot-train", usage: str = TRAIN_USAGE):
    parser = argparse.ArgumentParser(prog=prog, usage=usage, add_help=True)
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


DATA_USAGE = """plot-data [--config FILE.yaml] [--section.key VALUE ...]

Reads, validates and tokenises the configured data (section `data`, tokenizer of `model`) and
describes it: pairs per split, formats detected, token-length histogram, truncation, and every
record left out with its file, line and field. Exit status 1 when data.on_bad_record is strict
and any record is bad (training would refuse to start), else 0."""


def data_main(argv: list[str] | None = None) -> int:
    import dataclasses

    try:
        config_path, overrides = parse_train_args(sys.argv[1:] if argv is None else argv, prog="plot-data",
                                                  usage=DATA_USAGE)
        config = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"plot-data: config error: {err}", file=sys.stderr)
        return 2
    from .data import DataError, prepare_datasets
    from .engine import load_tokenizer

    try:
        tokenizer = load_tokenizer(config)
        # Collect every problem instead of stopping at the first report.
        _, _, reports = prepare_datasets(dataclasses.replace(config.data, on_bad_record="skip"), tokenizer)
    except DataError as err:
        print(f"plot-data: {err}", file=sys.stderr)
        return 1
    for report in reports:
        print(report.describe())
    bad = sum(len(r.defects) for r in reports)
    if bad and config.data.on_bad_record == "strict":
        print(f"plot-data: {bad} bad record(s): training would stop (data.on_bad_record: strict)", file=sys.stderr)
        return 1
    return 0
