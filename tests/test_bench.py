"""The benchmark scripts run (tiny model, one step): they must not rot between measurements."""
import json
import sys

from conftest import REPO, run_command


def test_plot_overhead_benchmark_runs_and_reports_ratios(tiny_model_dir, zero3_test_config):
    proc = run_command([sys.executable, str(REPO / "bench" / "plot_overhead.py"), "--steps", "1",
                        "--warmup", "0", "--model.name_or_path", tiny_model_dir,
                        "--deepspeed.config", zero3_test_config, "--data.max_length", "64",
                        "--data.max_prompt_length", "32"])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["overhead_ratio"] > 0 and result["ranks"] == 1
    assert result["step_seconds_vanilla_median"] > 0 and result["step_seconds_plot_median"] > 0
    assert result["full_gather_bytes"] == 49152 * 32 * 4
    assert result["slice_rows_per_micro_batch"] > 64
