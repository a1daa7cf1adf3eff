"""From a TrainConfig to the running pieces: process group, model, DeepSpeed engine.

Parallelism is applied here, from outside the model: the process group and DeepSpeed's
expert-parallel groups exist before the model is built, so each MoE layer is built
holding this rank's experts, and ``deepspeed.initialize`` wraps the result.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from smoe.model.feedforward import feedforward_factory
from smoe.model.parallel import init_expert_parallel, optimizer_param_groups
from smoe.model.transformer_xl import TransformerXL

from .config import TrainConfig
from .distributed import ds_config, free_port


def init_distributed() -> tuple[int, int]:
    """Join the job's process group (from the deepspeed launcher, torchrun, srun or mpirun
    environment), or make a group of one for a plain ``smoe train``. Returns (rank, world)."""
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        launched = "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ
        if not launched:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def build_model(config: TrainConfig, rank: int = 0) -> TransformerXL:
    ep_rank = init_expert_parallel(config.ep_size)
    return TransformerXL(config.model_config(), feedforward_factory(config.feedforward_spec(), ep_rank, rank))


def engine_config(config: TrainConfig, world_size: int, tensorboard_dir: Path | None) -> dict:
    """The DeepSpeed JSON config named by ``config.ds_config`` with this run's batch and monitor."""
    if config.batch_size % world_size:
        raise ValueError(f"batch_size ({config.batch_size}) is not divisible by the {world_size} data-parallel "
                         f"ranks: use a multiple of {world_size}")
    overrides = dict(train_batch_size=config.batch_size, train_micro_batch_size_per_gpu=config.batch_size // world_size,
                     gradient_accumulation_steps=1, gradient_clipping=0.0, steps_per_print=2**31 - 1)
    if tensorboard_dir is not None:
        overrides["tensorboard"] = {"enabled": True, "output_path": str(tensorboard_dir.parent),
                                    "job_name": tensorboard_dir.name}
    return ds_config(config.ds_config, **overrides)


def cosine_with_warmup(config: TrainConfig):
    """lr multiplier by step: linear warm-up, then cosine down to ``lr_min`` at ``max_steps``."""
    floor = config.lr_min / config.lr if config.lr else 0.0

    def multiplier(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min((step - config.warmup_steps) / max(config.max_steps - config.warmup_steps, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_engine(config: TrainConfig, model: torch.nn.Module, world_size: int, tensorboard_dir: Path | None,
                 training: bool = True):
    """``deepspeed.initialize`` with Adam over DeepSpeed's MoE parameter groups (the frozen
    router left out) and the cosine schedule; without an optimizer for evaluation."""
    import deepspeed

    ds = engine_config(config, world_size, tensorboard_dir)
    if not training:
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        return engine
    optimizer = torch.optim.Adam(optimizer_param_groups(model), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine
