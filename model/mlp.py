"""The feed-forward block ``d -> d_ff -> d`` and its split into experts.

An expert is the same module as the dense MLP, only ``d_ff / N`` wide: SMoE-Dropout
keeps the parameter count of the dense model it replaces.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class MLP(nn.Module):
    """fc1 -> activation -> dropout on the hidden units -> fc2.

    ``dropout`` is a probability (plain dropout) or any module applied to the hidden
    units (the dense baselines pass Concrete Dropout or DropBlock).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float | nn.Module = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation '{activation}' is unknown: use one of {', '.join(ACTIVATIONS)}")
        self.activation_name = activation
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = ACTIVATIONS[activation]()
        self.dropout = dropout if isinstance(dropout, nn.Module) else nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))

    def reset_parameters(self, std: float, generator: torch.Generator | None = None) -> None:
        """normal(0, std) weights and zero biases, as Transformer-XL initialises every Linear."""
        with torch.no_grad():
            for linear in (self.fc1, self.fc2):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
                linear.bias.zero_()


def modularize(dense: MLP, num_experts: int) -> list[MLP]:
    """Split a dense MLP into ``num_experts`` experts, each ``d_ff / N`` hidden units.

    Expert i takes rows ``i*h:(i+1)*h`` of fc1 and the same columns of fc2, and
    ``fc2.bias / N``, so the experts' outputs summed with weight 1 are exactly the
    dense MLP's output (dropout aside).
    """
    d_ff = dense.fc1.out_features
    if d_ff % num_experts:
        raise ValueError(f"the dense MLP's hidden size ({d_ff}) is not divisible by num_experts "
                         f"({num_experts}): choose num_experts dividing {d_ff}")
    width = d_ff // num_experts
    p = dense.dropout.p if isinstance(dense.dropout, nn.Dropout) else 0.0
    experts = []
    with torch.no_grad():
        for i in range(num_experts):
            rows = slice(i * width, (i + 1) * width)
            expert = MLP(dense.fc1.in_features, width, dense.activation_name, p)
            expert.fc1.weight.copy_(dense.fc1.weight[rows])
            expert.fc1.bias.copy_(dense.fc1.bias[rows])
            expert.fc2.weight.copy_(dense.fc2.weight[:, rows])
            expert.fc2.bias.copy_(dense.fc2.bias / num_experts)
            experts.append(expert)
    return experts
