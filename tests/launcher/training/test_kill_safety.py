"""Kills at any moment: a training run SIGKILLed at random points, during steps and during saves,
several times in a row, and resumed each time (``--auto-resume``, as a requeued job does), ends
with exactly the losses and BPC of the uninterrupted run. One process, and two ranks with
ep_size 2 started by DeepSpeed's launcher (the whole process group is killed)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from smoe.launcher.runtime.distributed import free_port

from runs import CPU_ENV, SMALL, scalars

STEPS = 24
SAVE_EVERY = 3
RUN = [*SMALL, f"max_steps={STEPS}", f"save_every={SAVE_EVERY}", "eval_every=1000", "eval_ks=1,4"]


def command(out, corpus, ranks: int) -> list[str]:
    train = ["train", "--preset", "tiny", "--data-file", corpus, "--out", out, *RUN, f"ep_size={ranks}",
             "--auto-resume"]
    if ranks == 1:
        return list(map(str, [sys.executable, "-m", "smoe.launcher.cli", *train]))
    return list(map(str, ["deepspeed", "--num_gpus", ranks, "--master_port", free_port(), "--module",
                          "smoe.launcher.cli", *train]))


def last_logged_step(log) -> int:
    steps = [int(line.split()[1].split("/")[0]) for line in log.read_text().splitlines() if line.startswith("step ")
             and "/" in line.split()[1]]
    return max(steps, default=0)


def checkpoint_dirs(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("step*")}


def saving(out, before: dict[str, int]) -> bool:
    """A save is being written: a checkpoint directory newer than the one `latest` names that
    appeared (or changed) since ``before`` (what earlier, killed runs left is not a save)."""
    checkpoints = out / "checkpoints"
    latest = (checkpoints / "latest").read_text() if (checkpoints / "latest").is_file() else ""
    return any(name > latest and before.get(name) != mtime for name, mtime in checkpoint_dirs(out).items())


def run_and_kill(cmd, out, log, when: str, after_step: int) -> str:
    """Start the run; SIGKILL its process group once it has logged ``after_step`` and then either
    in the middle of a step (``step``) or as soon as a save is being written (``save``).
    Returns what the kill hit, or "finished" when the run ended first."""
    before = checkpoint_dirs(out) if (out / "checkpoints").is_dir() else {}
    process = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **CPU_ENV})
    deadline = time.monotonic() + 240
    try:
        while process.poll() is None and last_logged_step(log) < after_step:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        if when == "step":  # just after a step that is not followed by a save: inside the next step
            while process.poll() is None and last_logged_step(log) % SAVE_EVERY != 1:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.002)
        else:
            while process.poll() is None and not saving(out, before):
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.002)
        hit = "finished" if process.poll() is not None else ("a save" if saving(out, before) else "a step")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    return hit


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_run(corpus, tmp_path, ranks):
    random.seed(1234 + ranks)
    straight = tmp_path / "straight"
    reference = subprocess.run(command(straight, corpus, ranks), capture_output=True, text=True,
                               env={**os.environ, **CPU_ENV}, timeout=300)
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-3000:]

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    hits = []
    for when in ("step", "save", "save", "step"):
        after = max(last_logged_step(log) if log.exists() else 0, 1) + random.randint(0, 4)
        hits.append(run_and_kill(command(out, corpus, ranks), out, log, when, min(after, STEPS - 2)))
    finished = subprocess.run(command(out, corpus, ranks), capture_output=True, text=True,
                              env={**os.environ, **CPU_ENV}, timeout=300)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert "a save" in hits and "a step" in hits, hits  # both kinds of moment were hit

    expected, got = scalars(straight, "train/loss"), scalars(out, "train/loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # the last value logged for every step, after all the restarts
    assert json.loads((out / "eval.json").read_text())["rows"] == json.loads((straight / "eval.json").read_text())["rows"]
