"""Launch paths, each for real on CPU ranks: DeepSpeed's launcher, Open MPI's mpirun, and
the Slurm rank mapping (the real one-node Slurm runs are in test_slurm.py)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from smoe.launcher.runtime.distributed import free_port
from smoe.launcher.runtime.slurm import in_slurm_step, rank_env

from runs import SMALL, run, smoe

TWO_RANKS = [*SMALL, "max_steps=4", "ep_size=2", "eval_ks=1,4"]


def check_two_expert_parallel_ranks(out, stdout: str) -> None:
    assert "2 rank(s), ep_size 2" in stdout
    tag = (out / "checkpoints" / "latest").read_text()
    assert len(list((out / "checkpoints" / tag).glob("layer_*_expert_*"))) == 2 * 4  # 2 layers x 4 experts
    assert sorted(p.name for p in (out / "checkpoints" / tag).glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]


def deepspeed_shared_memory() -> set[str]:
    """The names in /dev/shm that DeepSpeed made: its CPU all-reduce names each rank's buffer
    ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (``ops/csrc/cpu/comm/shm.cpp``)."""
    return {path.name for path in Path("/dev/shm").iterdir() if path.name.startswith("deepspeed")}


def shared_memory_left_behind(before: set[str], grace_s: float = 30.0) -> set[str]:
    """DeepSpeed's names that appeared since ``before`` and stay. Other runs on the machine make
    such names too, and while they run one may be there; each rank of such a run removes its own
    seconds after making it (once every rank has mapped it), so a name that stays through
    ``grace_s`` is one nobody will remove."""
    deadline = time.monotonic() + grace_s
    staying = deepspeed_shared_memory() - before
    while staying and time.monotonic() < deadline:
        time.sleep(0.5)
        staying &= deepspeed_shared_memory()
    return staying


def test_deepspeed_launcher_bf16_zero2_with_gradient_accumulation(corpus, tmp_path):
    """The multi-node template's settings (bf16, ZeRO stage 2) with experts on 2 ranks and
    2 micro-batches per step: 32 = micro 8 x 2 x 2 ranks, as its JSON asks."""
    out, shared_memory_before = tmp_path / "ep2", deepspeed_shared_memory()
    result = run(["deepspeed", "--num_gpus", "2", "--master_port", free_port(), "--module", "smoe.launcher.cli",
                  "train", "--out", out, "--data-file", corpus, *TWO_RANKS, "ds_config=multinode-bf16",
                  "batch_size=32", "grad_accum=2"])
    check_two_expert_parallel_ranks(out, result.stdout)
    # DeepSpeed's CPU all-reduce buffers (66 MB of RAM per rank) are gone with the ranks.
    assert not shared_memory_left_behind(shared_memory_before)
    assert sorted(p.name for p in (out / "checkpoints" / "step000004").glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # experts are loaded by global id: the 2-rank run evaluates the same on one process
    rows = json.loads((out / "eval.json").read_text())["rows"]
    smoe("eval", out, "--k", "1,4", "--json", tmp_path / "one.json")
    single = json.loads((tmp_path / "one.json").read_text())["rows"]
    for a, b in zip(rows, single):
        assert a["valid_bpc"] == pytest.approx(b["valid_bpc"], abs=2e-2)  # bf16 sums in another order


@pytest.mark.skipif(not shutil.which("mpirun"), reason="needs Open MPI: apt-get install openmpi-bin libopenmpi-dev")
def test_mpirun_ranks_found_through_mpi4py(corpus, tmp_path):
    pytest.importorskip("mpi4py", reason="needs mpi4py: pip install mpi4py")
    out = tmp_path / "mpi"
    result = run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "DS_ACCELERATOR",
                  "-x", "OMP_NUM_THREADS", "-x", f"MASTER_PORT={free_port()}", sys.executable, "-m",
                  "smoe.launcher.cli", "train", "--out", out, "--data-file", corpus, *TWO_RANKS])
    check_two_expert_parallel_ranks(out, result.stdout)


# --- Slurm task -> rank mapping -----------------------------------------------------------------

def step_env(**values) -> dict[str, str]:
    """An srun task's variables: task 13 of 16, the sixth on the second of two 8-GPU nodes."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "13", "SLURM_LOCALID": "5",
           "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    return {**env, **values}


def test_slurm_task_variables_map_to_torch_ranks():
    hosts = {"gpu[07-08]": "gpu07", "a100-[3,5]": "a100-3"}
    env = rank_env(step_env(), hosts.get)
    assert env == {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(10000 + 4242)}
    uneven = rank_env(step_env(SLURM_PROCID="16", SLURM_LOCALID="0", SLURM_NODEID="2", SLURM_STEP_NUM_TASKS="20",
                               SLURM_STEP_TASKS_PER_NODE="8(x2),4", SLURM_STEP_NODELIST="a100-[3,5]"), hosts.get)
    assert (uneven["LOCAL_WORLD_SIZE"], uneven["MASTER_ADDR"], uneven["WORLD_SIZE"]) == ("4", "a100-3", "20")
    pinned = rank_env(step_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="6000"), hosts.get)
    assert (pinned["MASTER_ADDR"], pinned["MASTER_PORT"]) == ("10.0.0.1", "6000")


@pytest.mark.parametrize("visible, local_id, local_rank", [
    ("3", "3", "0"),  # srun --gpus-per-task=1: the fourth task sees its one GPU as device 0
    ("0,1,2,3,4,5,6,7", "5", "5"),  # every task sees the node's GPUs
    ("2,3", "3", "1"),  # two per task
    ("GPU-5e2f7a4c", "6", "0"),  # bound by UUID
    (None, "5", "5"),  # unset: all the node's GPUs
    ("", "5", "5"), ("-1", "5", "5"),  # none: a CPU run
])
def test_slurm_local_rank_indexes_the_gpus_the_task_sees(visible, local_id, local_rank):
    """DeepSpeed calls set_device(LOCAL_RANK), an index into this task's CUDA_VISIBLE_DEVICES."""
    devices = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    env = rank_env(step_env(SLURM_LOCALID=local_id, **devices), {"gpu[07-08]": "gpu07"}.get)
    assert env["LOCAL_RANK"] == local_rank


def test_the_batch_shell_is_not_a_rank():
    batch_shell = {k: v for k, v in step_env().items() if not k.startswith("SLURM_STEP")}
    assert in_slurm_step(step_env()) and not in_slurm_step(batch_shell)
    with pytest.raises(ValueError, match="srun smoe train"):
        rank_env(batch_shell)
