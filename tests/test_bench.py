"""The benchmark scripts run (tiny model, one step): they must not rot between measurements."""

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_command


def test_plot_overhead_benchmark_runs_and_reports_ratios(tiny_model_dir, zero3_test_config):
    proc = run_command(
        [
            sys.executable,
            str(REPO / "bench" / "plot_overhead.py"),
            "--steps",
            "1",
            "--warmup",
            "0",
            "--loss-path-repeats",
            "2",
            "--model.name_or_path",
            tiny_model_dir,
            "--deepspeed.config",
            zero3_test_config,
            "--data.max_length",
            "64",
            "--data.max_prompt_length",
            "32",
        ]
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ranks"] == 1 and len(result["overhead_ratio_by_step"]) == 1
    # The two variants ran the same batches (each step updating the one policy), one with PLOT's
    # term and one without it.
    plot, vanilla = result["losses_by_step"]["plot"][0], result["losses_by_step"]["vanilla"][0]
    assert vanilla["loss/plot"] is None and plot["loss/plot"] > 0
    assert plot["loss/total"] == pytest.approx(plot["loss/vanilla"] + result["alpha"] * plot["loss/plot"], rel=1e-6)
    assert vanilla["loss/total"] == pytest.approx(vanilla["loss/vanilla"], rel=1e-6)
    # The ratios are the measured times' ratios.
    assert result["overhead_ratio"] == pytest.approx(
        result["step_seconds_plot_median"] / result["step_seconds_vanilla_median"], rel=1e-9
    )
    assert result["overhead_ratio_by_step"][0] == pytest.approx(result["overhead_ratio"], abs=1e-4)
    assert result["overhead_ratio_paired_median"] == pytest.approx(result["overhead_ratio_by_step"][0], rel=1e-3)
    assert 0 < result["loss_path_seconds_vanilla"] < result["step_seconds_vanilla_median"]
    assert result["loss_path_seconds_plot"] > 0 and result["overhead_ratio_from_loss_path"] > 0.5
    assert result["step_seconds_vanilla_median"] > 0 and result["step_seconds_plot_median"] > 0
    assert result["full_gather_bytes"] == 49152 * 32 * 4
    assert result["slice_rows_per_micro_batch"] > 64


def test_global_batch_cost_benchmark_compares_aot_with_dpo_per_split(tiny_model_dir, zero3_test_config):
    proc = run_command(
        [
            sys.executable,
            str(REPO / "bench" / "global_batch_cost.py"),
            "--steps",
            "1",
            "--warmup",
            "0",
            "--model.name_or_path",
            tiny_model_dir,
            "--deepspeed.config",
            zero3_test_config,
            "--data.max_length",
            "64",
            "--data.max_prompt_length",
            "32",
        ]
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one_forward, accumulating = result["splits"]
    assert (one_forward["gradient_accumulation_steps"], accumulating["gradient_accumulation_steps"]) == (1, 2)
    assert not one_forward["pre_pass"] and accumulating["pre_pass"]
    for split in result["splits"]:
        assert split["aot_over_dpo_paired_median"] > 0 and split["step_seconds_dpo_median"] > 0
        assert split["table_bytes_received_per_rank"] == 2 * 6 * 8  # a global batch of 2 pairs


def test_zero3_memory_benchmark_halves_model_state_at_two_ranks(tiny_model_dir, zero3_test_config):
    proc = run_command(
        [
            sys.executable,
            str(REPO / "bench" / "zero3_memory.py"),
            "--ranks",
            "1,2",
            "--model.name_or_path",
            tiny_model_dir,
            "--deepspeed.config",
            zero3_test_config,
        ]
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = result["per_rank"]["1"][0], result["per_rank"]["2"]
    assert one["parameters"] >= 4 * 49152 * 32  # fp32, the whole model on the one rank
    assert one["gradients"] == one["parameters"]  # no persistent parameters with threshold 0
    # Adam's two moments; in fp32 the master weights are the parameter partition itself (one copy).
    assert one["optimizer"] == 2 * one["parameters"]
    assert len(two) == 2 and all(r["total"] < 0.51 * one["total"] for r in two)
    assert 0.49 < result["ratio_to_first"]["2"] < 0.51


def test_sinkhorn_vs_pot_benchmark_reports_speed_ratio_and_error(real_model_dir):
    proc = run_command(
        [
            sys.executable,
            str(REPO / "bench" / "sinkhorn_vs_pot.py"),
            "--problems",
            "16",
            "--repeats",
            "1",
            "--model",
            real_model_dir,
        ]
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["speedup_sinkhorn_over_pot_loop"] > 0 and result["device"] == "cpu"
    assert 0.0 < result["mean_W"] < 2.0
    assert result["abs_error_max"] < 0.02  # eps = 0.01 entropic bias at most


def test_prompt_sharing_benchmark_reports_the_ratio(tiny_model_dir):
    """On the tiny model with SmolLM2's tokenizer: the token counts are the real pairs' own."""
    proc = run_command(
        [
            sys.executable,
            str(REPO / "bench" / "prompt_sharing.py"),
            "--pairs",
            "2",
            "--prompt-lengths",
            "raw,64",
            "--model",
            tiny_model_dir,
        ]
    )
    raw, stretched = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]
    assert raw["prompt_length"] == "raw" and stretched["prompt_length"] == 64
    assert stretched["prompt_share_of_row_tokens"] > raw["prompt_share_of_row_tokens"] > 0
    assert raw["ratio_shared_over_full"] > 0 and raw["full_rows_s"] > 0


def test_packing_benchmark_reports_positions_and_ratios(tiny_model_dir):
    """Real pairs, SmolLM2's tokenizer (on the tiny model): packed rows compute exactly the rows'
    tokens, no padding; sharing the prompt in the packed row computes each prompt once, fewer still;
    every layout timed."""
    proc = run_command(
        [
            sys.executable,
            str(REPO / "bench" / "packing.py"),
            "--pairs",
            "4",
            "--micro-batch",
            "2",
            "--max-length",
            "64",
            "--max-prompt-length",
            "32",
            "--model",
            tiny_model_dir,
        ]
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["attention"] == "sdpa" and result["pairs"] == 4
    assert result["packed_positions"] == result["row_tokens"] <= result["padded_positions"]  # real tokens only
    assert result["packed_shared_positions"] < result["packed_positions"]
    for name in ("padded", "shared_passes", "packed", "packed_shared"):
        assert result[f"{name}_s"] > 0 and result[f"ratio_{name}_over_padded"] > 0


def test_gpu_check_script_runs_end_to_end_on_cpu(tmp_path):
    """bench/gpu_check.sh as a smoke test on this CPU machine: the assets packed as for a GPU
    machine, a model of SmolLM2's family and vocabulary rebuilt from them (a few narrow layers: every
    section runs as on a GPU, without the real shapes' minutes of CPU compute), training, the
    overhead and OT benchmarks, a TRL comparison (TRL is in the test extras, at the benchmarks'
    version) and a grid of two variants: each section's wiring, in the least time that runs it."""
    assets = tmp_path / "assets"
    run_command([sys.executable, str(REPO / "bench" / "gpu_assets.py"), "pack", str(assets)])
    out = tmp_path / "out"
    proc = run_command(
        ["bash", str(REPO / "bench" / "gpu_check.sh")],
        timeout=1200,
        PYTHON=sys.executable,
        OUT=str(out),
        GPU_CHECK_ASSETS=str(assets),
        GPU_CHECK_MODEL=str(tmp_path / "model"),
        GPU_CHECK_SHAPE="tiny",
        GPU_CHECK_RUN_DIR=str(tmp_path / "run"),
        GPU_CHECK_STEPS="1",
        GPU_CHECK_BENCH_STEPS="1",
        GPU_CHECK_PRECISION="fp32",
        GPU_CHECK_PROBLEMS="8",
        GPU_CHECK_HEAD_POSITIONS="64",
        GPU_CHECK_TRL_STEPS="2",
        GPU_CHECK_TRL_RUNS="one",
        GPU_CHECK_PLAN_CONFIGS="none",  # bench/memory_plan.py's launches: docs/benchmarks.md measures them
        GPU_CHECK_WHEELS=str(tmp_path / "no_wheels"),  # the packages of this machine
        GPU_CHECK_ARGS="--data.max_length 48 --data.max_prompt_length 24 --data.eval_size 0",
        GPU_CHECK_TRL_ARGS="--max-length 80 --max-prompt-length 48 --warmup 0",
        GPU_CHECK_PACKING_ARGS="--pairs 2 --micro-batch 2 --max-length 48 --max-prompt-length 24",
        GPU_CHECK_COMPARE_ARGS="--variants dpo,dpo+plot --train.max_steps 1 --train.warmup_steps 0 "
        "--data.eval_size 4 --eval.generations 1 --eval.max_new_tokens 4 "
        "--data.max_length 48 --data.max_prompt_length 24",
    )
    assert "== done" in proc.stdout, proc.stdout[-3000:]
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    step = json.loads((out / "train_last_step.json").read_text())
    assert step["step"] == 1 and step["loss/total"] > 0 and "plot/w_chosen" in step
    assert step["memory/peak_predicted_gb"] > 0 and step["memory/peak_host_gb"] > 0  # the plan beside it
    results = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        results.setdefault(record["benchmark"], []).append(record)
    assert results["plot_overhead"][0]["overhead_ratio"] > 0
    assert results["sinkhorn_vs_pot"][0]["problems"] == 8
    head = results["tiled_head"][0]
    assert [row["positions"] for row in head["rows"]] == [64] and head["dtype"] == "float32"
    assert head["rows"][0]["whole_seconds"] > 0 and head["rows"][0]["tiled_seconds"] > 0
    packed = results["packing"][0]
    assert packed["packed_positions"] == packed["row_tokens"] <= packed["padded_positions"]
    profile = (out / "profile.txt").read_text()
    assert "step seconds" in profile and "== host, by own time" in profile and "tottime" in profile
    assert "== ops by self_cpu_time_total" in profile and "aten::mm" in profile
    waits = json.loads(profile.split("== host waits per step (on a GPU): ", 1)[1].splitlines()[0])
    # Counted, not just printed: transformers' mask preparation reads a value back in every forward
    # (the policy's and the reference's at least), so a count that misses it counts nothing.
    assert waits.get("aten::_local_scalar_dense", 0) >= 2, waits
    assert all(count > 0 for count in waits.values())
    assert importlib.util.find_spec("trl") is not None, "TRL is a test dependency (setup.cfg, extras test)"
    runs = results["trl_comparison"]
    # The first comparison only (GPU_CHECK_TRL_RUNS=one; the others are the script with other arguments).
    assert [(r["pairs_per_step"], r.get("plot_ds_args"), r["zero_stage_plot_ds"]) for r in runs] == [
        (2, None, 3)
    ]  # fp32: auto is ZeRO-3
    for run in runs:
        assert run["pairs_per_s_ratio"] > 0 and run["peak_rss_ratio"] > 0
        # The same pairs, model and update: DPO's log 2 at step 1, then the same loss after the update
        # (to the 5 decimals reported; float noise of the two sides' different kernels).
        assert run["losses_plot_ds"][0] == run["losses_trl"][0] == round(math.log(2), 5)
        assert len(run["losses_plot_ds"]) == len(run["losses_trl"]) == 2
        assert run["losses_plot_ds"][1] != run["losses_plot_ds"][0]
        assert abs(run["losses_plot_ds"][1] - run["losses_trl"][1]) <= 2e-4
        assert run["mean_tokens_per_pair_plot_ds"] == pytest.approx(run["mean_tokens_per_pair_trl"], rel=1e-9)
    summary = json.loads((out / "compare" / "compare.json").read_text())
    assert {v: s["seeds"] for v, s in summary["variants"].items()} == {"dpo": [1], "dpo+plot": [1]}
    assert summary["variants"]["dpo+plot"]["metrics"]["step_seconds"]["n"] == 1
    assert "| dpo+plot | 1 |" in (out / "compare" / "compare.md").read_text()


def test_host_bound_standin_is_built_with_the_real_vocabulary_and_short_pairs(real_model_dir, tmp_path):
    run_command([sys.executable, str(REPO / "bench" / "host_bound_standin.py"), str(tmp_path), "--pairs", "6"])
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    real = json.loads((Path(real_model_dir) / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        64,
        real["num_hidden_layers"],
        real["vocab_size"],
    )
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6 and all(0 < len(p["chosen"].split()) <= 15 and p["prompt"] for p in pairs)


def test_trl_comparison_alternates_the_sides_and_pools_their_rounds():
    spec = importlib.util.spec_from_file_location("trl_comparison", REPO / "bench" / "trl_comparison.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    order = []

    def run(side):
        order.append(side)
        fast = [4.0, 5.0] if side == "plot_ds" else [3.0, 2.0]
        return {
            "pairs_per_s": sum(fast) / 2,
            "measured_pairs_per_s": [x + len(order) for x in fast],
            "peak_rss_mib": 100.0 * len(order),
            "losses": [0.69],
            "zero_stage": 3,
        }

    runs = bench.alternating_runs(3, run)
    assert order == ["plot_ds", "trl", "trl", "plot_ds", "plot_ds", "trl"]
    ours = bench.pooled(runs["plot_ds"])
    # Steps 5, 6 (run 1), 8, 9 (run 4), 9, 10 (run 5): the median of all six, the highest peak.
    assert ours["pairs_per_s"] == 8.5 and ours["peak_rss_mib"] == 500.0 and ours["losses"] == [0.69]
    assert bench.pooled(runs["trl"])["pairs_per_s"] == statistics.median([5, 4, 5, 6, 9, 8])


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_gradient_scale_statistics_match_hand_computation():
    import torch

    scale = _load_bench("plot_gradient_scale")
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 5])
    # Orthonormal rows: every other token costs 1, so W is exactly the restricted off-target mass.
    stats = scale.position_statistics(logits, targets, torch.eye(6), top_k=3, cost="cosine")
    assert torch.allclose(stats["w"], 1 - stats["p_restricted"], atol=1e-6)
    assert torch.allclose(stats["p_full"], logits.softmax(-1)[torch.arange(5), targets], atol=1e-6)
    assert torch.all(stats["close_mass"] == 0)
    # d/dz of W = sum_i p~_i c_i over the support is p~_i (c_i - W) on the support, 0 elsewhere.
    support = torch.cat([logits.topk(3).indices, targets[:, None]], -1)
    expected = []
    for row, ids in enumerate(support):
        ids = ids.unique()
        p = logits[row, ids].softmax(-1)
        c = (ids != targets[row]).float()
        expected.append((p * (c - (p * c).sum())).norm())
    assert torch.allclose(stats["grad_w"], torch.stack(expected), atol=1e-6)
    nll_grad = (logits.softmax(-1) - torch.nn.functional.one_hot(targets, 6)).norm(dim=-1)
    assert torch.allclose(stats["grad_nll"], nll_grad, atol=1e-6)
    # Identical rows: moving mass costs nothing, and W and its gradient vanish; all mass is "close".
    same = scale.position_statistics(logits, targets, torch.ones(6, 4) / 2, top_k=3, cost="cosine")
    assert torch.allclose(same["w"], torch.zeros(5), atol=1e-6) and float(same["grad_w"].max()) < 1e-6
    assert torch.allclose(same["close_mass"], 1 - same["p_restricted"], atol=1e-6)
    summary = scale.summarise(stats)
    assert summary["positions"] == 5 and summary["w_over_off_target_mass"]["mean"] == pytest.approx(1.0, abs=1e-5)


def test_plot_gradient_scale_runs_on_training_pairs(tiny_model_dir):
    proc = run_command(
        [
            sys.executable,
            str(REPO / "bench" / "plot_gradient_scale.py"),
            "--pairs",
            "3",
            "--model.name_or_path",
            tiny_model_dir,
        ]
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pairs"] == 3 and result["positions"] > 3
    assert 0 <= result["mean_w"] <= 2 and 0 < result["mean_p_target"] < 1
    assert result["grad_ratio_plot_over_nll"]["overall"] > 0
