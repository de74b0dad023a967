"""launch/slurm.sh on a real one-host Slurm cluster (with a preemption warning, requeue and resume),
two node launchers on loopback (deepspeed --hostfile --no_ssh --node_rank), and mpirun.

These need system tools (Slurm, munge, Open MPI) and root for the Slurm daemons. Where they are
missing the tests are skipped with the command that installs them; CI installs them and sets
PLOT_DS_CLUSTER_TESTS=require, which turns every such skip into a failure.
"""

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, child_env, free_port, run_command, start
from slurm_cluster import SlurmCluster, missing_tools

pytestmark = [pytest.mark.distributed, pytest.mark.cluster]
TRAIN = str(REPO / "launch" / "train.py")
INSTALL = "sudo bash .ci/install_cluster_tools.sh"


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("PLOT_DS_CLUSTER_TESTS") == "require":
        pytest.fail(f"{why} (PLOT_DS_CLUSTER_TESTS=require)")
    pytest.skip(f"{why}; install with `{INSTALL}`")


def tiny_config(path: Path, model_dir: str, ds_config: str, output_dir: Path, **train) -> Path:
    """One training config, the same whichever launcher runs it."""
    config = {
        "model": {"name_or_path": model_dir},
        "deepspeed": {"config": ds_config},
        "data": {"max_length": 96, "max_prompt_length": 48, "eval_size": 8},
        "objective": {"name": "dpo"},
        "train": {"output_dir": str(output_dir), "warmup_steps": 0, "lr": 1e-3, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _read_log(log: Path) -> str:
    """A job log is written by several processes at once; a write may split a multi-byte character."""
    return log.read_text(errors="replace")


def read_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_history.jsonl").read_text().splitlines()]


def assert_finished_with_checkpoint(run_dir: Path, steps: int, ranks: int = 2) -> None:
    assert [h["step"] for h in read_history(run_dir)] == list(range(1, steps + 1))
    latest = (run_dir / "checkpoints" / "latest_complete").read_text().strip()
    assert latest == f"step_{steps:08d}"
    checkpoint = run_dir / "checkpoints" / latest
    assert (checkpoint / "plot_ds_complete.json").is_file()
    for rank in range(ranks):
        assert (checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
    assert (run_dir / "final_model" / "model.safetensors").is_file() or any(
        (run_dir / "final_model").glob("*.safetensors")
    )


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require(not missing_tools(), f"Slurm and munge are not installed (missing: {', '.join(missing_tools())})")
    require(os.geteuid() == 0, "starting slurmctld, slurmd and munged needs root")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def test_slurm_template_checkpoints_on_warning_requeues_and_resumes(slurm, tiny_model_dir, zero3_test_config, tmp_path):
    """sbatch launch/slurm.sh as a user would (only the marked settings overridden on the command
    line: one node, no GPUs, 2 CPU ranks); USR1 as Slurm sends it before the time limit; the job
    checkpoints, requeues itself, resumes and finishes with every step exactly once. The 2 ranks form
    one sequence group (parallel.sequence passed through like any override)."""
    steps = 40
    run_dir = tmp_path / "run"
    config = tiny_config(
        tmp_path / "tiny.yaml", tiny_model_dir, zero3_test_config, run_dir, max_steps=steps, save_every=1000
    )
    job = slurm.sbatch(
        "--nodes=1",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        "--partition=debug",
        "--time=20",
        f"--output={tmp_path}/%x-%j.out",
        "launch/slurm.sh",
        config,
        "--train.eval_every",
        "0",
        "--parallel.sequence",
        "2",
        env=child_env(PROCS_PER_NODE="2", RUN_DIR=str(run_dir)),
        cwd=REPO,
    )
    log = tmp_path / f"plot_ds-{job}.out"
    deadline = time.time() + 600
    while not (run_dir / "train_history.jsonl").exists() or not read_history(run_dir):
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state}:\n{_read_log(log) if log.exists() else ''}"
        assert time.time() < deadline, "no training step within 600 s"
        time.sleep(0.5)
    slurm.signal_batch(job, "USR1")

    # The job requeues itself; Slurm holds a requeued job ~2 min before it is eligible again.
    deadline = time.time() + 300
    while slurm.job(job).get("Restarts", "0") == "0":
        assert time.time() < deadline, f"job never requeued:\n{_read_log(log)}"
        time.sleep(0.5)
    stopped_at = int((run_dir / "checkpoints" / "latest_complete").read_text().strip().split("_")[1])
    assert 1 <= stopped_at < steps, "the warning should have stopped the run part-way"
    # Start it at once, but only after the old step is gone (earlier, slurmd refuses the launch).
    deadline = time.time() + 120
    while slurm.job(job).get("JobState") != "PENDING" or slurm.node_state() != "idle":
        assert time.time() < deadline, f"job {slurm.job(job).get('JobState')}, node {slurm.node_state()}"
        time.sleep(0.5)
    time.sleep(2)
    slurm.control("update", f"jobid={job}", "StartTime=now")
    final = slurm.wait(job, timeout=600)

    text = _read_log(log)
    assert final["JobState"] == "COMPLETED", text[-5000:]
    assert "USR1 received" in text and "requeueing job" in text and "restart 1" in text, text[-5000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'}" in text, text[-5000:]
    assert_finished_with_checkpoint(run_dir, steps)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["eval_every"] == 0 and saved["train"]["output_dir"] == str(run_dir)
    assert saved["parallel"]["sequence"] == 2 and "2 rank(s) in 1 sequence group(s) of 2" in text
    hostfile = REPO / ".slurm" / f"hostfile-{job}"
    assert hostfile.read_text().split() == [slurm.host, "slots=2"]


def node_launchers(launcher: str, hostfile: Path, port: str) -> list[list[str]]:
    """What each node runs without Slurm, for two nodes of one rank each."""
    if launcher == "deepspeed":  # the same hostfile everywhere, one --node_rank per node
        return [
            [
                "deepspeed",
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                TRAIN,
            ]
            for node in (0, 1)
        ]
    return [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            "--rdzv_id",
            "two-nodes",
            TRAIN,
        ]
    ] * 2


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_node_launchers_on_loopback_finish(launcher, tiny_model_dir, zero3_test_config, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_dir = tmp_path / "run"
    config = tiny_config(tmp_path / "tiny.yaml", tiny_model_dir, zero3_test_config, run_dir, max_steps=3)
    nodes = [
        start([*command, "--config", str(config)], merge_output=True)
        for command in node_launchers(launcher, hostfile, str(free_port()))
    ]
    outputs = [node.finish(timeout=900).stdout for node in nodes]
    for index, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {index} exited {node.returncode}:\n{output[-6000:]}"
    assert sum("[plot_ds] 2 rank(s) on cpu, rendezvous " in output for output in outputs) == 1, outputs
    assert_finished_with_checkpoint(run_dir, 3)


def test_mpirun_run_finishes_on_loopback(tiny_model_dir, zero3_test_config, tmp_path):
    require(shutil.which("mpirun") is not None, "mpirun (Open MPI) is not installed")
    require(importlib.util.find_spec("mpi4py") is not None, "mpi4py is not installed")
    run_dir = tmp_path / "run"
    config = tiny_config(tmp_path / "tiny.yaml", tiny_model_dir, zero3_test_config, run_dir, max_steps=3)
    # No MASTER_ADDR: the ranks find each other through MPI and must pick loopback on one host.
    env = {key: value for key, value in child_env().items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = run_command(
        [
            "mpirun",
            "-np",
            "2",
            "--allow-run-as-root",
            "--oversubscribe",
            "--mca",
            "btl_tcp_if_include",
            "lo",
            "--mca",
            "oob_tcp_if_include",
            "lo",
            sys.executable,
            TRAIN,
            "--config",
            str(config),
        ],
        env=env,
        check=False,
        output=run_dir,
    )
    assert proc.returncode == 0, f"mpirun exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert "[plot_ds] 2 rank(s) on cpu, rendezvous 127.0.0.1:" in proc.stdout, proc.stdout[-3000:]
    assert_finished_with_checkpoint(run_dir, 3)


def assert_one_message(text: str, words: list[str]) -> None:
    assert text.count("plot-train: data error: ") == 1, text[-5000:]
    for word in words:
        assert word in text, (word, text[-5000:])
    assert "Traceback" not in text, text[-5000:]


def test_mpirun_passes_an_input_error_through_once(tiny_model_dir, zero3_test_config, tmp_path):
    """The error policy under mpirun: rank 0's message once, exit status 2, no traceback."""
    require(shutil.which("mpirun") is not None, "mpirun (Open MPI) is not installed")
    require(importlib.util.find_spec("mpi4py") is not None, "mpi4py is not installed")
    config = tiny_config(tmp_path / "tiny.yaml", tiny_model_dir, zero3_test_config, tmp_path / "run", max_steps=3)
    env = {key: value for key, value in child_env().items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = run_command(
        [
            "mpirun",
            "-np",
            "2",
            "--allow-run-as-root",
            "--oversubscribe",
            "--mca",
            "btl_tcp_if_include",
            "lo",
            "--mca",
            "oob_tcp_if_include",
            "lo",
            sys.executable,
            TRAIN,
            "--config",
            str(config),
            "--data.source",
            str(tmp_path / "absent.jsonl"),
        ],
        env=env,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 2, f"mpirun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert_one_message(proc.stdout + proc.stderr, ["absent.jsonl: no such file or folder"])


def test_slurm_job_with_an_input_error_fails_with_its_status_and_one_message(
    slurm, tiny_model_dir, zero3_test_config, tmp_path
):
    """sbatch launch/slurm.sh (srun --kill-on-bad-exit, one deepspeed launcher per node, 2 ranks)
    with a data file that does not exist: the job FAILS with exit code 2, the log holds the message
    once and no traceback, and no rank is left waiting."""
    config = tiny_config(tmp_path / "tiny.yaml", tiny_model_dir, zero3_test_config, tmp_path / "run", max_steps=3)
    job = slurm.sbatch(
        "--nodes=1",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        "--partition=debug",
        "--time=10",
        f"--output={tmp_path}/%x-%j.out",
        "launch/slurm.sh",
        config,
        "--data.source",
        str(tmp_path / "absent.jsonl"),
        env=child_env(PROCS_PER_NODE="2", RUN_DIR=str(tmp_path / "run")),
        cwd=REPO,
    )
    final = slurm.wait(job, timeout=600)
    text = _read_log(tmp_path / f"plot_ds-{job}.out")
    assert final["JobState"] == "FAILED" and final["ExitCode"].startswith("2:"), (final, text[-3000:])
    assert_one_message(text, ["absent.jsonl: no such file or folder"])
