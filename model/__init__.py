"""Models: the feed-forward block, its experts, the SMoE layer and the dense baselines."""

from .dense import DenseConfig, DenseFFN
from .mlp import MLP, modularize
from .moe import MoEConfig, SMoE
from .parallel import init_expert_parallel, optimizer_param_groups

__all__ = ["MLP", "DenseConfig", "DenseFFN", "MoEConfig", "SMoE", "init_expert_parallel", "modularize",
           "optimizer_param_groups"]
