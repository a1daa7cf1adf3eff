"""Upcycling: a Hugging Face decoder LM whose MLPs become SMoE layers, in memory.

Llama, Mistral, Qwen2 and Qwen3 (gated MLP ``down(silu(gate x) * up x)``, no biases) and
GPT-2 (``c_proj(gelu_new(c_fc x))``, biases, Conv1D weights stored transposed) keep every
weight but their selected layers' MLPs, which are split into N experts
(:func:`smoe.model.bert.weighted_experts`) behind a router. Everything else is
transformers' own module, so the model takes and returns what the dense one does. A dense
output bias (GPT-2's ``c_proj.bias``) is not split: the experts have fc1's bias rows but no
fc2 bias, and :class:`UpcycledMLP` adds the dense one once after the mixture, so the
parameters are the dense model's plus the routers'.

Exact at k = N: the N slices of a dense MLP sum to it, so k = N gives the dense model back
when the router's weights are equal (1/N each, times ``combine_scale``, undone by the
experts' N / combine_scale). The routers with a projection (random-frozen, learned) give
weights softmax(top-k logits), equal only if the logits are: the projection is drawn from
its seed as usual, then shrunk (:func:`smoe.model.bert.flatten_router`, as BERT's upcycling
does). Which neurons each expert gets is the ``split`` (:mod:`smoe.model.split`): the
neurons are reordered first, which leaves the MLP the same function.

An upcycled directory is the dense model's own ``config.json`` (and tokenizer), ``upcycling.json``
(:class:`Upcycling`: how its MLPs were split) and ``model.safetensors`` under the upcycled
model's parameter names, every expert under its global id. :func:`build_upcycled` makes the
structure from the first two, for any expert-parallel rank; :func:`load_upcycled` adds the weights.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from smoe.model.bert import load_dense_mlp
from smoe.model import feedforward
from smoe.model.mlp import MLP
from smoe.model.moe import MoEConfig, SMoE, global_names
from smoe.model.split import SPLITS

UPCYCLING_FILE = "upcycling.json"
WEIGHTS_FILE = "model.safetensors"

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

    Keeps what the dense MLP applies after its output projection and does not split: its
    output bias (GPT-2's ``c_proj.bias``; ``output_bias``, None where the MLP has none) and its
    output dropout (GPT-2's ``resid_pdrop``). The router's weights sum to 1 over the chosen
    experts and the layer multiplies them by ``combine_scale``, so per-expert output biases of
    b / combine_scale would add exactly b at every k: one bias, here beside the SMoE layer
    (which stays experts, gate and dispatch), is the same function with N - 1 fewer. Like
    :class:`smoe.model.encoder.ExpertFeedForward`, it keeps the layer's auxiliary loss and
    expert counts from the last forward."""

    def __init__(self, moe: SMoE, output_dropout: nn.Module, output_bias: torch.Tensor | None = None):
        super().__init__()
        self.moe = moe
        self.output_bias = None if output_bias is None else nn.Parameter(output_bias.detach().clone())
        self.dropout = output_dropout
        self.aux_loss: torch.Tensor | float = 0.0
        self.expert_counts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y_TD, self.aux_loss, self.expert_counts = self.moe(hidden_states.reshape(-1, hidden_states.shape[-1]))
        if self.output_bias is not None:
            y_TD = y_TD + self.output_bias
        return self.dropout(y_TD.reshape(hidden_states.shape))


