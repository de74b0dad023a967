import json
import sys

from conftest import run_command


def plot_data(*args):
    return run_command(
        [sys.executable, "-c", "import sys; from plot_ds.cli import data_main; sys.exit(data_main())", *args],
        check=False,
        timeout=300,
    )


def test_plot_data_describes_a_dataset(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "chosen": "good " * (i + 1), "rejected": "bad"}) + "\n" for i in range(6)
        )
    )
    proc = plot_data(
        "--model.name_or_path",
        tiny_model_dir,
        "--data.source",
        str(data),
        "--data.eval_size",
        "2",
        "--data.cache_dir",
        str(tmp_path / "cache"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: 4 pairs from 6 records" in proc.stdout and "(explicit 4)" in proc.stdout
    assert "tokens per pair" in proc.stdout and "#" in proc.stdout
    assert "eval: 2 pairs" in proc.stdout


def test_plot_data_lists_bad_records_and_fails_when_strict(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    args = (
        "--model.name_or_path",
        tiny_model_dir,
        "--data.source",
        str(data),
        "--data.eval_size",
        "0",
        "--data.cache_dir",
        str(tmp_path / "cache"),
    )
    strict = plot_data(*args)
    assert strict.returncode == 1
    assert f"skipped {data}:2: field 'rejected': is missing" in strict.stdout
    assert "training would stop" in strict.stderr
    assert plot_data(*args, "--data.on_bad_record", "skip").returncode == 0
