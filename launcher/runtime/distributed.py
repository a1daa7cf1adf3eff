"""The job's process group: joined from whatever launched the ranks, voted on, left cleanly;
and real groups of fresh processes on one machine (gloo on CPU) for benchmarks and tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from smoe.launcher.runtime import slurm

SHARED_MEMORY = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by gloo.

    ``fn`` must be importable (a module-level function); an exception in any rank is raised here.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def init_distributed() -> tuple[int, int]:
    """Join the job's process group and return (rank, world).

    The ranks' environment comes from whoever started them: the deepspeed launcher or
    torchrun (``RANK`` set), ``srun`` (``SLURM_*``, mapped by :mod:`.slurm`), ``mpirun``
    (found through mpi4py by DeepSpeed), or nobody: a plain ``smoe train`` is a group of one.
    """
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        mpi = any(name in os.environ for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"))
        if "RANK" not in os.environ and not mpi:
            if slurm.in_slurm_step(os.environ):
                os.environ.update(slurm.rank_env(os.environ))
            else:
                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(free_port()))
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False,
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    # This rank's own GPU, before any tensor or communicator exists: otherwise every rank would
    # start on cuda:0. (mpirun's LOCAL_RANK is only known once DeepSpeed has joined the group.)
    # Afterwards the engine's `device` is the one source of truth.
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    release_shared_memory_name()
    return dist.get_rank(), dist.get_world_size()


def shared_memory_buffer(rank: int, environ=os.environ) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps this rank's buffer (``ops/csrc/cpu/comm/shm.cpp``)."""
    return SHARED_MEMORY / (f"deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
                            f"{environ.get('MASTER_PORT', '')}_{rank}")


def release_shared_memory_name() -> None:
    """DeepSpeed's CPU all-reduce gives each rank of a one-machine group (``LOCAL_SIZE`` = world, as
    its launcher sets) a 66 MB shared-memory buffer that every rank maps, and never removes their
    names: each run left them in /dev/shm, in RAM, after any exit, until the machine rebooted. Once
    every rank has mapped every buffer (DeepSpeed's init does, and the barrier waits for all ranks),
    each rank removes its own name; the memory stays mapped while the ranks run and is freed when the
    last of them exits, however it exits."""
    import deepspeed.comm as dist

    world = dist.get_world_size()
    if world == 1 or os.environ.get("LOCAL_SIZE") != str(world):  # DeepSpeed's own test: no buffer then
        return
    dist.barrier()
    shared_memory_buffer(dist.get_rank()).unlink(missing_ok=True)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective; before the engine exists)."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if dist.get_world_size() == 1:
        return flag
    votes = torch.full((1,), float(flag), device=get_accelerator().current_device_name())
    dist.all_reduce(votes)
    return votes.item() > 0


def leave_process_group() -> None:
    """After a command that succeeded on every rank: meet, then close the process group. A process
    that exits with its gloo group still open can abort in the group's threads at interpreter exit
    ("terminate called without an active exception", exit -6) after all its work was done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
