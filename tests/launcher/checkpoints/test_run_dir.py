"""One writer per run directory: a second `smoe train` on the same --out (a requeue racing a slow
shutdown, enter pressed twice) is refused at once, on every rank, and changes nothing; a writer
killed with SIGKILL leaves no lock behind. Real processes, real flock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from smoe.launcher.runtime.distributed import free_port

from runs import CPU_ENV, SMALL, run, smoe

LONG = [*SMALL, "max_steps=100000", "save_every=100000", "eval_every=100000"]


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def start_writer(out, corpus, log):
    command = [sys.executable, "-m", "smoe.launcher.cli", "train", "--preset", "tiny", "--data-file", corpus,
               "--out", out, *LONG]
    writer = subprocess.Popen(list(map(str, command)), stdout=log.open("w"), stderr=subprocess.STDOUT,
                              env={**os.environ, **CPU_ENV})
    deadline = time.monotonic() + 120
    while "step 2/" not in log.read_text():
        assert writer.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return writer


def test_a_second_writer_is_refused_on_every_rank_and_changes_nothing(corpus, tmp_path):
    out, log = tmp_path / "run", tmp_path / "writer.log"
    writer = start_writer(out, corpus, log)
    try:
        writer.send_signal(signal.SIGSTOP)  # holds the lock, writes nothing meanwhile
        before = snapshot(out)
        second = smoe("train", "--preset", "tiny", "--data-file", corpus, "--out", out, *LONG, "--auto-resume",
                      check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        message = second.stderr.strip().splitlines()[-1]
        assert f"{out} is being written by another `smoe train` (host " in message
        assert f"pid {writer.pid}," in message and "nothing was changed" in message
        assert "Traceback" not in second.stderr
        # Two ranks started by DeepSpeed's launcher: both stop (none left waiting in a collective).
        two = run(["deepspeed", "--num_gpus", 2, "--master_port", free_port(), "--module", "smoe.launcher.cli",
                   "train", "--preset", "tiny", "--data-file", corpus, "--out", out, *LONG, "--auto-resume"],
                  check=False, timeout=300)
        assert two.returncode != 0 and "is being written by another" in two.stdout + two.stderr
        assert snapshot(out) == before
    finally:
        writer.send_signal(signal.SIGCONT)
        writer.send_signal(signal.SIGTERM)  # checkpoints and exits 75, as under Slurm
        assert writer.wait(timeout=120) == 75, log.read_text()[-3000:]


def test_a_writer_killed_with_sigkill_leaves_no_lock(corpus, tmp_path):
    out, log = tmp_path / "run", tmp_path / "writer.log"
    writer = start_writer(out, corpus, log)
    writer.kill()
    writer.wait(timeout=60)
    assert (out / ".lock").read_text().startswith("host ")  # the file stays; the lock went with the process
    smoe("train", "--preset", "tiny", "--data-file", corpus, "--out", out, *SMALL, "max_steps=4", "--auto-resume")
    assert (out / "eval.json").is_file()