@dataclass(frozen=True)
class Upcycling:
    """How a dense model's MLPs became experts: saved as ``upcycling.json`` beside its config.

    ``combine_scale`` None is N (inverted dropout); ``top_k`` None is N (the dense model back).
    Layer i's router, experts and neuron order are seeded from ``seed + 101 * i``, as
    :func:`~smoe.model.feedforward.feedforward_factory` does. ``split`` is how the neurons
    were shared out (:data:`smoe.model.split.SPLITS`); files written before it was recorded
    were cut into contiguous slices and read so."""

    num_experts: int
    method: str = "smoe-dropout"
    moe_layers: str = "all"
    combine_scale: float | None = None
    seed: int = 0
    top_k: int | None = None
    split: str = "random"

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts ({self.num_experts}) must be at least 1")
        if self.combine_scale is None:  # recorded as the number it is
            object.__setattr__(self, "combine_scale", float(self.num_experts))
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be between 1 and num_experts ({self.num_experts})")
        if self.split not in SPLITS:
            raise ValueError(f"split '{self.split}' is unknown: use one of {', '.join(SPLITS)}")
        router = feedforward.get_method(self.method).router
        if router is None or router == "hash":
            raise ValueError(f"method '{self.method}' has no router that upcycling can use: use smoe-dropout, or "
                             "a learned, random or thor method")

    @property
    def router(self) -> str:
        return feedforward.get_method(self.method).router

    def save(self, directory: Path) -> None:
        (Path(directory) / UPCYCLING_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "Upcycling":
        return cls(**{"split": "contiguous", **json.loads((Path(directory) / UPCYCLING_FILE).read_text())})


def architecture_of(config) -> tuple[Architecture, str]:
    """The architecture of a transformers config and its MLP's activation, or a refusal naming the supported ones."""
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(f"cannot upcycle a '{model_type}' model: supported model types are "
                         f"{', '.join(ARCHITECTURES)}")
    architecture = ARCHITECTURES[model_type]
    hf_activation = architecture.activation(config)
    if hf_activation not in HF_ACTIVATIONS:
        raise ValueError(f"the '{model_type}' model's activation '{hf_activation}' has no counterpart here: "
                         f"supported are {', '.join(HF_ACTIVATIONS)}")
    return architecture, HF_ACTIVATIONS[hf_activation]


def _install_experts(model: nn.Module, upcycling: Upcycling, split_weights: bool, dispatch: str, ep_size: int,
                     ep_rank: int) -> nn.Module:
    """Each selected layer's MLP of ``model`` (in place) as an SMoE layer: its dense weights split
    (``split_weights``) or the layer's seeded initialisation, to be loaded over."""
    architecture, activation = architecture_of(model.config)
    layers = architecture.layers(model)
    for index in feedforward.moe_layers(upcycling.moe_layers, len(layers)):
        layer = layers[index]
        mlp = architecture.read_mlp(layer.mlp, activation)
        output_bias = mlp.fc2.bias  # the layer's (UpcycledMLP's), not the experts'
        mlp.fc2.register_parameter("bias", None)
        if mlp.d_ff % upcycling.num_experts:
            raise ValueError(f"the model's intermediate size ({mlp.d_ff}) is not divisible by num_experts "
                             f"({upcycling.num_experts}): pick num_experts dividing {mlp.d_ff}")
        config = MoEConfig(mlp.fc1.in_features, mlp.d_ff, upcycling.num_experts,
                           upcycling.top_k or upcycling.num_experts, upcycling.router, activation=activation,
                           dropout=0.0, seed=upcycling.seed + 101 * index, dispatch=dispatch, ep_size=ep_size,
                           combine_scale=upcycling.combine_scale, gated=mlp.gated, bias=mlp.has_bias,
                           output_bias=False)
        moe = SMoE(config, ep_rank)
        if split_weights:
            load_dense_mlp(moe, mlp, upcycling.split)
        weight = next(layer.mlp.parameters())
        layer.mlp = UpcycledMLP(moe.to(weight.device, weight.dtype), architecture.output_dropout(layer.mlp),
                                None if output_bias is None else output_bias.to(weight.device, weight.dtype))
    return model


def upcycle(dense: nn.Module, num_experts: int, top_k: int | None = None, moe_layers: str = "all",
            combine_scale: float | None = None, seed: int = 0, method: str = "smoe-dropout", split: str = "random",
            dispatch: str = "auto", ep_size: int = 1, ep_rank: int = 0) -> nn.Module:
    """A copy of the causal LM ``dense`` whose selected layers' MLPs are N experts behind ``method``'s
    router (:class:`Upcycling` says what each argument is); this rank holds its ``ep_rank``'s share.
    The dense model is left as it is."""
    upcycling = Upcycling(num_experts, method, moe_layers, combine_scale, seed, top_k, split)
    architecture_of(dense.config)  # refused before the copy
    return _install_experts(copy.deepcopy(dense), upcycling, True, dispatch, ep_size, ep_rank)


def build_upcycled(hf_config, upcycling: Upcycling, dispatch: str = "auto", ep_size: int = 1,
                   ep_rank: int = 0) -> nn.Module:
    """The upcycled model's structure, initialised (the shared weights from torch's global generator,
    the experts and routers from their seeds), for this expert-parallel rank."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_config(hf_config)
    return _install_experts(dense, upcycling, False, dispatch, ep_size, ep_rank)


def save_upcycled(model: nn.Module, upcycling: Upcycling, directory: Path) -> None:
    """``config.json``, ``upcycling.json`` and ``model.safetensors`` (every expert: an ep_size 1 model)."""
    from safetensors.torch import save_file

    if any(moe.ep_size > 1 for moe in _moe_layers(model)):
        raise ValueError("save_upcycled needs the whole model (ep_size 1); a run's checkpoints hold the others")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    upcycling.save(directory)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(_untied(model, state), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def load_upcycled(directory: Path, dispatch: str = "auto", ep_size: int = 1, ep_rank: int = 0) -> nn.Module:
    """An upcycled directory as a model: this rank's experts and everything shared, as saved."""
    from transformers import AutoConfig

    directory = Path(directory)
    for name in ("config.json", UPCYCLING_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} holds no {name}: pass a directory written by `smoe upcycle`")
    model = build_upcycled(AutoConfig.from_pretrained(directory), Upcycling.read(directory), dispatch, ep_size,
                           ep_rank)
    load_upcycled_weights(model, directory)
    return model


def load_upcycled_weights(model: nn.Module, directory: Path) -> None:
    """The directory's ``model.safetensors`` into ``model`` (built for it, on any expert-parallel rank)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(directory) / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS_FILE}: pass a directory written by `smoe upcycle`")
    try:
        saved = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file} cannot be read ({error}): it is damaged; write it again with `smoe upcycle`") \
            from None
    expected, shapes = global_names(model), {name: t.shape for name, t in model.state_dict().items()}
    tied = set(_tied_names(model))
    wrong = [name for local, name in expected.items() if local not in tied
             and (name not in saved or saved[name].shape != shapes[local])]
    if wrong:
        raise ValueError(f"{file} lacks {len(wrong)} weights or has them in other shapes (e.g. {wrong[0]}): it "
                         "does not belong to this config.json and upcycling.json; write it again with `smoe upcycle`")
    model.load_state_dict({local: saved[name] for local, name in expected.items() if local not in tied}, strict=False)
    model.tie_weights()


def _moe_layers(model: nn.Module) -> list[SMoE]:
    return [m for m in model.modules() if isinstance(m, SMoE)]


def _tied_names(model: nn.Module) -> list[str]:
    """State-dict names that share storage with an earlier one (tied embeddings): saved once."""
    seen, tied = set(), []
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            tied.append(name)
        seen.add(tensor.data_ptr())
    return tied


def _untied(model: nn.Module, state: dict) -> dict:
    return {name: tensor for name, tensor in state.items() if name not in set(_tied_names(model))}
