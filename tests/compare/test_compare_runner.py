"""plot-compare end to end on a tiny model: a grid of variants x two seeds, killed mid-run, resumes
without retraining what finished, reports a failed run while the others go on, and fills every
cell of the table."""

import json
import sys
import time

import yaml

from conftest import run_command, start

FAST = [
    "--train.max_steps",
    "2",
    "--data.eval_size",
    "4",
    "--data.max_length",
    "64",
    "--data.max_prompt_length",
    "32",
    "--eval.generations",
    "2",
    "--eval.max_new_tokens",
    "4",
    "--train.precision",
    "fp32",
]


def compare_command(tmp_path, model, grid, *extra):
    return [
        sys.executable,
        "-m",
        "plot_ds.compare",
        "--grid",
        str(grid),
        "--output",
        str(tmp_path / "out"),
        "--model.name_or_path",
        model,
        "--data.cache_dir",
        str(tmp_path / "cache"),
        *FAST,
        *extra,
    ]


def write_grid(tmp_path, variants, seeds):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"variants": variants, "seeds": seeds, "baseline": next(iter(variants))}))
    return path


def wait_for(predicate, process, timeout=600):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.finish(timeout=0).stdout
        if time.time() > deadline:
            process.finish(timeout=0)  # stops it with the stacks of every process printed
        time.sleep(0.5)


def test_a_killed_grid_resumes_without_retraining_finished_runs_and_reports_a_failed_one(tiny_model_dir, tmp_path):
    """Killed mid-grid, then run again: what finished is skipped, the rest trains; a variant whose
    runs fail (an attention implementation that does not exist) is reported, exit status 1, and the
    others go on and fill the table."""
    broken = {"objective.name": "sft", "reference.mode": "none", "model.attn_implementation": "no_such_attention"}
    grid = write_grid(
        tmp_path,
        {
            "dpo": {"plot.enabled": False},
            "sft+plot": {"objective.name": "sft", "reference.mode": "none"},
            "unknown_attention": broken,
        },
        [1, 2],
    )
    runs = tmp_path / "out" / "runs"
    first = start(compare_command(tmp_path, tiny_model_dir, grid), merge_output=True)
    # Killed (the driver and its run, SIGKILL) while the second trained run is training.
    wait_for(lambda: (runs / "sft+plot" / "seed1" / "train_history.jsonl").is_file(), first)
    first.kill()
    finished = runs / "dpo" / "seed1" / "compare_eval.json"
    assert finished.is_file() and not (runs / "sft+plot" / "seed1" / "compare_eval.json").is_file()
    stamp = finished.stat().st_mtime_ns
    second = run_command(compare_command(tmp_path, tiny_model_dir, grid), check=False)
    assert second.returncode == 1, second.stdout + second.stderr
    lines = [line for line in second.stdout.splitlines() if line.startswith("[plot-compare] ")]
    shown = "\n".join(lines)
    assert "[plot-compare] 1/7 start: already evaluated, skipped" in lines, shown
    assert "[plot-compare] 2/7 dpo/seed1: already evaluated, skipped" in lines, shown
    assert any(line.startswith("[plot-compare] 6/7 sft+plot/seed2: trained and evaluated in") for line in lines), shown
    assert finished.stat().st_mtime_ns == stamp
    failed = "[plot-compare] 4/7 unknown_attention/seed1: FAILED: training exited 2 after"
    assert any(line.startswith(failed) for line in lines), shown
    assert "plot-train: model error: model.attn_implementation 'no_such_attention'" in second.stdout
    assert "failed: unknown_attention/seed1, unknown_attention/seed2" in second.stderr
    assert "no_such_attention" in (runs / "unknown_attention" / "seed1" / "compare.log").read_text()
    # every (variant, seed) trained on the same pairs per seed, and every cell of the table is filled
    for seed in (1, 2):
        ids = [
            json.loads((runs / v / f"seed{seed}" / "compare_eval.json").read_text())["held_out_ids"]
            for v in ("dpo", "sft+plot")
        ]
        assert ids[0] == ids[1]
    summary = json.loads((tmp_path / "out" / "compare.json").read_text())
    for variant in ("dpo", "sft+plot"):
        assert summary["variants"][variant]["seeds"] == [1, 2]
        for metric in ("preference_accuracy", "chosen_nll", "kl_to_start", "length", "step_seconds", "peak_rss_gb"):
            assert summary["variants"][variant]["metrics"][metric]["n"] == 2, (variant, metric)
    assert summary["variants"]["sft+plot"]["metrics"]["kl_to_start"]["mean"] > 0
    table = (tmp_path / "out" / "compare.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| sft+plot | 2 |"))
    assert "–" not in row
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000
    assert "TensorBoard, every run overlaid" in second.stdout
    # a second report on a subset of the same runs leaves the first one as it was
    before = table
    subset = run_command(
        compare_command(
            tmp_path, tiny_model_dir, grid, "--variants", "dpo", "--seeds", "1", "--report-only", "--report", "dpo_only"
        ),
        check=False,
        timeout=300,
    )
    assert subset.returncode == 0, subset.stdout + subset.stderr
    assert json.loads((tmp_path / "out" / "dpo_only.json").read_text())["variants"]["dpo"]["seeds"] == [1]
    assert "| sft+plot |" not in (tmp_path / "out" / "dpo_only.md").read_text()
    assert (tmp_path / "out" / "dpo_only.png").is_file() and (tmp_path / "out" / "compare.md").read_text() == before


def test_unknown_keys_and_variants_are_refused_before_anything_trains(tiny_model_dir, tmp_path):
    grid = write_grid(tmp_path, {"dpo": {"plot.alpah": 1.0}}, [1])
    proc = run_command(compare_command(tmp_path, tiny_model_dir, grid), check=False, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "plot-compare: config error: variant 'dpo' (seed 1): unknown config key "
        "'plot.alpah' (did you mean 'plot.alpha'?)"
    )
    proc = run_command(
        compare_command(tmp_path, tiny_model_dir, grid, "--variants", "dpo+plot"), check=False, timeout=300
    )
    assert proc.returncode == 2 and "unknown variant(s) dpo+plot (variants: dpo)" in proc.stderr
    assert not (tmp_path / "out" / "runs").exists()
