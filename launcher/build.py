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

from smoe.model.feedforward import feedforward_factory, get_method
from smoe.model.parallel import init_expert_parallel, optimizer_param_groups
from smoe.model.transformer_xl import TransformerXL

from .config import TrainConfig
from . import deepspeed_config, slurm
from .distributed import free_port


def init_distributed() -> tuple[int, int]:
    """Join the job's process group and return (rank, world).

    The ranks' environment comes from whoever started them: the deepspeed launcher or
    torchrun (``RANK`` set), ``srun`` (``SLURM_*``, mapped by :mod:`.slurm`), ``mpirun``
    (found through mpi4py by DeepSpeed), or nobody: a plain ``smoe train`` is a group of one.
    """
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        mpi = any(name in os.environ for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"))
        if "RANK" not in os.environ and not mpi:
            if slurm.in_slurm_step(os.environ):
                os.environ.update(slurm.rank_env(os.environ))
            else:
                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(free_port()))
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False,
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    # This rank's own GPU, before any tensor or communicator exists: otherwise every rank would
    # start on cuda:0. (mpirun's LOCAL_RANK is only known once DeepSpeed has joined the group.)
    # Afterwards the engine's `device` is the one source of truth.
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective; before the engine exists)."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if dist.get_world_size() == 1:
        return flag
    votes = torch.full((1,), float(flag), device=get_accelerator().current_device_name())
    dist.all_reduce(votes)
    return votes.item() > 0


def build_model(config: TrainConfig, rank: int = 0) -> TransformerXL:
    ep_rank = init_expert_parallel(config.ep_size)
    return TransformerXL(config.model_config(), feedforward_factory(config.feedforward_spec(), ep_rank, rank))


def engine_config(config: TrainConfig, world_size: int, tensorboard_dir: Path | None, training: bool = True) -> dict:
    """The run's DeepSpeed JSON (``config.ds_config``) filled in for its batch, clip and monitor."""
    return deepspeed_config.engine_json(config.ds_config, config.batch_size, config.grad_accum, world_size,
                                        clip=config.clip, has_experts=not get_method(config.method).dense,
                                        tensorboard_dir=tensorboard_dir, training=training)


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


def build_engine(config: TrainConfig, model: torch.nn.Module, ds: dict, training: bool = True):
    """``deepspeed.initialize`` on ``ds`` (:func:`engine_config`) with AdamW over DeepSpeed's MoE
    parameter groups (the frozen router left out) and the lr schedule; without an optimizer for
    evaluation."""
    import deepspeed

    if not training:
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        return engine
    optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine
