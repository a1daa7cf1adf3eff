"""What the export tests share: the bare environment that loads the exports as a deployment would."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory) -> Path:
    """A fresh virtual environment with torch, transformers and safetensors only, the versions
    installed here, from the local wheels and package index. Its python runs isolated (``-I``), so
    that no PYTHONPATH can bring smoe in."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pins = [f"{name}=={version(name)}" for name in ("torch", "transformers", "safetensors")]
    result = subprocess.run([str(python), "-I", "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return python
