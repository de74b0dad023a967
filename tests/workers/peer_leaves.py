"""Two ranks started by hand (no launcher to stop the survivor): rank 0 meets a user error and
leaves while rank 1 waits for it in a collective, through plot_ds's entry-point policy.

usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p peer_leaves.py
"""

import os
import sys

import torch
import torch.distributed as dist

from plot_ds.errors import WriteError, user_errors


@user_errors("plot-train")
def main() -> int:
    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        raise WriteError("writing /somewhere failed: disk full")
    dist.all_reduce(torch.ones(1))  # rank 0 never comes
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main())
