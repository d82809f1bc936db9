"""Running under ``torchrun``: which process this is, and how the processes of one job agree.

``torchrun --nproc-per-node N -m hwopt optimize ...`` starts N processes
(several nodes: the same command on each, with ``--nnodes`` and a
``--rdzv-endpoint``). hwopt joins them into one process group: NCCL for
CUDA tensors (uptrain's gradients), gloo for everything else (barriers and
small messages go through a gloo group of their own, so that they work the
same on GPUs and CPUs). library and score shard their units of work
(``Ranks.owns``); each unit is a file written atomically by the rank that
owns it, so a rank killed mid-pass loses only its unit in progress and a
rerun of the job picks up from the files. Passes that are not sharded run
on rank 0 while the others wait; rank 0 alone writes what all ranks share
(indexes, ``run.json``, each pass's manifest).

When a rank stops on an error (``HwoptError``) it leaves the error in the
job's store (``announce_failure``) before it exits; the ranks waiting for it
in a collective then see their connection break, find the error there
(``failure_elsewhere``) and stop with one line naming it, instead of a
traceback.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) this is one
process of rank 0 in a world of 1, and every function here does nothing.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hwopt.errors import HwoptError
from hwopt.pipeline import locked_run_dir, partial_dir, staged_pass, under_torchrun

# BLD of a 70B parent's layers can keep one rank busy for hours while the others wait for it at the end of the pass
TIMEOUT = timedelta(hours=12)
_control = None  # the gloo group for barriers and objects
FAILED_KEY = "hwopt/failed"  # in the job's store: the first error a rank stopped on


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, unit: int) -> bool:
        """Whether unit number ``unit`` of a pass (counted the same way by every rank) is this rank's."""
        return unit % self.world == self.rank

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.world > 1:
            dist.barrier(group=_control)

    def from_main(self, value):
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if self.world == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=_control)
        return box[0]


ONE_PROCESS = Ranks()  # no torchrun: the default of the passes' ``ranks``


def _job_store() -> dist.Store:
    """The store torchrun's agent keeps for the job (it outlives the workers), as a client."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=10))


def store_key() -> str:
    """``FAILED_KEY`` for this attempt of the job (torchrun may restart its workers)."""
    return f"{FAILED_KEY}/{job_id()}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def announce_failure(message: str) -> str:
    """Under torchrun, leave ``message`` (this rank's error) for the job's other ranks, unless a rank did first;
    returns the line this rank prints: ``hwopt: error: ...``, with ``rank N:`` before it on ranks other than 0."""
    rank = int(os.environ.get("RANK", "0"))
    with suppress(Exception):  # no store to reach: the error is still printed here
        _job_store().compare_set(store_key(), "", f"rank {rank} failed: {message}")
    return f"hwopt: error: {message}" if rank == 0 else f"hwopt: rank {rank}: error: {message}"


def failure_elsewhere() -> str | None:
    """Under torchrun, the error another rank of the job stopped on (``announce_failure``), if one did: why a
    collective of this rank broke. None otherwise."""
    if not under_torchrun():
        return None
    try:
        store = _job_store()
        return store.get(store_key()).decode() if store.check([store_key()]) else None
    except Exception:
        return None


def job_id() -> str:
    """The torchrun job this process belongs to (its rendezvous id), or its pid alone."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or f"pid {os.getpid()}"


def local_world() -> int:
    """Processes of this job on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def ranks() -> Ranks:
    """This process's ranks, joining the job's process group on the first call under torchrun."""
    global _control
    if not under_torchrun():
        return Ranks()
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        _control = dist.new_group(backend="gloo", timeout=TIMEOUT)
        atexit.register(leave_job)
    return Ranks(dist.get_rank(), dist.get_world_size())


def leave_job() -> None:
    """Destroy the job's process groups, if this process joined them: run at exit while the interpreter is still
    whole. Left to interpreter shutdown, gloo's worker threads can be torn down holding Python tensors and the
    process aborts ("terminate called without an active exception", SIGABRT) after its work is done; see
    pytorch/pytorch#190489 and #179291."""
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None


@contextmanager
def staged_on_ranks(pass_dir: Path, fp: str, ranks: Ranks) -> Iterator[Path]:
    """``hwopt.pipeline.staged_pass`` for every rank of a job: rank 0 prepares the partial folder (keeping the
    finished units of an interrupted run), every rank works in it, and rank 0 swaps it into place once all
    have returned."""
    if ranks.world == 1:
        with staged_pass(pass_dir, fp) as out:
            yield out
        return
    with ExitStack() as stack:
        out = stack.enter_context(staged_pass(pass_dir, fp)) if ranks.is_main else partial_dir(pass_dir)
        ranks.barrier()
        yield out
        ranks.barrier()
    ranks.barrier()


@contextmanager
def locked_for_job(workdir: Path, ranks: Ranks) -> Iterator[None]:
    """``hwopt.pipeline.locked_run_dir`` for a job: its ranks share the run directory on purpose (rank 0 holds
    the lock in the job's name), any other command is refused in one line on every rank."""
    with ExitStack() as stack:
        error = None
        if ranks.is_main:
            try:
                stack.enter_context(locked_run_dir(workdir, f"torchrun job {job_id()}" if ranks.world > 1 else None))
            except HwoptError as exc:
                error = str(exc)
        error = ranks.from_main(error)
        if error:
            raise HwoptError(error)
        yield
