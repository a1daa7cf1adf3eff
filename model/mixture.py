"""The SMoE layer on one process, without DeepSpeed: a router, N experts and the combine.

:class:`smoe.model.moe.SMoE` is the layer that trains (a DeepSpeed ``MoE``: expert-parallel
groups, one checkpoint file per expert); :class:`ExpertMixture` is the same maths for a
model that only runs, the layer of the models `smoe export` writes: the router of
:mod:`smoe.routing.routers`, :class:`~smoe.model.mlp.MLP` experts and the single-rank paths
of :mod:`smoe.model.dispatch`. Only torch is imported here, so the export copies it.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.model.dispatch import COMBINES, default_path, scaled
from smoe.model.mlp import MLP
from smoe.routing import Router


class ExpertMixture(nn.Module):
    """``forward(x, token_ids=None) -> (y, aux_loss, expert_counts)``, the convention of every block."""

    def __init__(self, router: Router, experts: list[MLP], combine_scale: float):
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.combine_scale = combine_scale

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def set_top_k(self, k: int) -> None:
        self.router.set_top_k(k)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None):
        x_TD = x.reshape(-1, x.shape[-1])
        routes = scaled(self.router(x_TD, None if token_ids is None else token_ids.reshape(-1)), self.combine_scale)
        y_TD = COMBINES[default_path(self.top_k, self.num_experts)](list(self.experts), x_TD, routes)
        return y_TD.reshape(x.shape), routes.aux_loss, routes.counts_N


class PlainFeedForward(nn.Module):
    """A dense MLP under the same convention: a layer left without experts."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None):
        return self.mlp(x), x.new_zeros((), dtype=torch.float32), None
