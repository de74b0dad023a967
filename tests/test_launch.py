"""launch/train.py end to end under the deepspeed launcher and torchrun: 2 real ranks, ZeRO-3."""

import json
import math

import pytest
import yaml

from conftest import REPO, free_port, run_command

pytestmark = pytest.mark.distributed
TRAIN = str(REPO / "launch" / "train.py")


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tiny_run_args(model_dir, ds_config, output_dir, *extra):
    return [
        "--model.name_or_path",
        model_dir,
        "--deepspeed.config",
        ds_config,
        "--data.max_length",
        "96",
        "--data.max_prompt_length",
        "48",
        "--data.eval_size",
        "8",
        "--train.warmup_steps",
        "0",
        "--train.output_dir",
        str(output_dir),
        *extra,
    ]


def test_deepspeed_launcher_sft_run_learns_and_writes_everything(tiny_model_dir, zero3_test_config, tmp_path):
    out = tmp_path / "run"
    proc = run_command(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            TRAIN,
            *tiny_run_args(
                tiny_model_dir,
                zero3_test_config,
                out,
                "--objective.name",
                "sft",
                "--train.lr",
                "1e-2",
                "--train.max_steps",
                "10",
            ),
        ]
    )
    history = json.loads((out / "train_history.json").read_text())
    losses = [h["loss/vanilla"] for h in history]
    assert len(losses) == 10
    assert losses[0] == pytest.approx(math.log(49152), abs=0.2)  # a random model starts near ln V
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    # PLOT on by default, no rejected term: L_PLOT is the chosen tokens' mean transport cost.
    assert all(h["loss/plot"] == pytest.approx(h["plot/w_chosen"], rel=1e-6) and h["loss/plot"] > 0 for h in history)
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert evaluated["eval/loss/vanilla"] < losses[0] - 1.0

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["name"] == "sft" and saved["train"]["lr"] == 1e-2
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["zero_optimization"]["stage"] == 3

    checkpoint = out / "checkpoints" / "step_00000010"
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == "step_00000010"
    assert (checkpoint / "plot_ds_complete.json").is_file() and (checkpoint / "config.yaml").is_file()
    for rank in (0, 1):  # one partition per rank: ZeRO-3 state really is sharded
        assert (checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
        assert (checkpoint / f"rng_rank{rank}.safetensors").is_file()
        assert (checkpoint / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file() or (
            checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        ).is_file()

    logged = scalars(out / "tensorboard")
    for name in (
        "loss/total",
        "loss/vanilla",
        "loss/plot",
        "plot/w_chosen",
        "plot/w_rejected",
        "plot/slice_rows",
        "plot/slice_bytes",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "throughput/tokens_per_s",
        "memory/peak_host_gb",
        "eval/loss/total",
        "eval/plot/w_chosen",
    ):
        assert name in logged, f"{name} missing from TensorBoard: {sorted(logged)}"
    assert all(0.05 < gb < 24 for gb in logged["memory/peak_host_gb"])  # a real resident size, in GiB
    assert logged["loss/vanilla"] == pytest.approx(losses, rel=1e-6)
    assert len(logged["lr"]) == 10 and logged["lr"][0] == pytest.approx(1e-2)
    assert f"run directory:  {out}" in proc.stdout
    assert "tensorboard --logdir" in proc.stdout


def test_torchrun_dpo_run_with_reference_engine(uninterrupted):
    """The 2-rank torchrun DPO run of tests/conftest.py (live reference engine, evaluation at step 4
    and at the end), read here."""
    out = uninterrupted
    history = json.loads((out / "train_history.json").read_text())
    assert history[0]["loss/vanilla"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # Later steps: the policy has moved and the frozen reference has not (a reference that were the
    # policy itself would give log 2 and zero rewards at every step).
    for later in history[1:]:
        assert abs(later["loss/vanilla"] - math.log(2)) > 1e-4 and abs(later["rewards/chosen"]) > 1e-4, later
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]  # DPO widens the margin it trains on
    assert all(math.isfinite(v) for h in history for v in h.values())
    logged = scalars(out / "tensorboard")
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "eval/loss/total",
    ):
        assert name in logged, f"{name} missing from TensorBoard: {sorted(logged)}"
    assert len(logged["eval/loss/total"]) == 2  # at step 4 and at the end
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert abs(evaluated["eval/rewards/chosen"]) > 1e-4  # the trained policy against the untouched reference
    assert evaluated["eval/rewards/accuracies"] == pytest.approx(round(evaluated["eval/rewards/accuracies"] * 3) / 3)


def test_two_ranks_see_every_pair_exactly_once_per_epoch(uninterrupted):
    """10 training pairs, global batch 4 (2 ranks x 1 pair x 2 accumulation steps): 3 steps per
    epoch, the last one with 2 pairs, so each rank's second micro-batch is a weightless filler."""
    out = uninterrupted
    seen, steps = {0: [], 1: [], 2: []}, {}
    for rank in (0, 1):
        for line in (out / f"pair_ids.rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            seen[record["epoch"]].extend(record["ids"])
            steps.setdefault(record["step"], []).extend(record["ids"])
    for epoch in (0, 1):
        assert len(seen[epoch]) == len(set(seen[epoch])) == 10, seen[epoch]
    assert set(seen[0]) == set(seen[1])  # the same 10 training pairs, none of the 3 held out
    assert len(steps[3]) == len(steps[6]) == 2  # the short last steps of epochs 0 and 1
    history = json.loads((out / "train_history.json").read_text())
    assert all(math.isfinite(h["loss/total"]) for h in history)
    report = json.loads((out / "data_report.json").read_text())
    assert report[0]["pairs"] == 10 and report[0]["skipped"] == []


def test_shell_scripts_quote_every_variable_and_pass_shellcheck():
    scripts = [REPO / "launch" / "slurm.sh", REPO / ".ci" / "run", REPO / ".ci" / "install_cluster_tools.sh"]
    proc = run_command(["shellcheck", "--severity=info", *map(str, scripts)], check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_slurm_template_marks_what_users_edit():
    text = (REPO / "launch" / "slurm.sh").read_text()
    for option in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--time", "--partition", "--output"):
        line = next(line for line in text.splitlines() if line.startswith(f"#SBATCH {option}="))
        assert "# EDIT" in line, line
    for kept in ("--requeue", "--open-mode=append", "--signal=B:USR1@", "--ntasks-per-node=1"):
        assert f"#SBATCH {kept}" in text
    usage = run_command(["bash", str(REPO / "launch" / "slurm.sh")], check=False, timeout=60)
    assert usage.returncode == 2 and "usage: sbatch launch/slurm.sh path/to/config.yaml" in usage.stderr
