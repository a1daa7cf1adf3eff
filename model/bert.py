"""BERT and RoBERTa masked-LM models from `transformers`, with our feed-forward blocks.

Everything but the feed-forward block is transformers' own module. In each layer,
``intermediate`` + ``output.dense`` become one block from
:func:`~smoe.model.feedforward.feedforward_factory` (experts behind a router, or a dense
baseline), installed by :mod:`smoe.model.encoder`.

The classes are transformers citizens: ``SMoEBertConfig`` is a ``BertConfig`` with our
fields (method, N, k, ...), so ``save_pretrained`` / ``from_pretrained`` round-trip,
and the models take and return what ``BertForMaskedLM`` does. The layers' auxiliary
losses and expert counts are read after a forward with :func:`smoe.model.encoder.aux_loss` and
:func:`smoe.model.encoder.expert_counts`.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForMultipleChoice,
                          AutoModelForSequenceClassification, BertConfig, BertForMaskedLM, BertForMultipleChoice,
                          BertForSequenceClassification, BertModel, PreTrainedConfig, RobertaConfig,
                          RobertaForMaskedLM, RobertaForMultipleChoice, RobertaForSequenceClassification,
                          RobertaModel)

from smoe.model.encoder import install_blocks, with_blocks
from smoe.model.feedforward import FeedForwardSpec, feedforward_factory, get_method
from smoe.model.mlp import MLP, modularize
from smoe.model.split import neuron_order, permute_neurons
from smoe.routing import RouterOptions

ROUTER_LOGIT_STD = 1e-6  # a router logit's std for inputs of unit RMS: weights uniform to about this


def _spec(config) -> FeedForwardSpec:
    method = get_method(config.method)
    # BERT has no dropout inside its MLP; a dense regulariser (Concrete, DropBlock) takes that place.
    hidden_dropout = config.hidden_dropout_prob if method.dense and method.regularizer != "dropout" else 0.0
    return FeedForwardSpec(config.method, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                           config.moe_layers, config.num_experts, config.top_k, activation="gelu",
                           dropout=hidden_dropout, router_options=router_options_of(config),
                           dropblock_size=config.dropblock_size, vocab_size=config.vocab_size,
                           ep_size=config.ep_size, dispatch=config.dispatch, seed=config.router_seed,
                           init_std=config.initializer_range, combine_scale=config.combine_scale)


def router_options_of(config) -> RouterOptions:
    """The config's router options; directories written before they were one field hold them flat."""
    if config.router_options is not None:
        return RouterOptions(**config.router_options)
    flat = {name: getattr(config, name) for name in RouterOptions.__dataclass_fields__ if hasattr(config, name)}
    return RouterOptions(**flat)


def install_feedforward(model: nn.Module, ep_rank: int = 0, rank: int = 0) -> None:
    """Our feed-forward block, from the config, in every layer."""
    install_blocks(model, feedforward_factory(_spec(model.config), ep_rank, rank))


class SMoEFields(PreTrainedConfig):
    """Our fields, shared by both configs (transformers makes every config class a dataclass)."""

    method: str = "smoe-dropout"  # smoe.model.feedforward.METHODS
    num_experts: int = 16
    top_k: int = 1  # k at load time; training sets it by the schedule, inference by choice
    moe_layers: str = "all"
    ep_size: int = 1
    router_options: dict | None = None  # RouterOptions as a dict (None: its defaults, or older flat fields)
    dropblock_size: int = 64
    dispatch: str = "auto"
    router_seed: int = 0  # routers and experts are drawn from it: the same on every rank
    combine_scale: float = 1.0  # MoEConfig.combine_scale; 1 for directories written before it existed


class SMoEBertConfig(SMoEFields, BertConfig):
    model_type = "smoe-bert"


class SMoERobertaConfig(SMoEFields, RobertaConfig):
    model_type = "smoe-roberta"


# One class per (family, head), registered with the Auto class of that head, so that
# AutoModelFor...from_pretrained(dir) builds ours from any directory we wrote.
HEADS = {"masked-lm": AutoModelForMaskedLM, "sequence-classification": AutoModelForSequenceClassification,
         "multiple-choice": AutoModelForMultipleChoice, "encoder": AutoModel}
_BASES = {
    "bert": {"masked-lm": BertForMaskedLM, "sequence-classification": BertForSequenceClassification,
             "multiple-choice": BertForMultipleChoice, "encoder": BertModel},
    "roberta": {"masked-lm": RobertaForMaskedLM, "sequence-classification": RobertaForSequenceClassification,
                "multiple-choice": RobertaForMultipleChoice, "encoder": RobertaModel},
}
CONFIGS = {"bert": SMoEBertConfig, "roberta": SMoERobertaConfig}
CLASSES = {family: {head: with_blocks(base, CONFIGS[family], install_feedforward, __name__)
                    for head, base in bases.items()}
           for family, bases in _BASES.items()}
