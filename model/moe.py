"""The SMoE layer: a dense MLP split into N experts behind a router, on DeepSpeed's MoE.

What is DeepSpeed's and what is ours:

* ours :class:`SMoE` *is a* ``deepspeed.moe.layer.MoE``, so the DeepSpeed engine finds it,
  creates its expert-parallel and expert-data-parallel groups (``set_deepspeed_parallelism``),
  all-reduces expert gradients in the right group and saves every expert in its own
  checkpoint file under the names DeepSpeed expects.
* ``deepspeed.moe.experts.Experts`` holds the local experts, each with its own
  parameters, tagged ``allreduce=False`` / ``group_name`` for
  ``split_params_into_different_moe_groups_for_optimizer``.
* :class:`ExpertDispatcher` is a ``MOELayer`` (same ``gate``/``experts`` attributes,
  same ``l_aux``/``exp_counts`` outputs) whose forward uses our routers
  (``smoe.routing``) and the dropless dispatch in :mod:`smoe.model.dispatch`, built on
  DeepSpeed's ``_AllToAll``. DeepSpeed's own gate is not used: its k = 1 weights are
  not renormalised, it samples the second expert with noise at k = 2, and its
  experts run on every padded capacity slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from deepspeed.utils import groups
from torch import nn

from smoe.model.dispatch import COMBINES, GROUPED_MM_CUDA_MAJORS, default_path, groupable, scaled
from smoe.model.expert_parallel import expert_parallel_combine
from smoe.model.mlp import ACTIVATIONS, MLP
from smoe.routing import ROUTERS, RouterOptions, build_router

DISPATCHES = ("auto", "sorted", "grouped", "masked-dense", "reference")


@dataclass
class MoEConfig:
    d_model: int
    d_ff: int  # width of the dense MLP being replaced; each expert gets d_ff / num_experts
    num_experts: int = 16
    k: int = 1  # top-k at construction; the training loop changes it with SMoE.set_top_k
    router: str = "random-frozen"
    ep_size: int = 1
    activation: str = "relu"  # one of smoe.model.mlp.ACTIVATIONS
    dropout: float = 0.1  # on each expert's hidden units, as in the dense MLP
    router_options: RouterOptions = RouterOptions()  # the router's own options (balance loss, ...)
    vocab_size: int | None = None  # hash router only
    seed: int = 0  # router and expert initialisation: the same on every rank
    init_std: float = 0.02
    dispatch: str = "auto"
    # Each chosen expert's weight is the router's (summing to 1 over the k chosen) times this:
    # None means N (num_experts): inverted dropout, an expected output equal to the dense MLP's
    # (the sum of all N slices) at every k; 1.0 is the paper's mean of k experts. Which is better
    # depends on the model (docs/quality.md; runs take the model's default from the config).
    # Kept as the number, so a slimmed layer (fewer experts) keeps the scale it was trained with.
    combine_scale: float | None = None
    # The experts' kind (smoe.model.mlp.MLP): gated experts compute act(gate x) * up x, the MLPs of
    # Llama, Mistral and Qwen (SwiGLU with activation="silu"); the decoder LMs' MLPs have no biases.
    # output_bias is fc2's alone (None: as bias): an upcycled GPT-2's experts have none, its layer
    # adds the dense output bias once after the mixture (smoe.model.decoder.UpcycledMLP).
    gated: bool = False
    bias: bool = True
    output_bias: bool | None = None

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"MoEConfig.num_experts ({self.num_experts}) must be at least 1")
        if self.d_ff % self.num_experts:
            raise ValueError(f"MoEConfig.d_ff ({self.d_ff}) is not divisible by num_experts ({self.num_experts}): "
                             f"pick num_experts dividing {self.d_ff}")
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"MoEConfig.k ({self.k}) must be between 1 and num_experts ({self.num_experts}): "
                             "lower k or add experts")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ValueError(f"MoEConfig.num_experts ({self.num_experts}) is not divisible by ep_size "
                             f"({self.ep_size}): use an ep_size that divides the number of experts")
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router '{self.router}' is unknown: use one of {', '.join(ROUTERS)}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"MoEConfig.dispatch '{self.dispatch}' is unknown: use one of {', '.join(DISPATCHES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation '{self.activation}' is unknown: "
                             f"use one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoEConfig.dropout ({self.dropout}) must be in [0, 1)")
        if self.combine_scale is None:
            self.combine_scale = float(self.num_experts)
        if not self.combine_scale > 0:
            raise ValueError(f"MoEConfig.combine_scale ({self.combine_scale}) must be positive: use 1 (the paper's) "
                             f"or num_experts ({self.num_experts}, inverted dropout)")
        if self.router == "hash" and not self.vocab_size:
            raise ValueError("MoEConfig.vocab_size is needed by the hash router: set it to the vocabulary size")

    @property
    def has_output_bias(self) -> bool:
        """Whether the experts' fc2 has a bias. ``output_bias`` None stays None (not resolved here), so
        that ``replace(config, bias=False)`` drops both biases."""
        return self.bias if self.output_bias is None else self.output_bias


class ExpertDispatcher(MOELayer):
    """DeepSpeed's MOELayer with our router as its gate and a dropless index dispatch."""

    def __init__(self, router: nn.Module, experts: Experts, config: MoEConfig, ep_rank: int):
        super().__init__(router, experts, f"ep_size_{config.ep_size}", config.ep_size, experts.num_local_experts)
        self.num_experts = config.num_experts
        self.dispatch = config.dispatch
        self.combine_scale = config.combine_scale
        self.ep_rank = ep_rank
        self.auto_paths: dict[int, str] = {}  # k -> the path `auto` runs there, when measured

    def _set_ep_group(self, ep_group):
        # DeepSpeed's version also hands the group to its TopKGate; our routers need none.
        self.ep_group = ep_group

    def path(self) -> str:
        """Which dispatch runs at the current k: ``auto`` takes the fastest measured at this k
        (:func:`smoe.model.autotune.autotune_dispatch`), else masked-dense from k >= 0.875 N. A
        measured ``grouped`` that the experts' dtype or device cannot run (timed in bf16 on an H100,
        evaluated in fp32) takes the rule too: only an explicit ``dispatch=grouped`` refuses."""
        if self.ep_size > 1:
            return "expert-parallel"
        if self.dispatch != "auto":
            return self.dispatch
        k = self.gate.top_k
        measured = self.auto_paths.get(k)
        if measured == "grouped":
            experts = list(self.experts.deepspeed_experts)
            weight = experts[0].fc1.weight
            measured = measured if groupable(experts, weight.dtype, weight.device) else None
        return measured or default_path(k, self.num_experts)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        routes = scaled(self.gate(x_TD, None if token_ids is None else token_ids.reshape(-1)), self.combine_scale)
        self.l_aux = routes.aux_loss
        self.exp_counts = routes.counts_N
        experts = list(self.experts.deepspeed_experts)
        path = self.path()
        if path == "expert-parallel":
            if self.ep_group is None:
                raise RuntimeError(f"this layer has ep_size={self.ep_size} but no expert-parallel group: call "
                                   "set_deepspeed_parallelism() (deepspeed.initialize does) before the first forward")
            y_TD = expert_parallel_combine(experts, x_TD, routes, self.num_experts, self.ep_group, self.ep_rank)
        else:
            if path == "grouped" and not groupable(experts, x_TD.dtype, x_TD.device):
                here = f"{x_TD.dtype} on {x_TD.device.type}"
                if x_TD.is_cuda:
                    here += " (compute capability {}.{})".format(*torch.cuda.get_device_capability(x_TD.device))
                majors = " or ".join(f"{major}.x" for major in GROUPED_MM_CUDA_MAJORS)
                raise ValueError(f"dispatch 'grouped' needs fp32 or bf16 on the CPU, or bf16 on a CUDA GPU of compute "
                                 f"capability {majors} (H100, H200, B200; elsewhere torch's grouped_mm copies the "
                                 f"offsets to the host and loops over the experts), and expert widths (d_model "
                                 f"{x_TD.shape[1]}, d_ff / num_experts {experts[0].d_ff}) of 16-byte "
                                 f"multiples; this is {here}: use dispatch=sorted or dispatch=auto")
            y_TD = COMBINES[path](experts, x_TD, routes)
        return y_TD.reshape(x.shape)


