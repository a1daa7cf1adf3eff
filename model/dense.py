"""Dense baselines at equal parameter count: the MLP with dropout, Concrete Dropout or DropBlock.

They share the MoE layer's interface, ``forward(x, token_ids=None) -> (y, aux_loss, None)``,
so a model swaps one for the other without branching. Concrete Dropout's regulariser
is returned as the aux loss, like a router's balance loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smoe.model.mlp import ACTIVATIONS, MLP

REGULARIZERS = ("dropout", "concrete", "dropblock")


@dataclass
class DenseConfig:
    d_model: int
    d_ff: int
    activation: str = "relu"
    dropout: float = 0.1  # plain dropout p, DropBlock's drop rate, Concrete Dropout's initial p
    regularizer: str = "dropout"
    block_size: int = 64  # DropBlock: contiguous hidden units dropped together
    concrete_temperature: float = 0.1
    concrete_weight_reg: float = 1e-6  # Gal et al.'s l^2 / N
    concrete_dropout_reg: float = 1e-5  # Gal et al.'s 2 / N

    def __post_init__(self):
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"DenseConfig.regularizer '{self.regularizer}' is unknown: "
                             f"use one of {', '.join(REGULARIZERS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"DenseConfig.activation '{self.activation}' is unknown: "
                             f"use one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DenseConfig.dropout ({self.dropout}) must be in [0, 1)")
        if self.regularizer == "concrete" and not 0.0 < self.dropout < 1.0:
            raise ValueError(f"Concrete Dropout needs an initial p in (0, 1), got DenseConfig.dropout={self.dropout}")
        if self.regularizer == "dropblock" and not 1 <= self.block_size <= self.d_ff:
            raise ValueError(f"DenseConfig.block_size ({self.block_size}) must be between 1 and d_ff ({self.d_ff})")


class ConcreteDropout(nn.Module):
    """Dropout with a learned rate (Gal, Hron & Kendall 2017), relaxed with temperature t."""

    def __init__(self, p_init: float, temperature: float, weight_reg: float, dropout_reg: float):
        super().__init__()
        # Shape (1,), not a 0-dim scalar: DeepSpeed's engine broadcasts every parameter viewed as
        # bytes, which a 0-dim tensor cannot be (``deepspeed.initialize`` fails on it).
        self.p_logit = nn.Parameter(torch.full((1,), math.log(p_init) - math.log1p(-p_init)))
        self.temperature = temperature
        self.weight_reg = weight_reg
        self.dropout_reg = dropout_reg

    @property
    def p(self) -> torch.Tensor:
        return torch.sigmoid(self.p_logit).squeeze(0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        eps = 1e-7
        p = self.p
        u = torch.rand_like(h)
        drop = torch.sigmoid((torch.log(p + eps) - torch.log1p(-p + eps) + torch.log(u + eps) - torch.log1p(-u + eps))
                             / self.temperature)
        return h * (1 - drop) / (1 - p)

    def penalty(self, next_weight: torch.Tensor) -> torch.Tensor:
        """Weight decay scaled by 1/(1-p) on the layer it feeds, minus the dropout entropy."""
        p = self.p
        weight_term = self.weight_reg * next_weight.square().sum() / (1 - p)
        neg_entropy = p * torch.log(p) + (1 - p) * torch.log1p(-p)
        return weight_term + self.dropout_reg * next_weight.shape[1] * neg_entropy


class DropBlock1d(nn.Module):
    """DropBlock (Ghiasi et al. 2018) over the hidden units: drops runs of ``block_size`` units.

    Block starts are sampled with rate gamma so that about ``p`` of the units are
    dropped; the survivors are rescaled to keep the expectation.
    """

    def __init__(self, p: float, block_size: int):
        super().__init__()
        self.p = p
        self.block_size = block_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return h
        units = h.shape[-1]
        size = self.block_size
        gamma = self.p / size * units / (units - size + 1)
        starts = (torch.rand(*h.shape[:-1], units - size + 1, device=h.device) < gamma).to(h.dtype)
        starts = F.pad(starts.reshape(-1, 1, starts.shape[-1]), (size - 1, size - 1))
        dropped = F.max_pool1d(starts, kernel_size=size, stride=1).reshape(h.shape)
        keep = 1.0 - dropped
        # Counted in fp32: an fp16 sum saturates at 65504 kept units (inf, so a scale of 0).
        scale = keep.numel() / keep.sum(dtype=torch.float32).clamp_min(1.0)
        return h * keep * scale.to(h.dtype)


class DenseFFN(nn.Module):
    """The dense MLP with one of the hidden-unit regularisers."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config
        if config.regularizer == "concrete":
            hidden_dropout = ConcreteDropout(config.dropout, config.concrete_temperature, config.concrete_weight_reg,
                                             config.concrete_dropout_reg)
        elif config.regularizer == "dropblock":
            hidden_dropout = DropBlock1d(config.dropout, config.block_size)
        else:
            hidden_dropout = nn.Dropout(config.dropout)
        self.mlp = MLP(config.d_model, config.d_ff, config.activation, hidden_dropout)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None):
        y = self.mlp(x)
        if isinstance(self.mlp.dropout, ConcreteDropout):
            aux = self.mlp.dropout.penalty(self.mlp.fc2.weight)
        else:
            aux = x.new_zeros((), dtype=torch.float32)
        return y, aux, None
