"""Which feed-forward block each layer of a model gets: the training methods.

A *method* is one of the paper's rows: a dense MLP with a regulariser, or the MLP split
into experts behind a router with a top-k schedule. A *layer selection* says which
layers get experts (the paper's ablation); the others keep the dense MLP with dropout.
Models receive a ``make_ffn(layer_index)`` factory, so they never branch on the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from smoe.model.dense import DenseConfig, DenseFFN
from smoe.model.moe import MoEConfig, SMoE
from smoe.routing import RouterOptions


@dataclass(frozen=True)
class Method:
    router: str | None = None  # None: dense
    regularizer: str = "dropout"  # dense methods: dropout, concrete or dropblock
    increasing_k: bool = True  # k grows k_min -> k_max; else fixed at k_fixed
    consistency: bool = False  # THOR: two passes and a symmetric KL term

    @property
    def dense(self) -> bool:
        return self.router is None


METHODS = {
    "dense": Method(),
    "dense-concrete": Method(regularizer="concrete"),
    "dense-dropblock": Method(regularizer="dropblock"),
    "smoe-dropout": Method(router="random-frozen"),
    "smoe-learned": Method(router="learned", increasing_k=False),
    "smoe-learned-increasing-k": Method(router="learned"),
    "thor": Method(router="thor", increasing_k=False, consistency=True),
    "hash": Method(router="hash"),
    "random": Method(router="random"),
}

LAYER_SELECTIONS = ("all", "early", "middle", "later", "every-2")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method '{name}' is unknown: use one of {', '.join(METHODS)}")
    return METHODS[name]


def combine_scale_value(text: str, num_experts: int) -> float:
    """``"N"`` (inverted dropout: the layer's expected output is the dense MLP's) or a positive number."""
    if text.strip().upper() == "N":
        return float(num_experts)
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"combine_scale '{text}' is not N or a positive number: use combine_scale=N "
                         "(inverted dropout) or combine_scale=1 (the paper's)")
    return value


def moe_layers(selection: str, n_layer: int) -> list[int]:
    """Layer indices that get experts. early / middle / later are the first, second and
    last third of the layers (bounds rounded: 4 layers give [0], [1, 2], [3]);
    every-2 is layers 1, 3, 5, ..."""
    if selection not in LAYER_SELECTIONS:
        raise ValueError(f"moe_layers '{selection}' is unknown: use one of {', '.join(LAYER_SELECTIONS)}")
    if selection == "all":
        return list(range(n_layer))
    if selection == "every-2":
        return list(range(1, n_layer, 2))
    third = ("early", "middle", "later").index(selection)
    chosen = list(range(round(n_layer * third / 3), round(n_layer * (third + 1) / 3)))
    if not chosen:
        raise ValueError(f"moe_layers '{selection}' selects no layer of a {n_layer}-layer model: "
                         "use 'all' or more layers")
    return chosen


@dataclass(frozen=True)
class FeedForwardSpec:
    """Everything a factory needs to build any layer's feed-forward block."""

    method: str
    d_model: int
    d_ff: int
    n_layer: int
    layers: str = "all"
    num_experts: int = 16
    k: int = 1  # initial k; the training loop sets the schedule's k before every step
    activation: str = "relu"
    dropout: float = 0.1
    router_options: RouterOptions = RouterOptions()
    dropblock_size: int = 64
    vocab_size: int | None = None  # the hash router's table
    ep_size: int = 1
    dispatch: str = "auto"
    seed: int = 0  # layer i's block is initialised from seed + 101 * i: the same on every rank
    init_std: float = 0.02
    combine_scale: float | None = None  # see MoEConfig.combine_scale (None: N)


def feedforward_factory(spec: FeedForwardSpec, ep_rank: int = 0, rank: int = 0):
    """``make_ffn(layer_index) -> module`` with forward ``(x, token_ids) -> (y, aux, counts)``."""
    method = get_method(spec.method)
    expert_layers = set() if method.dense else set(moe_layers(spec.layers, spec.n_layer))

    def make_ffn(layer: int) -> nn.Module:
        if layer not in expert_layers:
            regularizer = method.regularizer if method.dense else "dropout"
            dense = DenseFFN(DenseConfig(spec.d_model, spec.d_ff, spec.activation, spec.dropout, regularizer,
                                         block_size=spec.dropblock_size))
            dense.mlp.reset_parameters(spec.init_std, torch.Generator().manual_seed(spec.seed + 101 * layer))
            return dense
        config = MoEConfig(spec.d_model, spec.d_ff, spec.num_experts, spec.k, method.router, spec.ep_size,
                           spec.activation, spec.dropout, spec.router_options, spec.vocab_size,
                           seed=spec.seed + 101 * layer, init_std=spec.init_std, dispatch=spec.dispatch,
                           combine_scale=spec.combine_scale)
        return SMoE(config, ep_rank=ep_rank, rank=rank)

    return make_ffn