class SMoE(MoE):
    """N experts of width d_ff/N behind a router, with top-k settable at any time.

    ``forward(x, token_ids=None) -> (y, aux_loss, expert_counts)``, DeepSpeed's MoE
    convention; ``token_ids`` is needed by the hash router only.

    ``ep_rank`` says which N/ep_size experts live here (from
    :func:`smoe.model.parallel.init_expert_parallel`). Expert g is initialised from its
    own seed, so the model is the same whatever the expert-parallel layout.
    """

    def __init__(self, config: MoEConfig, ep_rank: int = 0, rank: int = 0):
        # MoE.__init__ would build DeepSpeed's TopKGate; set the attributes the engine and
        # its MoE checkpointing read, and build the dispatcher with our router instead.
        nn.Module.__init__(self)
        if not 0 <= ep_rank < config.ep_size:
            raise ValueError(f"ep_rank ({ep_rank}) must be in [0, ep_size={config.ep_size})")
        self.config = config
        self.num_experts = config.num_experts
        self.ep_size = config.ep_size
        self.num_local_experts = config.num_experts // config.ep_size
        self.expert_group_name = f"ep_size_{config.ep_size}"
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False

        expert = MLP(config.d_model, config.d_ff // config.num_experts, config.activation, config.dropout,
                     config.gated, config.bias, config.has_output_bias)
        router = build_router(config.router, config.router_options, d_model=config.d_model,
                              num_experts=config.num_experts, k=config.k, seed=config.seed,
                              vocab_size=config.vocab_size, rank=rank)
        experts = Experts(expert, self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = ExpertDispatcher(router, experts, config, ep_rank)
        for local_id, expert in enumerate(experts.deepspeed_experts):
            global_id = ep_rank * self.num_local_experts + local_id
            expert.reset_parameters(config.init_std, torch.Generator().manual_seed(self.expert_seed(global_id)))

    def expert_seed(self, global_id: int) -> int:
        return (self.config.seed + 1) * 1_000_003 + global_id

    @property
    def router(self) -> nn.Module:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> list[MLP]:
        return list(self.deepspeed_moe.experts.deepspeed_experts)

    @property
    def ep_rank(self) -> int:
        return self.deepspeed_moe.ep_rank

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def set_top_k(self, k: int) -> None:
        self.router.set_top_k(k)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize``: join the expert-parallel group, and refuse
        a group that would give this rank other experts than it was built with."""
        self._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        group_rank = groups._get_expert_parallel_rank(self.expert_group_name)
        if group_rank != self.ep_rank:
            raise RuntimeError(f"this layer holds the experts of expert-parallel rank {self.ep_rank} but DeepSpeed "
                               f"placed it at rank {group_rank}: build the model with "
                               "ep_rank=init_expert_parallel(ep_size)")

    def load_experts(self, experts: list[MLP]) -> None:
        """Copy this rank's share of N full experts (e.g. from :func:`modularize`)."""
        if len(experts) != self.num_experts:
            raise ValueError(f"got {len(experts)} experts for a layer with num_experts={self.num_experts}")
        first = self.ep_rank * self.num_local_experts
        for local, source in zip(self.local_experts, experts[first:first + self.num_local_experts]):
            local.load_state_dict(source.state_dict())

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None):
        y = self.deepspeed_moe(x, token_ids)
        return y, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts


