"""The learning rate of a run by optimizer step."""

from __future__ import annotations

import math

from smoe.launcher.config import TrainConfig


def lr_multiplier(config: TrainConfig):
    """lr multiplier by step: linear warm-up, then cosine or linear decay to ``lr_min`` at ``max_steps``."""
    floor = config.lr_min / config.lr if config.lr else 0.0

    def multiplier(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min((step - config.warmup_steps) / max(config.max_steps - config.warmup_steps, 1), 1.0)
        remaining = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_decay == "cosine" else 1 - progress
        return floor + (1 - floor) * remaining

    return multiplier
