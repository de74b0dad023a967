"""A real one-host Slurm cluster on loopback for the launch tests (the distribution's slurmctld,
slurmd and munge, started by hand: CI machines have no systemd). Needs root. See
../shared/notes/slurm-one-host.md for why each setting is there."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "munge")


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _ensure_munge() -> None:
    if _run("munge -n | unmunge", shell=True).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create"], check=True)
    subprocess.run(["chown", "munge:munge", str(key)], check=True)
    key.chmod(0o400)
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if _run("munge -n | unmunge", shell=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged started but `munge -n | unmunge` still fails")


def _node_layout() -> str:
    """The CPU layout slurmd sees (CPUs alone makes slurmd warn and drain the node)."""
    line = _run(["slurmd", "-C"]).stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in line.split())
    memory = int(fields.pop("RealMemory")) * 9 // 10
    fields.pop("NodeName", None)
    return " ".join(f"{k}={v}" for k, v in fields.items()) + f" RealMemory={memory}"


class SlurmCluster:
    """Start with `with SlurmCluster(tmp_dir) as cluster:`; `cluster.env` is what client commands
    (sbatch, squeue, scontrol) need."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> "SlurmCluster":
        if subprocess.run(["getent", "hosts", self.host], capture_output=True).returncode != 0:
            with open("/etc/hosts", "a") as hosts:  # MASTER_ADDR comes from `scontrol show hostnames`
                hosts.write(f"127.0.0.1 {self.host}\n")
        _ensure_munge()
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=plotds",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    "CryptoType=crypto/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "MailProg=/bin/true",
                    "SchedulerType=sched/backfill",
                    "MinJobAge=600",
                    "KillWait=30",
                    f"StateSaveLocation={self.dir / 'state'}",
                    f"SlurmdSpoolDir={self.dir / 'spool'}",
                    f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.dir / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.dir / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.dir / 'log' / 'slurmd.log'}",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 {_node_layout()} State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", self.host], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.node_state()
            if state == "idle":
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the one-host Slurm node never became idle (state {state!r}); logs in {self.dir / 'log'}")

    def __exit__(self, *exc) -> None:
        for name in ("slurmd", "slurmctld"):  # by pid file, never by name: other clusters may run
            pid_file = self.dir / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)

    def node_state(self) -> str:
        return _run(["sinfo", "-h", "-o", "%t"], env=self.env).stdout.strip()

    def sbatch(self, *args, env=None, cwd=None) -> int:
        proc = _run(["sbatch", "--parsable", *map(str, args)], env={**self.env, **(env or {})}, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        text = _run(["scontrol", "show", "job", str(job_id)], env=self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(
        self, job_id: int, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout: float = 900
    ) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in until:
                return job
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")

    def control(self, *args) -> None:
        subprocess.run(["scontrol", *map(str, args)], check=True, env=self.env, capture_output=True)

    def signal_batch(self, job_id: int, name: str = "USR1") -> None:
        subprocess.run(["scancel", f"--signal={name}", "--batch", str(job_id)], check=True, env=self.env)