def global_names(model: nn.Module) -> dict[str, str]:
    """Each state-dict name of ``model`` -> its name on the ep_size 1 model: this rank's local expert
    ids made global (``deepspeed_experts.<local>.`` -> ``deepspeed_experts.<ep_rank * local count + local>.``)."""
    names = {name: name for name in model.state_dict()}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertDispatcher):
            first = module.ep_rank * module.num_local_experts
            for local, expert in enumerate(module.experts.deepspeed_experts):
                for name in expert.state_dict(prefix=f"{prefix}.experts.deepspeed_experts.{local}."):
                    names[name] = name.replace(f"deepspeed_experts.{local}.", f"deepspeed_experts.{first + local}.")
    return names


def moe_layers_of(model: nn.Module) -> list[SMoE]:
    """Every SMoE layer of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, SMoE)]


def top_k_of(model: nn.Module) -> int | None:
    """The k the model's MoE layers run at now (the first one's, where a slice gives them different
    ones: :func:`top_ks_of`); None for a dense model."""
    layers = moe_layers_of(model)
    return layers[0].top_k if layers else None


def top_ks_of(model: nn.Module) -> list[int]:
    """The k of each MoE layer, in module order."""
    return [layer.top_k for layer in moe_layers_of(model)]


def set_top_k(model: nn.Module, k: int | Sequence[int]) -> None:
    """Every MoE layer of the model to top-k ``k`` (self-slimming at inference, the schedule in training),
    or MoE layer i to ``k[i]``: a per-layer slice, any mix of ks from 1 to N."""
    layers = moe_layers_of(model)
    ks = [k] * len(layers) if isinstance(k, int) else [int(layer_k) for layer_k in k]
    if len(ks) != len(layers):
        raise ValueError(f"{len(ks)} per-layer ks for a model with {len(layers)} MoE layers: give one k, or one "
                         f"per MoE layer ({len(layers)})")
    for layer, layer_k in zip(layers, ks):
        layer.set_top_k(layer_k)
