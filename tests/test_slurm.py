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

from smoe.launcher.distributed import free_port

from runs import SMALL, scalars

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
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


def test_slurm_expands_the_first_host(slurm, monkeypatch):
    from smoe.launcher.slurm import first_host

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    assert first_host("gpu[07-09,11],cpu1") == "gpu07"


def test_multinode_rendezvous_and_hostfile_from_slurm_variables(slurm, tmp_path):
    """common.sh as the multi-node script uses it, for a 3-node allocation."""
    hostfile = tmp_path / "hostfile"
    script = (f"source {SLURM_DIR / 'common.sh'}; smoe_write_hostfile {hostfile} 8; "
              "echo $MASTER_ADDR:$MASTER_PORT")
    env = {**slurm.env, "SLURM_JOB_ID": "31337", "SLURM_JOB_NODELIST": "node[09-10],gpu-a"}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"node09:{20000 + 31337 % 20000}"
    assert hostfile.read_text() == "node09 slots=8\nnode10 slots=8\ngpu-a slots=8\n"


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM_DIR.glob("*.sbatch")) + ["common.sh"])
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", SLURM_DIR / script], check=True)
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed: apt-get install shellcheck")
    result = subprocess.run(["shellcheck", "-x", "-s", "bash", f"slurm/{script}"], cwd=SLURM_DIR.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
