"""Expert parallelism applied from outside the model: process groups before the layers.

The groups are DeepSpeed's (``deepspeed.utils.groups``): expert-parallel groups of
``ep_size`` consecutive ranks that exchange tokens, and expert-data-parallel groups
that all-reduce the gradients of the same experts. Creating them before building the
model tells each :class:`~smoe.model.moe.SMoE` which experts are local;
``deepspeed.initialize`` then finds the groups already there.
"""

from __future__ import annotations

import deepspeed.comm as dist
from deepspeed.utils import groups


def init_expert_parallel(ep_size: int) -> int:
    """Create (once) the groups for ``ep_size`` and return this rank's expert-parallel rank."""
    if ep_size == 1 and not dist.is_initialized():
        return 0
    if not dist.is_initialized():
        raise RuntimeError(f"ep_size={ep_size} needs torch.distributed: call deepspeed.init_distributed() first "
                           "(the deepspeed launcher, torchrun, mpirun and srun all provide the environment)")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) does not divide the world size ({world}): "
                         f"pick an ep_size that divides {world}")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_rank(name)


def optimizer_param_groups(model, **options) -> list[dict]:
    """Trainable parameters split by DeepSpeed's MoE helper into one group of shared
    parameters and one per expert group (``moe=True``), as the engine requires.

    Frozen parameters (the SMoE-Dropout router) are left out: the optimizer never sees them.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    trainable = [p for p in model.parameters() if p.requires_grad]
    return split_params_into_different_moe_groups_for_optimizer({"name": "params", "params": trainable, **options})
