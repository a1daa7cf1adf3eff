"""The learning rate of a run by optimizer step."""

from __future__ import annotations

import math

from smoe.launcher.config import TrainConfig


def lr_multiplier(config: TrainConfig):
    """lr multiplier by step: linear warm-up, then cosine or linear decay to ``lr_min`` at ``max_steps``.

    Planned like the k schedule (:meth:`TrainConfig.step_plan`): a resume that changed
    ``max_steps`` stretches what was left of the warm-up and decay onto the steps left."""
    floor = config.lr_min / config.lr if config.lr else 0.0
    plan = config.step_plan()
    decay_steps = max(plan.planned_steps - config.warmup_steps, 1)

    def multiplier(step: int) -> float:
        planned = plan(step)
        if planned < config.warmup_steps:
            return (planned + 1) / config.warmup_steps
        progress = min((planned - config.warmup_steps) / decay_steps, 1.0)
        remaining = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_decay == "cosine" else 1 - progress
        return floor + (1 - floor) * remaining

    return multiplier
