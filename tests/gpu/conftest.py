"""The GPU tier: real CUDA runs of `smoe train` / `smoe eval` and of the layer, on one GPU.

Run it with ``bash scripts/gpu-check.sh`` (the one-GPU check: these tests are its gpu-tests
part, after the exchange, train/eval, export and benchmark parts; docs/gpus.md) or
``python -m pytest tests/gpu -rA``. Every test here is marked ``gpu``
(``-m "not gpu"`` leaves them out) and skipped with a reason where CUDA is not available,
so the CPU suite collects them and reports them skipped in no time.

tests/conftest.py sets ``DS_ACCELERATOR=cpu`` when it is unset: the CPU suite needs it, the
GPU tier must not inherit it. So the `smoe` subprocesses started here get ``DS_ACCELERATOR=cuda``
explicitly (:func:`gpu_env`), and the in-process tests use explicit ``cuda`` devices and never
DeepSpeed's accelerator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parent
NO_CUDA = ("no CUDA GPU (torch.cuda.is_available() is False): the GPU tier needs a CUDA build of torch "
           "and a GPU; run it with `bash scripts/gpu-check.sh`")
NO_BF16 = "bf16 needs compute capability 8.0 or later (A100, A6000, H100); this GPU runs the fp16 tests only"
TIMEOUT = 300  # seconds for one `smoe` subprocess; the small runs take 10-30 s on a GPU


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/gpu, run by scripts/gpu-check.sh); "
                                       "skipped where torch.cuda.is_available() is False")


@pytest.hookimpl(tryfirst=True)  # before `-m` selection reads the markers
def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


# --- subprocesses ------------------------------------------------------------------------------

# A launcher's variables, if this pytest was itself started by one: a plain `smoe train` is a group
# of one on a free port of its own (concurrent runs must not share MASTER_PORT).
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def gpu_env(**extra) -> dict[str, str]:
    """This process's environment for a `smoe` run on the GPU: DeepSpeed's CUDA accelerator
    (whatever tests/conftest.py defaulted), no launcher variables, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    return {**env, "DS_ACCELERATOR": "cuda", **{key: str(value) for key, value in extra.items()}}


def cpu_env(**extra) -> dict[str, str]:
    """A `smoe` run that sees no GPU at all: a GPU checkpoint evaluated on a CPU machine."""
    return gpu_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", **extra)


def run_smoe(*args, env: dict | None = None, check: bool = True, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m smoe.launcher.cli ARGS`` (on the GPU unless ``env`` says otherwise)."""
    command = [sys.executable, "-m", "smoe.launcher.cli", *map(str, args)]
    result = subprocess.run(command, env=env if env is not None else gpu_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_many(jobs: dict, workers: int | None = None, timeout: int = TIMEOUT) -> dict:
    """``{name: (args, kwargs)}`` as concurrent `smoe` processes (``kwargs``: ``env``); returns
    ``{name: CompletedProcess}``, or the TimeoutExpired of a run that took too long. Start-up
    (imports, CUDA context) dominates these small runs, so a few at a time on their own cores take
    about the time of one. An interrupt (Ctrl-C, gpu-check.sh's time limit) kills them all."""
    workers = workers or max(2, min(len(jobs), (os.cpu_count() or 2) // 2, 8))
    pending, running, results = list(jobs.items()), {}, {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                name, (args, kwargs) = pending.pop(0)
                command = [sys.executable, "-m", "smoe.launcher.cli", *map(str, args)]
                out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
                process = subprocess.Popen(command, env=kwargs.get("env") or gpu_env(), stdout=out, stderr=err,
                                           text=True)
                running[name] = (process, time.monotonic() + timeout, command, out, err)
            for name, (process, deadline, command, out, err) in list(running.items()):
                if process.poll() is None and time.monotonic() < deadline:
                    continue
                if process.poll() is None:
                    process.kill()
                    process.wait()
                    results[name] = subprocess.TimeoutExpired(command, timeout)
                else:
                    out.seek(0), err.seek(0)
                    results[name] = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
                out.close(), err.close()
                del running[name]
            time.sleep(0.1)
    finally:
        for process, *_ in running.values():
            process.kill()
            process.wait()
    return results


def checked(result, what: str = "smoe") -> subprocess.CompletedProcess:
    """A :func:`run_many` result that must have succeeded: the process, else an error with its output."""
    if isinstance(result, Exception):
        raise AssertionError(f"{what}: {result!r}")
    if result.returncode != 0:
        raise AssertionError(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session")
def smoe_gpu() -> SimpleNamespace:
    """What the tests use (test modules cannot import this conftest): ``run(*args, env=None,
    check=True)``, the `smoe` command on the GPU; ``run_many(jobs)``, concurrent runs, and
    ``checked(result, what)`` for each of them; ``env(**extra)`` and ``cpu_env(**extra)`` for
    subprocesses; ``bf16``, whether this GPU has it (``no_bf16``: the skip reason)."""
    return SimpleNamespace(run=run_smoe, run_many=run_many, checked=checked, env=gpu_env, cpu_env=cpu_env,
                           bf16=bf16_supported(), no_bf16=NO_BF16)


# --- configs and capabilities ------------------------------------------------------------------

@pytest.fixture(scope="session")
def bf16_config(tmp_path_factory) -> Path:
    """A one-GPU bf16 DeepSpeed JSON without batch keys (the run's batch_size fills them)."""
    path = tmp_path_factory.mktemp("ds") / "bf16.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
                                "steps_per_print": 1_000_000, "wall_clock_breakdown": False}))
    return path


def bf16_supported() -> bool:
    """Native bf16 (compute capability 8.0+); a V100 (7.0) has fp16 only."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.fixture(scope="session")
def low_precision() -> torch.dtype:
    """The training dtype this GPU has: bf16 where it is native, else fp16."""
    return torch.bfloat16 if bf16_supported() else torch.float16
