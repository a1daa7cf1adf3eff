"""Upcycling: a Hugging Face decoder LM whose MLPs become SMoE layers, in memory.

Llama, Mistral, Qwen2 and Qwen3 (gated MLP ``down(silu(gate x) * up x)``, no biases) and
GPT-2 (``c_proj(gelu_new(c_fc x))``, biases, Conv1D weights stored transposed) keep every
weight but their selected layers' MLPs, which are split into N experts
(:func:`smoe.model.bert.weighted_experts`) behind a router. Everything else is
transformers' own module, so the model takes and returns what the dense one does.

Exact at k = N: the N slices of a dense MLP sum to it, so k = N gives the dense model back
when the router's weights are equal (1/N each, times ``combine_scale``, undone by the
experts' N / combine_scale). The routers with a projection (random-frozen, learned) give
weights softmax(top-k logits), equal only if the logits are: the projection is drawn from
its seed as usual, then shrunk to std ``ROUTER_LOGIT_STD / sqrt(d)``. Shrinking keeps each
token's order of experts, hence its seeded random top-k choice, while logits of ~1e-6 (the
MLP's input is normalised, about 1 per element) make the weights uniform to ~1e-6.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from smoe.model.bert import weighted_experts
from smoe.model import feedforward
from smoe.model.mlp import MLP
from smoe.model.moe import MoEConfig, SMoE

ROUTER_LOGIT_STD = 1e-6  # a router logit's std for inputs of unit RMS: weights uniform to about this

# transformers' hidden_act / activation_function -> smoe.model.mlp.ACTIVATIONS
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _gated_mlp(mlp: nn.Module, activation: str) -> MLP:
    """Llama-style ``gate_proj``/``up_proj``/``down_proj`` as our gated MLP (fc1 = [gate; up])."""
    bias = mlp.gate_proj.bias is not None
    ours = MLP(mlp.gate_proj.in_features, mlp.gate_proj.out_features, activation, gated=True, bias=bias)
    with torch.no_grad():
        ours.fc1.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        ours.fc2.weight.copy_(mlp.down_proj.weight)
        if bias:
            ours.fc1.bias.copy_(torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]))
            ours.fc2.bias.copy_(mlp.down_proj.bias)
    return ours


def _conv1d_mlp(mlp: nn.Module, activation: str) -> MLP:
    """GPT-2's ``c_fc``/``c_proj`` (Conv1D: weight is (in, out), the transpose of a Linear's) as our MLP."""
    d_model, d_ff = mlp.c_fc.weight.shape
    ours = MLP(d_model, d_ff, activation)
    with torch.no_grad():
        ours.fc1.weight.copy_(mlp.c_fc.weight.t())
        ours.fc1.bias.copy_(mlp.c_fc.bias)
        ours.fc2.weight.copy_(mlp.c_proj.weight.t())
        ours.fc2.bias.copy_(mlp.c_proj.bias)
    return ours


@dataclass(frozen=True)
class Architecture:
    layers: Callable[[nn.Module], nn.ModuleList]  # the decoder layers, from the causal LM
    activation: Callable[[object], str]  # transformers' activation name, from the config
    read_mlp: Callable[[nn.Module, str], MLP]  # a layer's MLP as ours (same weights)
    output_dropout: Callable[[nn.Module], nn.Module]  # what the dense MLP applies after its output projection


_LLAMA_LIKE = Architecture(lambda lm: lm.model.layers, lambda config: config.hidden_act, _gated_mlp,
                           lambda mlp: nn.Identity())
ARCHITECTURES = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gpt2": Architecture(lambda lm: lm.transformer.h, lambda config: config.activation_function, _conv1d_mlp,
                         lambda mlp: mlp.dropout),
}


class UpcycledMLP(nn.Module):
    """A decoder layer's ``mlp``: an SMoE layer over the (batch, seq, d) hidden states.

    Keeps the dense MLP's own output dropout (GPT-2's ``resid_pdrop``) and, like
    :class:`smoe.model.encoder.ExpertFeedForward`, the layer's auxiliary loss and expert
    counts from the last forward."""

    def __init__(self, moe: SMoE, output_dropout: nn.Module):
        super().__init__()
        self.moe = moe
        self.dropout = output_dropout
        self.aux_loss: torch.Tensor | float = 0.0
        self.expert_counts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y_TD, self.aux_loss, self.expert_counts = self.moe(hidden_states.reshape(-1, hidden_states.shape[-1]))
        return self.dropout(y_TD.reshape(hidden_states.shape))


def flatten_router(moe: SMoE) -> None:
    """Shrink the router's projection to std ROUTER_LOGIT_STD / sqrt(d), keeping its direction:
    the same per-token order of experts, weights uniform (see the module's docstring)."""
    proj = getattr(moe.router, "proj", None)
    if proj is None:  # hash / random / thor: equal weights already
        return
    with torch.no_grad():
        proj.weight.mul_(ROUTER_LOGIT_STD / proj.weight.shape[1] ** 0.5 / proj.weight.float().std())


def upcycle(dense: nn.Module, num_experts: int, top_k: int | None = None, moe_layers: str = "all",
            combine_scale: float | None = None, seed: int = 0, method: str = "smoe-dropout",
            dispatch: str = "auto") -> nn.Module:
    """A copy of the causal LM ``dense`` whose selected layers' MLPs are N experts behind ``method``'s router.

    ``top_k`` defaults to N (the dense model back); ``combine_scale`` None is N (inverted
    dropout), see :class:`~smoe.model.moe.MoEConfig`. Layer i's router and experts are seeded
    from ``seed + 101 * i``, as :func:`~smoe.model.feedforward.feedforward_factory` does. The
    dense model is left as it is."""
    model_type = dense.config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(f"cannot upcycle a '{model_type}' model: supported model types are "
                         f"{', '.join(ARCHITECTURES)}")
    router = feedforward.get_method(method).router
    if router is None or router == "hash":
        raise ValueError(f"method '{method}' has no router that upcycling can use: use smoe-dropout, or a "
                         "learned, random or thor method")
    architecture = ARCHITECTURES[model_type]
    hf_activation = architecture.activation(dense.config)
    if hf_activation not in HF_ACTIVATIONS:
        raise ValueError(f"the '{model_type}' model's activation '{hf_activation}' has no counterpart here: "
                         f"supported are {', '.join(HF_ACTIVATIONS)}")
    activation = HF_ACTIVATIONS[hf_activation]
    model = copy.deepcopy(dense)
    layers = architecture.layers(model)
    for index in feedforward.moe_layers(moe_layers, len(layers)):
        layer = layers[index]
        mlp = architecture.read_mlp(layer.mlp, activation)
        if mlp.d_ff % num_experts:
            raise ValueError(f"the model's intermediate size ({mlp.d_ff}) is not divisible by num_experts "
                             f"({num_experts}): pick num_experts dividing {mlp.d_ff}")
        config = MoEConfig(mlp.fc1.in_features, mlp.d_ff, num_experts, top_k or num_experts, router,
                           activation=activation, dropout=0.0, seed=seed + 101 * index, dispatch=dispatch,
                           combine_scale=combine_scale, gated=mlp.gated, bias=mlp.has_bias)
        moe = SMoE(config)
        moe.load_experts(weighted_experts(mlp, num_experts, config.combine_scale))
        flatten_router(moe)
        weight = next(layer.mlp.parameters())
        layer.mlp = UpcycledMLP(moe.to(weight.device, weight.dtype), architecture.output_dropout(layer.mlp))
    return model
