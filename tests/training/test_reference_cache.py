"""Precomputed reference log-probs: same training as the live reference engine; wrong inputs refused."""

import json
import shutil
import sys

import pytest

from conftest import REPO, run_command, torchrun
from plot_ds.training.reference_cache import model_fingerprint

TRAIN = str(REPO / "launch" / "train.py")
STEPS = 3


def dpo_args(model_dir, ds_config, out, data, *extra):
    """DPO on the 13 pairs of ``data_file`` (7 trained, 6 held out): the cache pass covers both."""
    return [
        "--model.name_or_path",
        model_dir,
        "--deepspeed.config",
        ds_config,
        "--objective.name",
        "dpo",
        "--data.source",
        str(data),
        "--data.max_length",
        "96",
        "--data.max_prompt_length",
        "48",
        "--data.eval_size",
        "6",
        "--train.max_steps",
        str(STEPS),
        "--train.lr",
        "1e-3",
        "--train.micro_batch_size",
        "1",
        "--train.gradient_accumulation_steps",
        "2",
        "--train.save_checkpoint",
        "false",
        "--train.output_dir",
        str(out),
        *extra,
    ]


def two_ranks(*args):
    return torchrun(2, TRAIN, *args)


@pytest.mark.distributed
def test_cached_reference_trains_exactly_like_the_live_engine(tiny_model_dir, zero3_test_config, data_file, tmp_path):
    cache = tmp_path / "ref.safetensors"
    two_ranks(*dpo_args(tiny_model_dir, zero3_test_config, tmp_path / "engine", data_file))
    first = two_ranks(
        *dpo_args(
            tiny_model_dir,
            zero3_test_config,
            tmp_path / "cache",
            data_file,
            "--reference.mode",
            "cache",
            "--reference.cache_path",
            str(cache),
        )
    )
    assert "computing reference log-probs once" in first.stdout and cache.is_file()
    again = two_ranks(
        *dpo_args(
            tiny_model_dir,
            zero3_test_config,
            tmp_path / "again",
            data_file,
            "--reference.mode",
            "cache",
            "--reference.cache_path",
            str(cache),
        )
    )
    assert f"reference log-probs from {cache}" in again.stdout and "computing" not in again.stdout
    runs = {
        name: json.loads((tmp_path / name / "train_history.json").read_text()) for name in ("engine", "cache", "again")
    }
    evals = {name: json.loads((tmp_path / name / "eval_results.json").read_text()) for name in runs}
    for name in ("cache", "again"):
        assert [h["step"] for h in runs[name]] == [h["step"] for h in runs["engine"]] == list(range(1, STEPS + 1))
        for live, cached in zip(runs["engine"], runs[name], strict=True):
            for metric in ("loss/total", "loss/vanilla", "rewards/margins", "rewards/accuracies"):
                assert cached[metric] == pytest.approx(live[metric], rel=1e-5, abs=1e-6), (name, metric)
        assert evals[name]["eval/loss/total"] == pytest.approx(evals["engine"]["eval/loss/total"], rel=1e-5)


def test_a_cache_made_for_other_data_is_refused(tiny_model_dir, zero3_test_config, data_file, tmp_path):
    cache = tmp_path / "ref.safetensors"
    run_command(
        [
            sys.executable,
            TRAIN,
            *dpo_args(
                tiny_model_dir,
                zero3_test_config,
                tmp_path / "a",
                data_file,
                "--train.max_steps",
                "1",
                "--reference.mode",
                "cache",
                "--reference.cache_path",
                str(cache),
            ),
        ]
    )
    proc = run_command(
        [
            sys.executable,
            TRAIN,
            *dpo_args(
                tiny_model_dir,
                zero3_test_config,
                tmp_path / "b",
                data_file,
                "--train.max_steps",
                "1",
                "--data.eval_size",
                "7",
                "--reference.mode",
                "cache",
                "--reference.cache_path",
                str(cache),
            ),
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert f"{cache}: reference log-probs were computed for other inputs (data_train:" in proc.stderr
    assert "reference_model" not in proc.stderr.split("other inputs")[1].split(")")[0]  # only the data changed


def test_reference_fingerprint_follows_the_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(str(copy)) == model_fingerprint(tiny_model_dir)
    weights = load_file(copy / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(str(copy)) != model_fingerprint(tiny_model_dir)


def test_cache_cannot_serve_the_ref_mix_target():
    from plot_ds.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reference.mode: cache stores log-probs"):
        load_config(None, {"reference.mode": "cache", "plot.target": "ref_mix"})