MODELS = {family: (CONFIGS[family], CLASSES[family]["masked-lm"]) for family in CONFIGS}
SMoEBertForMaskedLM, SMoERobertaForMaskedLM = MODELS["bert"][1], MODELS["roberta"][1]
for family, config_class in CONFIGS.items():
    AutoConfig.register(config_class.model_type, config_class)
    for head, auto_class in HEADS.items():
        auto_class.register(config_class, CLASSES[family][head])


def dense_mlp(layer: nn.Module) -> MLP:
    """A transformers layer's intermediate + output.dense as our MLP (same weights)."""
    fc1, fc2 = layer.intermediate.dense, layer.output.dense
    mlp = MLP(fc1.in_features, fc1.out_features, "gelu")
    mlp.load_state_dict({"fc1.weight": fc1.weight, "fc1.bias": fc1.bias, "fc2.weight": fc2.weight,
                         "fc2.bias": fc2.bias})
    return mlp


def weighted_experts(mlp: MLP, num_experts: int, combine_scale: float) -> list[MLP]:
    """:func:`modularize` with each expert's output scaled by N / combine_scale.

    The router's weights sum to one over the chosen experts, the layer multiplies them by
    ``combine_scale``, and the N slices of a dense MLP sum to it: with the experts scaled
    by the rest of N, equal weights at k = N give back the dense MLP exactly, and k < N
    keeps the output's scale, as inverted dropout does. With combine_scale = N the
    slices are taken as they are."""
    experts = modularize(mlp, num_experts)
    factor = num_experts / combine_scale
    if factor != 1.0:
        with torch.no_grad():
            for expert in experts:
                expert.fc2.weight.mul_(factor)
                if expert.has_output_bias:
                    expert.fc2.bias.mul_(factor)
    return experts


def flatten_router(moe: nn.Module) -> None:
    """Shrink the SMoE layer's router projection to std ROUTER_LOGIT_STD / sqrt(d), keeping its direction.

    The router's weights are softmax(top-k logits), equal only if the logits are: logits of ~1e-6
    (the MLP's input is normalised, about 1 per element) make them uniform to ~1e-6. The routers
    choose on the fp32 probabilities, as the native MoE classes do, and those resolve logits only
    to ~6e-8: near-ties fall to the lower expert id, so the choice stays the seeded one for most
    tokens (about 97% at N = 4, k = 2, docs/export.md), and is the same in smoe and in an export."""
    proj = getattr(moe.router, "proj", None)
    if proj is None:  # hash / random / thor: equal weights already
        return
    with torch.no_grad():
        proj.weight.mul_(ROUTER_LOGIT_STD / proj.weight.shape[1] ** 0.5 / proj.weight.float().std())


def load_dense_mlp(moe: nn.Module, mlp: MLP, split: str) -> None:
    """The SMoE layer ``moe`` made the dense ``mlp`` at k = N, for upcycling: its neurons put in
    ``split``'s order (:mod:`smoe.model.split`, seeded by the layer's seed; a permutation, so the
    same function), cut into :func:`weighted_experts`, and the router flattened (equal weights)."""
    order = neuron_order(mlp, moe.num_experts, split, moe.config.seed)
    moe.load_experts(weighted_experts(permute_neurons(mlp, order), moe.num_experts, moe.config.combine_scale))
    flatten_router(moe)


def from_dense(dense: nn.Module, family: str, split: str = "contiguous", **fields) -> nn.Module:
    """An SMoE model initialised from a dense BERT/RoBERTa masked-LM: every weight copied,
    each selected layer's MLP split into experts by :func:`load_dense_mlp`."""
    config_class, model_class = MODELS[family]
    values = {**dense.config.to_dict(), **fields}
    values.pop("model_type", None)
    config = config_class(**values)
    if config.intermediate_size % config.num_experts:
        raise ValueError(f"the dense model's intermediate_size ({config.intermediate_size}) is not divisible by "
                         f"num_experts ({config.num_experts}): pick num_experts dividing {config.intermediate_size}")
    model = model_class(config)
    mlp_weight = re.compile(r"\.layer\.\d+\.(intermediate|output)\.dense\.")  # not attention.output.dense
    shared = {name: tensor for name, tensor in dense.state_dict().items() if not mlp_weight.search(name)}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    if unexpected or any(".output.block." not in name for name in missing):
        raise ValueError(f"the dense checkpoint does not fit a {family} model: missing "
                         f"{[n for n in missing if '.output.block.' not in n][:3]}, unexpected {unexpected[:3]}")
    for dense_layer, layer in zip(dense.base_model.encoder.layer, model.base_model.encoder.layer):
        mlp = dense_mlp(dense_layer)
        block = layer.output.block
        if hasattr(block, "load_experts"):
            load_dense_mlp(block, mlp, split)
        else:  # a layer that stays dense
            block.mlp.load_state_dict(mlp.state_dict())
    return model
