"""The layout of a run directory, shared by `smoe train`, `smoe eval` and the benchmarks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    def load_config(self) -> TrainConfig:
        if not self.config.is_file():
            raise ValueError(f"{self.root} is not a run directory (no config.json): pass the --out of a `smoe train` run")
        return TrainConfig.from_dict(json.loads(self.config.read_text()))
