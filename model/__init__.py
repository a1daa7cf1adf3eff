"""Models: the feed-forward block, its experts, the SMoE layer and the dense baselines."""

from smoe.model.dense import DenseConfig, DenseFFN
from smoe.model.mlp import MLP, modularize
from smoe.model.moe import MoEConfig, SMoE, moe_layers_of, set_top_k, top_k_of
from smoe.model.parallel import init_expert_parallel, optimizer_param_groups

__all__ = ["MLP", "DenseConfig", "DenseFFN", "MoEConfig", "SMoE", "init_expert_parallel", "modularize",
           "moe_layers_of", "optimizer_param_groups", "set_top_k", "top_k_of"]
