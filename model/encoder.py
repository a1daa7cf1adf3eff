"""Any feed-forward block inside a transformers BERT/RoBERTa encoder.

In each layer, ``intermediate`` (dense d -> d_ff + GELU) and ``output.dense`` (d_ff -> d)
become one block (experts behind a router, or a dense MLP), while the layer's own dropout,
residual and LayerNorm stay where ``BertOutput`` has them: ``LayerNorm(dropout(ffn(x)) + x)``.
Only torch is imported here: the models that train (:mod:`smoe.model.bert`) and the models
`smoe export` writes (:mod:`smoe.model.hub`) install their blocks with it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ExpertFeedForward(nn.Module):
    """A layer's feed-forward sublayer around any block: ``LayerNorm(dropout(block(x)) + x)``.

    Takes the place of ``BertOutput`` (whose dropout and LayerNorm it keeps); the layer's
    ``intermediate`` becomes the identity, so ``output(intermediate(x), x)`` lands here."""

    def __init__(self, block: nn.Module, original_output: nn.Module):
        super().__init__()
        self.block = block
        self.dropout = original_output.dropout
        self.LayerNorm = original_output.LayerNorm
        self.token_ids: torch.Tensor | None = None  # set before each forward, for the hash router
        self.aux_loss: torch.Tensor | float = 0.0
        self.expert_counts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        y, self.aux_loss, self.expert_counts = self.block(hidden_states, self.token_ids)
        return self.LayerNorm(self.dropout(y) + input_tensor)


def install_blocks(model: nn.Module, make_ffn: Callable[[int], nn.Module]) -> None:
    """Replace every layer's intermediate + output with an :class:`ExpertFeedForward` around
    ``make_ffn(layer_index)``."""
    for index, layer in enumerate(model.base_model.encoder.layer):
        layer.output = ExpertFeedForward(make_ffn(index), layer.output)
        layer.intermediate = nn.Identity()
    # On the encoder, not the head: a multiple-choice head flattens (batch, choices, T) ids before it.
    model.base_model.register_forward_pre_hook(_share_token_ids, with_kwargs=True)


def _share_token_ids(encoder, args, kwargs):
    token_ids = kwargs.get("input_ids", args[0] if args else None)
    for module in feedforward_modules(encoder):
        module.token_ids = token_ids


def feedforward_modules(model: nn.Module) -> list[ExpertFeedForward]:
    return [m for m in model.modules() if isinstance(m, ExpertFeedForward)]


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The sum of the layers' auxiliary losses from the last forward (balance loss, Concrete's regulariser)."""
    return sum((m.aux_loss for m in feedforward_modules(model)), 0.0)


def expert_counts(model: nn.Module) -> list[torch.Tensor | None]:
    return [m.expert_counts for m in feedforward_modules(model)]


def with_blocks(base: type, config_class: type, install: Callable[[nn.Module], None], module: str,
                mixins: tuple[type, ...] = ()) -> type:
    """``base`` (a transformers model class: BERT/RoBERTa, or an exported decoder LM) with
    ``install(model)`` run after its init (which would otherwise redraw the blocks' routers), named
    "SMoE" + its name, in ``module``, with ``mixins`` before it."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config)
        install(self, *args, **kwargs)

    name = "SMoE" + base.__name__
    return type(name, (*mixins, base), {"__init__": __init__, "config_class": config_class, "__module__": module,
                                        "__doc__": f"transformers' {base.__name__} over our feed-forward blocks."})
