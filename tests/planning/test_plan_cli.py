"""plot-plan on a model folder holding nothing but config.json, its bad input, and plot-train
refusing a run the plan says cannot fit before any weight is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import run_command

from plot_ds.planning.cli import main as plot_plan


def config_only(tmp_path: Path, tiny_model_dir: str, tokenizer: bool = False) -> Path:
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", folder)
    if tokenizer:
        for name in Path(tiny_model_dir).iterdir():
            if name.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(name, folder)
    return folder


def test_plot_plan_prints_each_part_and_the_nearest_fixes(tmp_path, tiny_model_dir, capsys):
    model = str(config_only(tmp_path, tiny_model_dir))
    common = ["--model.name_or_path", model, "--tokens", "400", "--train.micro_batch_size", "8"]
    assert plot_plan([*common, "--json"]) == 0
    fitting = json.loads(capsys.readouterr().out)
    assert fitting["fits"] is True and fitting["peak_phase"] == "the head's backward"
    assert {"parameters", "optimizer state", "reference", "activations", "head and PLOT", "runtime"} <= set(
        fitting["parts_gb"]
    )
    assert fitting["tokens_per_step"] == 8 * (2 * 100 + 2 * 300)  # prompt in both rows, two responses
    assert fitting["flops_per_step"] > 0
    # A device just under that peak: refused, with the smaller micro-batch (same global batch) first.
    tight = fitting["peak_gb"] * 0.97
    assert plot_plan([*common, "--gpu-memory-gb", f"{tight:.6f}"]) == 1
    out = capsys.readouterr().out
    assert "verdict: DOES NOT FIT" in out and "nearest fixes:" in out
    first_fix = out.split("nearest fixes:\n")[1].splitlines()[0]
    assert "--train.micro_batch_size 4 --train.gradient_accumulation_steps 2" in first_fix
    assert "data.max_length" in out and "truncates" in out


def test_plot_plan_reads_the_datas_lengths(tmp_path, tiny_model_dir, data_file, capsys):
    """Without --tokens the training pairs are tokenised as plot-train would: the plan's largest
    micro-batch is the longest pairs', and the data's histogram is shown."""
    model = str(config_only(tmp_path, tiny_model_dir, tokenizer=True))
    common = ["--model.name_or_path", model, "--data.source", str(data_file), "--data.eval_size", "3"]
    assert plot_plan([*common, "--train.micro_batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert "tokens per pair (prompt + longer response)" in out and "10 pairs" in out
    assert "micro-batch 2 x " in out and "verdict: fits" in out


def test_plot_plan_names_bad_input_once(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_plan(["--model.name_or_path", str(empty), "--tokens", "100"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 8}))
    assert plot_plan(["--model.name_or_path", str(unknown), "--tokens", "100"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "Traceback" not in err
    model = str(config_only(tmp_path, tiny_model_dir))
    assert plot_plan(["--model.name_or_path", model, "--tokens", "100", "--gpu-memory-gb", "0.001"]) == 1
    out = capsys.readouterr().out
    assert "1 rank(s) of 0.001 GiB cannot hold this model and run at all" in out
    assert "the least any setting plot-plan knows needs is" in out
    assert plot_plan(["--model.name_or_path", model, "--tokens", "100", "--ranks", "0"]) == 2
    assert "--ranks: must be >= 1" in capsys.readouterr().err


def test_plot_train_refuses_a_run_that_cannot_fit_before_loading_weights(tmp_path, tiny_model_dir, data_file):
    """A folder with config.json and the tokenizer but no weights: the plan refuses the run for a
    stated 0.05 GiB, so the missing weights are never asked for."""
    model = config_only(tmp_path, tiny_model_dir, tokenizer=True)
    assert not list(model.glob("*.safetensors"))
    result = run_command(
        ["plot-train", "--model.name_or_path", str(model), "--data.source", str(data_file)]
        + ["--plan.device_memory_gb", "0.05", "--train.output_dir", str(tmp_path / "run")],
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "plot-train: memory error: the memory plan predicts" in result.stderr
    assert "Nearest fixes:" in result.stderr and "Traceback" not in result.stderr
    assert "[plot_ds] memory plan: predicted peak" in result.stdout
