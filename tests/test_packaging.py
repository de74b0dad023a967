"""A non-editable install (what `pip install .` or a wheel gives a user) works outside the checkout."""

import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO, TEST_ENV, run_command


def run(cmd, cwd, env, timeout=900) -> str:
    return run_command(cmd, cwd=cwd, env=env, timeout=timeout).stdout


@pytest.mark.slow
def test_a_non_editable_install_trains_a_step_outside_the_checkout(tmp_path, tiny_model_dir):
    """A wheel is built from a copy of the sources and installed (no -e) into a fresh virtual
    environment that borrows the heavy dependencies (torch, deepspeed, transformers) from this
    interpreter (a .pth file: it may itself be a virtual environment); then one training step runs from a folder that is not the checkout, with
    `deepspeed.config: auto` and with `ds_configs/zero3.json`, neither of which exists there."""
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "runs", "results", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".slurm", ".gpu"
        ),
    )
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TEST_ENV, PIP_DISABLE_PIP_VERSION_CHECK="1")
    # The wheel is built with this interpreter's setuptools (a new venv brings an older one of its own).
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            tmp_path / "dist",
            source,
        ],
        tmp_path,
        env,
    )
    wheel = next((tmp_path / "dist").glob("plot_ds-*.whl"))
    run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python = venv / "bin" / "python"
    # This interpreter's packages, whether it is a system Python or itself a virtual environment
    # (CI's fresh one): --system-site-packages would reach only the Python it was made from.
    import sysconfig

    target = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip()
    (Path(target) / "borrowed_dependencies.pth").write_text(
        "\n".join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])) + "\n"
    )
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel], tmp_path, env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([python, "-c", "import plot_ds; print(plot_ds.__file__)"], elsewhere, env).strip()
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    # plot-compare hands its launcher a file of the installed package
    entry = run(
        [python, "-c", "from plot_ds.compare.runner import ENTRY; print(ENTRY, ENTRY.is_file())"], elsewhere, env
    ).split()
    assert entry[0].startswith(str(venv)) and entry[1] == "True"
    assert "plot-compare [--grid GRID.yaml]" in run([venv / "bin" / "plot-compare", "--help"], elsewhere, env)
    for setting, expected_stage in (("auto", 3), ("ds_configs/zero3.json", 3), ("ds_configs/zero2.json", 2)):
        out = elsewhere / f"run_{expected_stage}_{setting.replace('/', '_')}"
        run(
            [
                venv / "bin" / "plot-train",
                "--model.name_or_path",
                tiny_model_dir,
                "--deepspeed.config",
                setting,
                "--train.max_steps",
                "1",
                "--train.warmup_steps",
                "0",
                "--train.output_dir",
                out,
                "--data.max_length",
                "64",
                "--data.max_prompt_length",
                "32",
                "--data.eval_size",
                "2",
                "--eval.generations",
                "0",
                "--eval.answer_samples",
                "0",
                "--train.export_final",
                "false",
                "--train.save_checkpoint",
                "false",
                "--train.precision",
                "fp32",
            ],
            elsewhere,
            env,
        )
        import json

        history = json.loads((out / "train_history.json").read_text())
        ds_config = json.loads((out / "ds_config.json").read_text())
        assert len(history) == 1 and ds_config["zero_optimization"]["stage"] == expected_stage
