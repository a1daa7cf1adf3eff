"""Slurm tasks as torch.distributed ranks: ``srun smoe train ...`` with one task per GPU.

srun starts every task itself, so there is no launcher to set ``RANK`` and friends;
each task derives them from the ``SLURM_*`` variables of its job step. All tasks must
agree on the rendezvous without talking: the first host of the step's node list is
the master, and the port comes from the job id unless ``MASTER_PORT`` is set. The port
is kept in 10000-29999, below Linux's ephemeral range (32768-60999 by default,
``/proc/sys/net/ipv4/ip_local_port_range``), where an outgoing connection could hold it.

``LOCAL_RANK`` is the GPU the rank uses (DeepSpeed calls ``set_device(LOCAL_RANK)``), so
it must index the devices *this task* sees, not the node's: with ``srun --gpus-per-task=1``
or a site's GPU binding, Slurm narrows ``CUDA_VISIBLE_DEVICES`` per task and task 5 sees
one device, number 0. ``SLURM_LOCALID`` is kept while it is below the number of devices
the task sees (all of the node's when the variable is unset), and taken modulo it otherwise.
(Multi-node jobs that use DeepSpeed's own launcher instead, one srun task per node,
are in ``slurm/multinode.sbatch``.)
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable, Mapping

# Variables that only exist inside an srun job step, not in the batch script's shell.
STEP_VARIABLES = ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")


def in_slurm_step(env: Mapping[str, str]) -> bool:
    return all(name in env for name in STEP_VARIABLES)


def first_host(nodelist: str) -> str:
    """The first name of a Slurm host list (``gpu[07-09],cpu1`` -> ``gpu07``), expanded by Slurm itself."""
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def rank_env(env: Mapping[str, str], resolve_first_host: Callable[[str], str] = first_host) -> dict[str, str]:
    """The launcher variables for this srun task: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT (values already in ``env`` win for the last two)."""
    missing = [name for name in STEP_VARIABLES if name not in env]
    if missing:
        raise ValueError(f"not inside an srun job step ({', '.join(missing)} unset): start the ranks with "
                         "`srun smoe train ...` from the batch script")
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"])
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": _local_rank(int(env["SLURM_LOCALID"]), env.get("CUDA_VISIBLE_DEVICES")),
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_WORLD_SIZE": _tasks_on_this_node(tasks_per_node, int(env.get("SLURM_NODEID", 0))),
        "MASTER_ADDR": env.get("MASTER_ADDR") or resolve_first_host(env["SLURM_STEP_NODELIST"]),
        "MASTER_PORT": env.get("MASTER_PORT") or str(10000 + int(env.get("SLURM_JOB_ID", 0)) % 20000),
    }


def _tasks_on_this_node(tasks_per_node: str, node_id: int) -> str:
    """Slurm's compressed per-node counts: ``"8(x2),4"`` means 8, 8, 4."""
    counts = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [count] * int(repeat.rstrip(")") or 1)
    return counts[node_id]


def _local_rank(local_id: int, visible_devices: str | None) -> str:
    """This task's index into the GPUs it can see (``local_id`` itself when it sees them all).
    CUDA stops at the first invalid entry, so ``""`` or ``"-1"`` is none: a CPU run, id kept."""
    devices = (visible_devices or "").split(",")
    visible = len(list(itertools.takewhile(lambda device: device.strip() not in ("", "-1"), devices)))
    return str(local_id % visible if visible else local_id)
