"""How the project tells its user something: one call, on rank 0 only, flushed.

Rank 0 speaks for the job (the losses it prints are already reduced over ranks); lines are
flushed so that they keep their order with DeepSpeed's and reach a Slurm log as they
happen. Errors are every rank's own and go to stderr. Before a process group exists the
process is rank 0.
"""

from __future__ import annotations

import sys


def is_rank_zero() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def info(message: str) -> None:
    if is_rank_zero():
        print(message, flush=True)


def note(message: str) -> None:
    """Something the user should know that changes nothing they asked for (or says why it had to)."""
    info(f"note: {message}")


def error(message: str) -> None:
    print(f"smoe: error: {message}", file=sys.stderr, flush=True)
