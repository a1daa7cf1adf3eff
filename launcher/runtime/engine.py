"""The DeepSpeed engine, one way for every command: training, fine-tuning and evaluation.

Parallelism is applied from outside the model: the process group and DeepSpeed's
expert-parallel groups exist before the model is built, so each MoE layer is built
holding this rank's experts, and ``deepspeed.initialize`` wraps the result here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from smoe.launcher.config import TrainConfig
from smoe.launcher.runtime import deepspeed_config
from smoe.model.feedforward import get_method


def engine_config(config: TrainConfig, world_size: int, tensorboard_dir: Path | None, training: bool = True) -> dict:
    """A run's DeepSpeed JSON (``config.ds_config``) filled in for its batch, clip and monitor."""
    return deepspeed_config.engine_json(config.ds_config, config.batch_size, config.grad_accum, world_size,
                                        clip=config.clip, has_experts=not get_method(config.method).dense,
                                        tensorboard_dir=tensorboard_dir, training=training)


def build_engine(model: torch.nn.Module, ds: dict, param_groups: list[dict] | None = None,
                 lr_multiplier: Callable[[int], float] | None = None, weight_decay: float = 0.0):
    """``deepspeed.initialize`` of ``model`` on ``ds``.

    With ``param_groups`` (DeepSpeed's MoE split of the trainable parameters, each group with
    its lr: :func:`smoe.model.optimizer_param_groups`), AdamW over them and a LambdaLR of
    ``lr_multiplier`` by step; without, an engine for evaluation (no optimizer)."""
    import deepspeed

    if param_groups is None:
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        return engine
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier or (lambda step: 1.0))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine
