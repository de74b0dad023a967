"""Console entry points. Argument parsing only; the work happens in the library."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, parse_overrides
from .errors import user_errors

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


@user_errors("plot-train")
def train_main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_train_args(sys.argv[1:] if argv is None else argv)
    config = load_config(config_path, overrides)
    from .training.preemption import EXIT_FAULTS, EXIT_PREEMPTED
    from .training.loop import train  # heavy imports only after the config is known to be good

    outcome = train(config)["outcome"]
    return {"completed": 0, "preempted": EXIT_PREEMPTED, "faults": EXIT_FAULTS}[outcome]


DATA_USAGE = """plot-data [--config FILE.yaml] [--section.key VALUE ...]

Reads, validates and tokenises the configured data (section `data`, tokenizer of `model`) and
describes it: pairs per split, formats detected, token-length histogram, truncation, and every
record left out with its file, line and field. Exit status 1 when data.on_bad_record is strict
and any record is bad (training would refuse to start), 2 when the data or model cannot be read,
else 0."""


@user_errors("plot-data")
def data_main(argv: list[str] | None = None) -> int:
    import dataclasses

    config_path, overrides = parse_train_args(
        sys.argv[1:] if argv is None else argv, prog="plot-data", usage=DATA_USAGE
    )
    config = load_config(config_path, overrides)
    from .data import prepare_datasets
    from .engine.models import load_tokenizer

    tokenizer = load_tokenizer(config)
    # Collect every problem instead of stopping at the first report.
    _, _, reports = prepare_datasets(dataclasses.replace(config.data, on_bad_record="skip"), tokenizer)
    for report in reports:
        print(report.describe())
    bad = sum(len(r.defects) for r in reports)
    if bad and config.data.on_bad_record == "strict":
        print(f"plot-data: {bad} bad record(s): training would stop (data.on_bad_record: strict)", file=sys.stderr)
        return 1
    return 0


EVAL_USAGE = """plot-eval MODEL_OR_RUN [--config FILE.yaml] [--output FILE.json] [--section.key VALUE ...]

MODEL_OR_RUN is a training run directory (its config.yaml and exported final_model/ are used, the
reference is the run's starting model) or a Hugging Face model folder or hub id (with --config or
overrides for the data). Writes the held-out loss, reward accuracy and margins, log-probs, PLOT
costs, greedy generations and answer accuracy as JSON (default: <run>/eval/<model name>.json)."""


@user_errors("plot-eval")
def eval_main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="plot-eval", usage=EVAL_USAGE)
    parser.add_argument("target")
    parser.add_argument("--config", default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    known, rest = parser.parse_known_args(argv)
    target = Path(known.target)
    overrides = parse_overrides(rest)
    if (target / "config.yaml").is_file():  # a run directory
        model = target / "final_model"
        if not (model / "config.json").is_file():
            raise ConfigError(
                f"{target} has no exported final_model/: plot_ds reads models from safetensors "
                f"only (DeepSpeed checkpoints are pickles); train with train.export_final true"
            )
        config = load_config(known.config or target / "config.yaml", overrides)
        output = Path(known.output or target / "eval" / "final_model.json")
    else:
        config = load_config(known.config, overrides)
        model = known.target
        output = Path(known.output or Path(config.train.output_dir) / "eval" / f"{Path(known.target).name}.json")
    from .training.evaluation import evaluate_model

    report = evaluate_model(config, str(model), output)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        for name, value in sorted(report["metrics"].items()):
            print(f"{name}: {value:.6g}")
        print(f"[plot_ds] evaluation written to {output.resolve()}")
    return 0


EXPORT_USAGE = """plot-export RUN_OR_CHECKPOINT [--output DIR]

Writes a Hugging Face folder (safetensors weights, config, generation config, tokenizer) from a
run directory's newest complete checkpoint, or from one checkpoint directory. One process, no GPU:
the ranks' partitions are merged from disk. Default output: <checkpoint>/hf_model."""


@user_errors("plot-export")
def export_main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    from .training.checkpointing import find_checkpoint
    from .training.hf_export import adapter_folder_for, export_checkpoint

    parser = argparse.ArgumentParser(prog="plot-export", usage=EXPORT_USAGE)
    parser.add_argument("source")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    directory = find_checkpoint(args.source, Path(args.source))
    target = export_checkpoint(directory, Path(args.output or directory / "hf_model"))
    print(f"[plot_ds] exported {directory} to {target.resolve()}")
    if adapter_folder_for(target).is_dir():
        print(f"[plot_ds] its adapter (PEFT) to {adapter_folder_for(target).resolve()}")
    return 0
