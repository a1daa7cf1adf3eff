"""The feed-forward block ``d -> d_ff -> d`` and its split into experts.

An expert is the same module as the dense MLP, only ``d_ff / N`` wide: SMoE-Dropout
keeps the parameter count of the dense model it replaces. Two kinds: the plain MLP
(``fc2(act(fc1 x))``: BERT, Transformer-XL, GPT-2) and the gated one of Llama, Mistral and
Qwen (``fc2(act(gate x) * up x)``, SwiGLU with ``silu``), whose fc1 holds the gate and the up
projection as one weight of ``2 d_ff`` rows, gate rows first, so that every dispatch path
keeps one fc1/fc2 pair per expert.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# gelu_tanh: GELU with the tanh approximation, GPT-2's "gelu_new"; silu: Llama's SwiGLU gate.
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "silu": F.silu}


def activate(h: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """The hidden units from fc1's output h: act(h), or act(gate) * up where h is [gate | up]."""
    if not gated:
        return ACTIVATIONS[activation](h)
    gate, up = h.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


class MLP(nn.Module):
    """fc1 -> activation (times the up projection when gated) -> dropout on the hidden units -> fc2.

    ``dropout`` is a probability (plain dropout) or any module applied to the hidden
    units (the dense baselines pass Concrete Dropout or DropBlock). ``bias=False`` makes
    fc1 and fc2 without bias parameters, as the decoder LMs have them; ``output_bias`` (None: as
    ``bias``) is fc2's alone: False for the experts of an upcycled GPT-2, whose layer adds the dense
    output bias once, after the mixture (:class:`smoe.model.decoder.UpcycledMLP`).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float | nn.Module = 0.0,
                 gated: bool = False, bias: bool = True, output_bias: bool | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation '{activation}' is unknown: use one of {', '.join(ACTIVATIONS)}")
        self.activation_name = activation
        self.gated = gated
        self.d_ff = d_ff  # hidden units; fc1 gives 2 d_ff outputs (gate and up) when gated
        self.fc1 = nn.Linear(d_model, 2 * d_ff if gated else d_ff, bias=bias)
        self.act = ACTIVATIONS[activation]
        self.dropout = dropout if isinstance(dropout, nn.Module) else nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias if output_bias is None else output_bias)

    @property
    def has_bias(self) -> bool:
        """fc1 has a bias."""
        return self.fc1.bias is not None

    @property
    def has_output_bias(self) -> bool:
        """fc2 has a bias."""
        return self.fc2.bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(activate(self.fc1(x), self.activation_name, self.gated)))

    def reset_parameters(self, std: float, generator: torch.Generator | None = None) -> None:
        """normal(0, std) weights and zero biases, as Transformer-XL initialises every Linear."""
        with torch.no_grad():
            for linear in (self.fc1, self.fc2):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
                if linear.bias is not None:
                    linear.bias.zero_()


def expert_width(d_ff: int, num_experts: int) -> int:
    """The hidden units of each of ``num_experts`` experts cut from a ``d_ff``-wide MLP."""
    if num_experts < 1 or d_ff % num_experts:
        raise ValueError(f"the dense MLP's hidden size ({d_ff}) is not divisible by num_experts "
                         f"({num_experts}): choose num_experts dividing {d_ff}")
    return d_ff // num_experts


def modularize(dense: MLP, num_experts: int) -> list[MLP]:
    """Split a dense MLP into ``num_experts`` experts, each ``d_ff / N`` hidden units.

    Expert i takes rows ``i*h:(i+1)*h`` of fc1 (of its gate and of its up projection when
    gated) and the same columns of fc2, and ``fc2.bias / N`` where fc2 has one, so the experts'
    outputs summed with weight 1 are exactly the dense MLP's output (dropout aside).
    """
    d_ff = dense.d_ff
    width = expert_width(d_ff, num_experts)
    p = dense.dropout.p if isinstance(dense.dropout, nn.Dropout) else 0.0
    experts = []
    with torch.no_grad():
        for i in range(num_experts):
            rows = slice(i * width, (i + 1) * width)
            fc1_rows = [rows, slice(d_ff + rows.start, d_ff + rows.stop)] if dense.gated else [rows]
            expert = MLP(dense.fc1.in_features, width, dense.activation_name, p, dense.gated, dense.has_bias,
                         dense.has_output_bias)
            expert.fc1.weight.copy_(torch.cat([dense.fc1.weight[r] for r in fc1_rows]))
            expert.fc2.weight.copy_(dense.fc2.weight[:, rows])
            if dense.has_bias:
                expert.fc1.bias.copy_(torch.cat([dense.fc1.bias[r] for r in fc1_rows]))
            if dense.has_output_bias:
                expert.fc2.bias.copy_(dense.fc2.bias / num_experts)
            experts.append(expert)
    return experts
