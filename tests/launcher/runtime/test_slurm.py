"""The sbatch scripts on a real one-node Slurm (tests/slurm_cluster.py): the CPU script's two
ranks with experts sharded over both, preempted by SIGUSR1, requeued by the script and
resumed with no step lost or repeated; the rendezvous helpers; shellcheck on every script."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from smoe.launcher.runtime.distributed import free_port

from runs import REPO, SMALL, scalars

SLURM_DIR = REPO / "slurm"
STEPS = 600


def wait_for_line(log: Path, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text()) if log.exists() else None
        if found:
            return found.group(0)
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} in {log} after {timeout} s:\n"
                         f"{log.read_text()[-3000:] if log.exists() else '(no log)'}")


def test_two_task_job_runs_both_ranks(slurm, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks=2\n"
                      f"srun bash -c 'echo $SLURM_PROCID > {tmp_path}/rank-$SLURM_PROCID'\n")
    job_id = slurm.sbatch(script)
    assert slurm.wait(job_id, timeout=60) == "COMPLETED"
    assert sorted(p.read_text().strip() for p in tmp_path.glob("rank-*")) == ["0", "1"]


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm, corpus, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm.sbatch(SLURM_DIR / "cpu.sbatch", "--data-file", corpus, "--out", out, *SMALL, f"max_steps={STEPS}",
                       "ep_size=2", "save_every=1000", "eval_every=1000", "eval_ks=1,4",
                       options=[f"--output={log}"],
                       env={"SMOE_SLURM_DIR": str(SLURM_DIR), "MASTER_PORT": str(free_port())})
    wait_for_line(log, r"step 5/", timeout=120)
    slurm.signal(job, "USR1")  # what --signal=USR1@60 sends before the time limit
    assert slurm.wait(job, timeout=300) == "COMPLETED", slurm.logs()[-3000:]

    text = log.read_text()
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+): checkpoint step0*\1 saved", text).group(1))
    assert 5 <= stopped < STEPS
    assert f"requeueing job {job} (restart 1)" in text
    assert f"resumed {out} at step {stopped}" in text
    assert slurm.job(job)["Restarts"] == "1"
    assert text.count("2 rank(s), ep_size 2") == 2  # both runs of the job trained on both ranks
    # every step logged exactly once over the two runs of the job
    logged = [int(step) for step in re.findall(r"^step (\d+)/\d+ \|", text, flags=re.MULTILINE)]
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert sorted(scalars(out, "train/loss")) == list(range(1, STEPS + 1))
    final = out / "checkpoints" / f"step{STEPS:06d}"
    assert sorted(p.name for p in final.glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]
    assert len(list(final.glob("layer_*_expert_*"))) == 2 * 4
    assert (out / "eval.json").is_file()


def test_an_upcycled_llama_trains_as_a_slurm_job_with_experts_over_both_ranks(slurm, books, llama_dirs, tmp_path):
    """The same script trains a causal LM: `--init` and the text instead of the byte file."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm.sbatch(SLURM_DIR / "cpu.sbatch", "--init", llama_dirs / "upcycled", "--data-files", books,
                       "--out", out, "block_size=16", "batch_size=4", "eval_batch_size=4", "max_steps=4",
                       "eval_every=100", "eval_segments=1", "dispatch=sorted", "ep_size=2",
                       options=[f"--output={log}"],
                       env={"SMOE_SLURM_DIR": str(SLURM_DIR), "MASTER_PORT": str(free_port())})
    assert slurm.wait(job, timeout=300) == "COMPLETED", log.read_text()[-3000:] if log.exists() else slurm.logs()
    assert "training smoe-dropout (causal-lm)" in log.read_text() and "2 rank(s), ep_size 2" in log.read_text()
    assert len(list((out / "checkpoints" / "step000004").glob("layer_*_expert_*"))) == 2 * 4
    assert (out / "eval.json").is_file() and (out / "pruned.json").is_file()


def test_slurm_expands_the_first_host(slurm, monkeypatch):
    from smoe.launcher.runtime.slurm import first_host

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    assert first_host("gpu[07-09,11],cpu1") == "gpu07"


def test_multinode_rendezvous_and_hostfile_from_slurm_variables(slurm, tmp_path, monkeypatch):
    """common.sh as the multi-node script uses it, for a 3-node allocation: the same master and port
    as srun tasks find (launcher/slurm.py), the port below Linux's ephemeral range (32768-60999)."""
    from smoe.launcher.runtime.slurm import rank_env

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    hostfile, nodes = tmp_path / "hostfile", "node[09-10],gpu-a"
    script = (f"source {SLURM_DIR / 'common.sh'}; smoe_write_hostfile {hostfile} 8; "
              "echo $MASTER_ADDR:$MASTER_PORT")
    for job_id, port in [("31337", 21337), ("19999", 29999), ("20000", 10000)]:
        env = {**slurm.env, "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodes}
        result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
        task = rank_env({"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                         "SLURM_STEP_NUM_TASKS": "24", "SLURM_STEP_NODELIST": nodes})
        assert result.stdout.strip() == f"{task['MASTER_ADDR']}:{task['MASTER_PORT']}" == f"node09:{port}"
    assert hostfile.read_text() == "node09 slots=8\nnode10 slots=8\ngpu-a slots=8\n"


def test_multinode_deepspeed_launcher_is_one_task_per_node_with_its_cpus(slurm, tmp_path):
    """LAUNCHER=deepspeed: one srun task per node holds the CPUs of the node's ranks (here 2 GPUs x 1 CPU).
    A stand-in `deepspeed` prints what it got; the local node has no GPUs, so none are asked for."""
    fake = tmp_path / "bin" / "deepspeed"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "task $SLURM_PROCID of $SLURM_STEP_NUM_TASKS, $SLURM_CPUS_PER_TASK CPUs: $*"\n')
    fake.chmod(0o755)
    log = tmp_path / "job.out"
    job = slurm.sbatch(SLURM_DIR / "multinode.sbatch", "--out", "runs/big",
                       options=[f"--output={log}", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                                "--gpus-per-node=0"],
                       env={"LAUNCHER": "deepspeed", "GPUS_PER_NODE": "2", "SMOE_SLURM_DIR": str(SLURM_DIR),
                            "PATH": f"{fake.parent}:{slurm.env['PATH']}"})
    assert slurm.wait(job, timeout=60) == "COMPLETED", log.read_text()
    hostfile = slurm.root / f"hostfile-{job}"
    assert log.read_text().splitlines() == [
        f"task 0 of 1, 2 CPUs: --no_ssh --node_rank=0 --hostfile={hostfile} --num_gpus=2 --master_addr={slurm.host} "
        f"--master_port={10000 + int(job) % 20000} --module smoe.launcher.cli train --auto-resume "
        "ds_config=multinode-bf16 ep_size=8 --out runs/big"]
    assert hostfile.read_text() == f"{slurm.host} slots=2\n"


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM_DIR.glob("*.sbatch")) + ["common.sh"])
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", SLURM_DIR / script], check=True)
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed: apt-get install shellcheck")
    result = subprocess.run(["shellcheck", "-x", "-s", "bash", f"slurm/{script}"], cwd=SLURM_DIR.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
