"""The models `smoe export` writes: transformers classes over the torch-only pieces of smoe.

Only torch, transformers and the modules that `smoe export` copies beside this one into a
single ``modeling_smoe.py`` are imported (:mod:`smoe.launcher.export.bundle`), so an exported
directory loads with ``trust_remote_code=True`` where neither smoe nor DeepSpeed is installed.

k is ``num_experts_per_tok``, the name transformers' MoE models use: pass it to
``from_pretrained`` to load the model at that k, or call ``model.set_top_k(k)`` later. The
routers are the training's own classes with their saved weights (a random frozen or a
learned projection, or a hash table), and the layer combines as it trained
(``combine_scale``), so every k gives what smoe gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import (CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, BertConfig, BertForMaskedLM,
                          BertForMultipleChoice, BertForSequenceClassification, PretrainedConfig, PreTrainedModel,
                          RobertaConfig, RobertaForMaskedLM, RobertaForMultipleChoice,
                          RobertaForSequenceClassification)
from transformers.utils import ModelOutput

from smoe.model.encoder import install_blocks, with_blocks
from smoe.model.mixture import ExpertMixture, PlainFeedForward
from smoe.model.mlp import MLP
from smoe.model.transformer_xl import PositionalEmbedding, TransformerXL, TransformerXLConfig, lm_loss
from smoe.routing import RouterOptions, build_router


class SlimmableFields(PretrainedConfig):
    """The feed-forward fields every exported config has (transformers makes config classes dataclasses)."""

    num_experts: int = 16  # per layer with experts
    num_experts_per_tok: int = 1  # k: any of 1..num_experts
    router: str = "random-frozen"  # random-frozen, learned or hash
    router_options: dict | None = None
    expert_layers: list | None = None  # the layers with experts (the others keep a dense MLP); None: every layer
    combine_scale: float = 1.0  # each chosen expert's weight is the router's times this
    layer_top_k: list | None = None  # a slice: one k per expert layer, in place of num_experts_per_tok's one


def check_top_k(config, k: int) -> None:
    """Refuse a k outside 1..num_experts, and any k for a dense model."""
    if not config.expert_layers and config.expert_layers is not None:
        raise ValueError("this model is dense (no layer has experts): num_experts_per_tok does not apply")
    if not 1 <= k <= config.num_experts:
        raise ValueError(f"num_experts_per_tok={k} must be between 1 and the model's num_experts "
                         f"({config.num_experts})")


def layer_top_ks(config, k: int | Sequence[int], layers: int) -> list[int]:
    """The k of each of the ``layers`` expert layers from one k or one per layer (a slice); refused: a
    list of the wrong length, a k outside 1..num_experts."""
    if isinstance(k, int):
        check_top_k(config, k)
    ks = [k] * layers if isinstance(k, int) else [int(layer_k) for layer_k in k]
    if len(ks) != layers:
        raise ValueError(f"{len(ks)} ks ({ks}) for a model with {layers} expert layers: give one k, or one per "
                         "expert layer")
    for layer_k in ks:
        check_top_k(config, layer_k)
    return ks


def configured_top_ks(config, layers: int) -> list[int]:
    """The ks the config loads at: ``layer_top_k`` where it is set, else ``num_experts_per_tok`` everywhere."""
    return layer_top_ks(config, config.num_experts_per_tok if config.layer_top_k is None else config.layer_top_k,
                        layers)


def expert_mixture(config, d_model: int, width: int, activation: str, top_k: int, gated: bool = False,
                   bias: bool = True, output_bias: bool | None = None) -> ExpertMixture:
    """An :class:`ExpertMixture` of ``num_experts`` experts of ``width`` hidden units at k = ``top_k``, behind
    the config's router. Weights are placeholders until the saved ones are loaded."""
    n = config.num_experts
    router = build_router(config.router, RouterOptions(**(config.router_options or {})), d_model=d_model,
                          num_experts=n, k=top_k, seed=0, vocab_size=config.vocab_size)
    experts = [MLP(d_model, width, activation, gated=gated, bias=bias, output_bias=output_bias) for _ in range(n)]
    return ExpertMixture(router, experts, config.combine_scale)


