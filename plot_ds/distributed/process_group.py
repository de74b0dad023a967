"""Process-group setup that works under the deepspeed launcher, torchrun, mpirun and plain python.

Devices and backends come from DeepSpeed's accelerator, so the same code runs on CUDA and CPU.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass

import torch

from ..engine.deepspeed_patches import skip_shm_op_build, tell_cpu_accelerator_local_size

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    sequence: int = 1  # ranks per sequence group (parallel.sequence): consecutive ranks share pairs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """This rank's place among the data-parallel ranks (its sequence group's)."""
        return self.rank // self.sequence

    @property
    def data_ranks(self) -> int:
        return self.world_size // self.sequence


def sequence_group(dist: DistInfo):
    """This rank's ``SequenceGroup`` (ranks ``g * N`` to ``g * N + N - 1`` share pairs), or None for
    ``dist.sequence`` 1. Every rank creates every group's communicator, in the same order, as
    ``new_group`` requires; a rank talks only within its own (all-to-all and pair sums of N ranks)."""
    import deepspeed.comm as dist_comm

    from ..forward.sequence_parallel import SequenceGroup

    size = dist.sequence
    if size == 1:
        return None
    mine = None
    for first in range(0, dist.world_size, size):
        group = dist_comm.new_group(list(range(first, first + size)))
        if first <= dist.rank < first + size:
            mine = SequenceGroup(size, dist.rank - first, group)
    return mine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _set_env_from_mpi() -> None:
    """mpirun gives ranks but no rendezvous: agree on one through MPI itself.

    DeepSpeed's own MPI discovery picks the first non-loopback address; when every rank is on
    this host we stay on loopback instead, which also works on machines with no external network.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hostname = socket.gethostname()
    hosts = comm.allgather(hostname)
    if "MASTER_ADDR" not in os.environ:
        master = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
        os.environ["MASTER_ADDR"] = master
    port = comm.bcast(os.environ.get("MASTER_PORT") or (_free_port() if rank == 0 else None), root=0)
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(size)
    os.environ["LOCAL_RANK"] = str(hosts[:rank].count(hostname))
    os.environ["LOCAL_WORLD_SIZE"] = str(hosts.count(hostname))


def _launched_by_mpi() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def init_distributed() -> DistInfo:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not all(v in os.environ for v in LAUNCHER_VARS):
        if _launched_by_mpi():
            _set_env_from_mpi()
        else:  # plain `python launch/train.py`: a one-process group on loopback
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # DeepSpeed still calls the old collective names; torch warns on every call, every step.
    warnings.filterwarnings(
        "ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning
    )
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cpu":
        skip_shm_op_build()
        tell_cpu_accelerator_local_size()
    else:
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False, verbose=False
    )
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return DistInfo(
        rank=int(os.environ["RANK"]), local_rank=local_rank, world_size=int(os.environ["WORLD_SIZE"]), device=device
    )


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    import deepspeed.comm as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(value: float) -> float:
    """The largest of one number held by each rank: one scalar all-reduce, whatever the world size."""
    import deepspeed.comm as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _collective_device() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name() if get_accelerator().device_name() != "cpu" else "cpu"


def on_every_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank: one integer all-reduce, whatever the world size."""
    import deepspeed.comm as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def rank() -> int:
    import deepspeed.comm as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import deepspeed.comm as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.barrier()
