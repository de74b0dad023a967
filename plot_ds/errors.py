"""The error policy of every entry point (docs/troubleshooting.md).

A mistake the user made or can fix raises a ``UserError``: the entry point prints its message once,
in a few lines (what is wrong, where, what to do), with no traceback, and exits with its status.
Anything else is a bug of ours and keeps its traceback.

Under a launcher every rank usually meets the same mistake at the same time (a config, model or
data file all ranks read). Rank 0 prints and exits at once; the launcher (torchrun, deepspeed,
mpirun, ``srun --kill-on-bad-exit``) then stops the others, which are often waiting in a
collective for the rank that left. A rank other than 0 waits ``QUIET_SECONDS`` before it prints,
prefixed with its rank: if rank 0 saw the same error the launcher has stopped it by then, and if
only this rank saw it (a file on its own disk), its message still appears, once.

When a rank leaves (an error it reported, a bug, a kill), its peers waiting in a collective with
it fail there (``peer_lost``): their stack only says where they were waiting, so they print one
line, after the same quiet wait, and leave with ``EXIT_PEER_LOST``; the rank that left says why.

This module imports nothing of plot_ds: every module may raise these.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time

EXIT_INPUT = 2  # config, data, model or checkpoint input the user can fix
EXIT_WRITE = 4  # a write failed: disk full, permission, quota (nothing already saved was lost)
EXIT_PEER_LOST = 5  # another rank left a collective this one was in (that rank's output says why)
QUIET_SECONDS = 5.0
# How a collective fails when a peer process is gone (gloo, NCCL).
PEER_LOST_WORDS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "remote process exited",
    "NCCL communicator was aborted",
)


class UserError(Exception):
    """An error the user can fix; the message says what, where and what to do."""

    kind = "input"
    exit_status = EXIT_INPUT


class ModelError(UserError):
    """The model or tokenizer named by ``model.*`` cannot be used as configured."""

    kind = "model"


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message says which and why."""

    kind = "checkpoint"


class MemoryPlanError(UserError):
    """The memory plan says a run cannot fit (``plan.check: refuse``); the message names the fixes."""

    kind = "memory"


class WriteError(UserError):
    """Writing an output failed (full disk, permission, quota); the message names the path."""

    kind = "write"
    exit_status = EXIT_WRITE


def _from_env(*names: str, default: int = 0) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def launcher_rank() -> int:
    """This process's rank as the launcher told it (also before the process group exists)."""
    return _from_env("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def launcher_world_size() -> int:
    return _from_env("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", default=1)


def _wait_for_the_launcher() -> None:
    if threading.current_thread() is threading.main_thread():
        # The launcher stops us with SIGTERM, which training takes as "checkpoint and requeue".
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(QUIET_SECONDS)


def report(prog: str, err: UserError) -> None:
    """Print ``err`` the way the policy says: once, without a traceback."""
    rank, world = launcher_rank(), launcher_world_size()
    prefix = f"{prog}: {err.kind} error: "
    if world > 1 and rank != 0:
        _wait_for_the_launcher()
        prefix = f"[rank {rank}] {prefix}"
    print(prefix + str(err), file=sys.stderr, flush=True)


def peer_lost(err: BaseException) -> bool:
    """Whether ``err`` is a collective of a multi-rank job failing because a peer process is gone."""
    return (
        isinstance(err, RuntimeError)
        and launcher_world_size() > 1
        and any(words in str(err) for words in PEER_LOST_WORDS)
    )


def report_peer_lost(prog: str, err: RuntimeError) -> None:
    _wait_for_the_launcher()
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(
        f"[rank {launcher_rank()}] {prog}: stopped: another rank left a collective this one was in "
        f"({first_line}); that rank's output says why",
        file=sys.stderr,
        flush=True,
    )


def user_errors(prog: str):
    """Decorate an entry point (``main(argv) -> int``) with the policy. In a multi-rank job the
    process leaves with ``os._exit``: a rank whose peers wait in a collective must not wait with
    them in the process group's teardown."""

    def wrap(main):
        @functools.wraps(main)
        def entry(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UserError as err:
                report(prog, err)
                if launcher_world_size() > 1:
                    sys.stdout.flush()
                    os._exit(err.exit_status)
                return err.exit_status
            except RuntimeError as err:
                if not peer_lost(err):
                    raise  # a bug of ours (or of a library): with its traceback
                report_peer_lost(prog, err)
                sys.stdout.flush()
                os._exit(EXIT_PEER_LOST)

        return entry

    return wrap