def block_factory(config, d_model: int, d_ff: int, activation: str, n_layer: int) -> Callable[[int], nn.Module]:
    """``make_ffn(layer)``: an :func:`expert_mixture` cut from a ``d_ff``-wide MLP in the expert
    layers, a dense MLP elsewhere."""
    experts = sorted(range(n_layer) if config.expert_layers is None else config.expert_layers)
    top_ks = dict(zip(experts, configured_top_ks(config, len(experts)))) if experts else {}

    def make_ffn(layer: int) -> nn.Module:
        if layer not in top_ks:
            return PlainFeedForward(MLP(d_model, d_ff, activation))
        return expert_mixture(config, d_model, d_ff // config.num_experts, activation, top_ks[layer])

    return make_ffn


class SelfSlimming:
    """``set_top_k(k)``: every expert layer to k experts per token, or ``set_top_k([k0, k1, ...])``: each expert
    layer to its own (a slice of ``slices.json``), kept in the config (so ``save_pretrained`` keeps it)."""

    @property
    def top_k(self) -> int | list[int]:
        return self.config.num_experts_per_tok if self.config.layer_top_k is None else list(self.config.layer_top_k)

    def set_top_k(self, k: int | Sequence[int]) -> None:
        mixtures = [module for module in self.modules() if isinstance(module, ExpertMixture)]
        ks = layer_top_ks(self.config, k, len(mixtures))
        for mixture, layer_k in zip(mixtures, ks):
            mixture.set_top_k(layer_k)
        if isinstance(k, int):
            self.config.num_experts_per_tok, self.config.layer_top_k = int(k), None
        else:
            self.config.layer_top_k = ks


# --- Transformer-XL -------------------------------------------------------------------------------

class SMoETransformerXLConfig(SlimmableFields):
    model_type = "smoe-dropout-transformer-xl"

    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 8
    d_head: int = 64
    d_ff: int = 8192
    activation: str = "relu"
    dropout: float = 0.1
    dropatt: float = 0.0
    tgt_len: int = 128  # the segment length the run evaluated with; forward takes any
    mem_len: int = 512  # the memory kept, as the run evaluated (a longer one for segments shorter than training's)
    clamp_len: int = -1
    same_length: bool = False

    def transformer_xl(self) -> TransformerXLConfig:
        return TransformerXLConfig(vocab_size=self.vocab_size, n_layer=self.n_layer, d_model=self.d_model,
                                   n_head=self.n_head, d_head=self.d_head, d_ff=self.d_ff, dropout=self.dropout,
                                   dropatt=self.dropatt, tgt_len=self.tgt_len, mem_len=self.mem_len,
                                   clamp_len=self.clamp_len, same_length=self.same_length)


@dataclass
class TransformerXLLMOutput(ModelOutput):
    """``logits`` (B, T, V); ``mems``: pass them with the next segment to continue the text."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mems: list[torch.Tensor] | None = None


class SMoETransformerXLForCausalLM(SelfSlimming, PreTrainedModel):
    """A byte-level Transformer-XL. ``labels`` are the inputs (shifted inside, transformers'
    convention); the memory of the previous segment goes in as ``mems``."""

    config_class = SMoETransformerXLConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"

    def __init__(self, config: SMoETransformerXLConfig):
        super().__init__(config)
        self.transformer = TransformerXL(config.transformer_xl(), block_factory(
            config, config.d_model, config.d_ff, config.activation, config.n_layer))
        self.post_init()

    def _init_weights(self, module):
        """Every weight is in the saved file; only the position embedding's frequencies, which are not
        saved, are computed again (transformers builds the model on the meta device)."""
        if isinstance(module, PositionalEmbedding):
            module.inv_freq.copy_(module.frequencies())

    def forward(self, input_ids: torch.Tensor, mems: list[torch.Tensor] | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> TransformerXLLMOutput:
        out = self.transformer(input_ids, mems)
        loss = None if labels is None else lm_loss(out.logits[:, :-1], labels[:, 1:])
        return TransformerXLLMOutput(loss=loss, logits=out.logits, mems=out.mems)


# --- BERT and RoBERTa -----------------------------------------------------------------------------

class SMoEBertConfig(SlimmableFields, BertConfig):
    model_type = "smoe-dropout-bert"


class SMoERobertaConfig(SlimmableFields, RobertaConfig):
    model_type = "smoe-dropout-roberta"


def install_slimmable_blocks(model: nn.Module) -> None:
    config = model.config
    install_blocks(model, block_factory(config, config.hidden_size, config.intermediate_size, "gelu",
                                        config.num_hidden_layers))


def _slimmable(base: type, config_class: type) -> type:
    return with_blocks(base, config_class, install_slimmable_blocks, __name__, mixins=(SelfSlimming,))


SMoEBertForMaskedLM = _slimmable(BertForMaskedLM, SMoEBertConfig)
SMoEBertForSequenceClassification = _slimmable(BertForSequenceClassification, SMoEBertConfig)
SMoEBertForMultipleChoice = _slimmable(BertForMultipleChoice, SMoEBertConfig)
SMoERobertaForMaskedLM = _slimmable(RobertaForMaskedLM, SMoERobertaConfig)
SMoERobertaForSequenceClassification = _slimmable(RobertaForSequenceClassification, SMoERobertaConfig)
SMoERobertaForMultipleChoice = _slimmable(RobertaForMultipleChoice, SMoERobertaConfig)


# --- Upcycled decoder LMs -------------------------------------------------------------------------

class UpcycledDecoderFields(SlimmableFields):
    """What an upcycled decoder LM's experts are: the dense config names its MLP in its own way."""

    moe_intermediate_size: int = 0  # hidden units of one expert (Qwen3-MoE's name): the dense MLP's / num_experts
    expert_activation: str = "silu"  # of smoe.model.mlp.ACTIVATIONS
    gated_experts: bool = True  # act(gate x) * up x (Llama, Mistral, Qwen) rather than act(fc1 x) (GPT-2)
    expert_bias: bool = False  # each expert's fc1 has its rows of the dense bias (GPT-2's c_fc)
    output_bias: bool = False  # the layer adds the dense output bias once, after the mixture (GPT-2's c_proj)


class MixtureMLP(nn.Module):
    """A decoder layer's ``mlp``: the :class:`ExpertMixture` over its (batch, seq, d) hidden states,
    then what the dense MLP applied after its output projection and the experts do not split: its
    output bias, once, and its output dropout (GPT-2's ``resid_pdrop``)."""

    def __init__(self, moe: ExpertMixture, d_model: int, output_bias: bool, dropout: nn.Module):
        super().__init__()
        self.moe = moe
        self.output_bias = nn.Parameter(torch.zeros(d_model)) if output_bias else None
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y, _, _ = self.moe(hidden_states)
        if self.output_bias is not None:
            y = y + self.output_bias
        return self.dropout(y)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM: its base model's one ModuleList (Llama's
    ``layers``, GPT-2's ``h``)."""
    return next(child for child in model.base_model.children() if isinstance(child, nn.ModuleList))


def install_mixture_mlps(model: nn.Module) -> None:
    """The ``mlp`` of each layer in ``expert_layers`` as a :class:`MixtureMLP`; the others keep the dense one."""
    config = model.config
    layers = decoder_layers(model)
    experts = range(len(layers)) if config.expert_layers is None else sorted(config.expert_layers)
    for index, top_k in zip(experts, configured_top_ks(config, len(experts))):
        layer = layers[index]
        moe = expert_mixture(config, config.hidden_size, config.moe_intermediate_size, config.expert_activation,
                             top_k, config.gated_experts, config.expert_bias, output_bias=False)
        layer.mlp = MixtureMLP(moe, config.hidden_size, config.output_bias,
                               getattr(layer.mlp, "dropout", nn.Identity()))


def slimmable_decoder(model_type: str) -> tuple[type, type]:
    """The exported config and causal-LM classes over transformers' own for ``model_type`` (found
    through ``CONFIG_MAPPING`` and ``MODEL_FOR_CAUSAL_LM_MAPPING``): the config *is* the dense one
    (every field, default and alias) plus the experts', and the model is transformers' class with
    its expert layers' ``mlp`` replaced, so loading, caching and ``generate()`` are transformers'."""
    base_config = CONFIG_MAPPING[model_type]
    config_class = type(f"SMoE{base_config.__name__}", (UpcycledDecoderFields, base_config),
                        {"model_type": f"smoe-dropout-{model_type}", "base_model_type": model_type,
                         "__module__": __name__})
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    return config_class, with_blocks(base_model, config_class, install_mixture_mlps, __name__,
                                     mixins=(SelfSlimming,))


# Each name is its class's own (auto_map finds it by name in this module).
SMoELlamaConfig, SMoELlamaForCausalLM = slimmable_decoder("llama")
SMoEMistralConfig, SMoEMistralForCausalLM = slimmable_decoder("mistral")
SMoEQwen2Config, SMoEQwen2ForCausalLM = slimmable_decoder("qwen2")
SMoEQwen3Config, SMoEQwen3ForCausalLM = slimmable_decoder("qwen3")
SMoEGPT2Config, SMoEGPT2LMHeadModel = slimmable_decoder("gpt2")
# The dense model_type -> its exported (config, causal LM) classes.
DECODERS = {config.base_model_type: (config, model) for config, model in (
    (SMoELlamaConfig, SMoELlamaForCausalLM), (SMoEMistralConfig, SMoEMistralForCausalLM),
    (SMoEQwen2Config, SMoEQwen2ForCausalLM), (SMoEQwen3Config, SMoEQwen3ForCausalLM),
    (SMoEGPT2Config, SMoEGPT2LMHeadModel))}
