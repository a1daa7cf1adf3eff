"""The one-GPU check (scripts/gpu-check.sh) in its CPU mode, end to end: every part runs at tiny
sizes (gloo for NCCL) and passes, and the output folder holds the few files a lent device sends
back; a part past its own time limit fails alone and the next part still runs."""

import json
import os
import re
import shutil
import subprocess

import pytest

from runs import REPO

SCRIPT = REPO / "scripts" / "gpu-check.sh"


def check(*args, out) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("OUT", "WHEELS", "GPU_CHECK_DEVICE")}
    return subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(out), *args], capture_output=True, text=True,
                          env=env, timeout=400)


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    result = check(out=out)
    return result, out


def test_every_part_passes_in_cpu_mode(cpu_check):
    result, out = cpu_check
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    status = {part["part"]: part["status"] for part in report["parts"]}
    assert status == {"environment": "pass", "ep-exchange": "pass", "train-eval": "pass", "export-infer": "pass",
                      "layer-bench": "pass", "gpu-tests": "skip", "step-bench": "pass"}  # tests/gpu skips without CUDA
    figures = {part["part"]: part["figures"] for part in report["parts"]}
    assert figures["ep-exchange"]["backend"] == "gloo"
    assert figures["ep-exchange"]["max_relative_error_float32"] <= 1e-5
    assert set(figures["train-eval"]["auto_choices"]) == {"1", "2", "3", "4"}
    assert figures["export-infer"]["bare"]["imported"] == []
    assert figures["export-infer"]["infer"]["choice"]["k"] in (1, 4)
    assert figures["gpu-tests"]["tests"]["passed"] == figures["gpu-tests"]["tests"]["failed"] == 0
    table = result.stdout[result.stdout.index("## smoe one-GPU check"):]  # the table comes last
    assert table.strip().endswith(f"(written to {out}/gpu-check.md)")
    assert re.search(r"\*\*PASS\*\*: 6 passed, 0 failed, 1 skipped", table)
    assert (out / "gpu-check.md").read_text() in table


def test_the_output_folder_comes_back_whole_from_a_device(cpu_check):
    """A lent device returns at most 8 files, none more than 2 folders down, named in [A-Za-z0-9._-]."""
    _, out = cpu_check
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["gpu-check.json", "gpu-check.log", "gpu-check.md", "layer-bench.json", "layer-bench.md"]
    bench = json.loads((out / "layer-bench.json").read_text())
    rows = {(r["method"], r["dispatch"], r["k"]) for r in bench["records"]}
    assert rows == {(method, "auto", k) for method in ("dense", "deepspeed", "smoe") for k in (1, 2, 4)} | {
        ("smoe", path, k) for path in ("sorted", "grouped", "masked-dense") for k in (1, 2, 4)}
    assert all(r["tokens_per_s"] > 0 for r in bench["records"])
    assert "| tiny | 4 | smoe | grouped |" in (out / "layer-bench.md").read_text()


def test_a_part_past_its_limit_fails_alone(tmp_path):
    result = check("--only", "ep-exchange,gpu-tests", "--limit", "ep-exchange=2", out=tmp_path)
    assert result.returncode == 1
    parts = {part["part"]: part for part in json.loads((tmp_path / "gpu-check.json").read_text())["parts"]}
    assert parts["ep-exchange"]["status"] == "fail"
    assert parts["ep-exchange"]["headline"].startswith("stopped at its time limit (2 s)")
    assert parts["gpu-tests"]["status"] == "skip"  # it ran after: its tests all skip without CUDA
    assert "failed: ep-exchange" in (tmp_path / "gpu-check.md").read_text()


def test_bad_options_are_refused_in_one_line(tmp_path):
    result = check("--only", "train,export", out=tmp_path)
    assert result.returncode == 2
    assert "--only: unknown part(s) export, train; the parts are install, environment" in result.stderr
    assert "Traceback" not in result.stderr
    missing = check("--wheels", str(tmp_path / "none"), out=tmp_path)
    assert missing.returncode == 2 and "bash scripts/gpu-wheels.sh" in missing.stderr


def test_the_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    result = check("--dry-run", out=tmp_path / "out")
    assert result.returncode == 0
    assert [line.split()[0] for line in result.stdout.splitlines()[1:-1]] == [
        "environment", "ep-exchange", "train-eval", "export-infer", "layer-bench", "step-bench", "gpu-tests"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["gpu-check.sh", "gpu-wheels.sh"])
def test_the_scripts_pass_shellcheck(script):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed: apt-get install shellcheck")
    result = subprocess.run(["shellcheck", "-s", "bash", str(REPO / "scripts" / script)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout
