"""The remote-code export of an upcycled decoder LM that no native transformers MoE class holds.

GPT-2 and Qwen2 (no native MoE class here), a Llama or Mistral with layers left dense (Mixtral has
none), and whatever else :func:`smoe.launcher.export.native.native_obstacle` names: transformers' own
causal LM of the dense model (``GPT2LMHeadModel``, ``Qwen2ForCausalLM``, ...) whose expert layers'
``mlp`` is smoe's :class:`~smoe.model.mixture.ExpertMixture` (:func:`smoe.model.hub.slimmable_decoder`).
It writes ``config.json`` (the dense config's own fields, the experts' and ``auto_map``),
``modeling_smoe.py`` (smoe's torch-only modules, :mod:`smoe.launcher.export.bundle`) and
``model.safetensors`` (fp32). Load it with

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True, num_experts_per_tok=k)

where neither smoe nor DeepSpeed is installed. The check and the card are
:func:`smoe.launcher.export.native.export_decoder`'s, as for a native export.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from smoe.launcher.export.bundle import MODELING_FILE, MODELING_MODULE, bundle, import_modeling
from smoe.model.decoder import UpcycledMLP

# The dense config's keys that the exported config sets itself (or transformers does, on save).
LEFT_OUT = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map", "dtype", "use_cache")


def exported_mixture(mlp: UpcycledMLP) -> tuple[dict, dict[str, torch.Tensor]]:
    """An upcycled layer as the exported :class:`~smoe.model.hub.MixtureMLP`: the config fields that build
    it (:class:`~smoe.model.hub.UpcycledDecoderFields`) and its tensors under its names. The one place that
    maps the one onto the other."""
    moe, first = mlp.moe, mlp.moe.local_experts[0]
    fields = {"num_experts": moe.num_experts, "router": moe.config.router,
              "router_options": asdict(moe.config.router_options), "combine_scale": float(moe.config.combine_scale),
              "moe_intermediate_size": first.d_ff, "expert_activation": first.activation_name,
              "gated_experts": first.gated, "expert_bias": first.has_bias, "output_bias": mlp.output_bias is not None}
    state = {f"moe.router.{name}": tensor for name, tensor in moe.router.state_dict().items()}
    for expert_id, expert in enumerate(moe.local_experts):
        state.update({f"moe.experts.{expert_id}.{name}": tensor for name, tensor in expert.state_dict().items()})
    if mlp.output_bias is not None:
        state["output_bias"] = mlp.output_bias
    return fields, state


def write_remote(model: nn.Module, layers: dict[int, UpcycledMLP], top_k: int, directory: Path) -> str:
    """``modeling_smoe.py``, ``config.json`` and ``model.safetensors`` of ``model`` (fp32, on the CPU; its MoE
    layers by decoder layer index: ``layers``) into ``directory``; returns the exported class's name."""
    (directory / MODELING_FILE).write_text(bundle())
    modeling = import_modeling(directory / MODELING_FILE)
    model_type = model.config.model_type
    if model_type not in modeling.DECODERS:
        raise ValueError(f"a '{model_type}' model has no exported class in smoe.model.hub (there are "
                         f"{', '.join(modeling.DECODERS)}): add its slimmable_decoder line to export it")
    config_class, model_class = modeling.DECODERS[model_type]
    names = {module: name for name, module in model.named_modules()}
    mixtures = {names[mlp]: exported_mixture(mlp) for mlp in layers.values()}
    values = {name: value for name, value in model.config.to_dict().items() if name not in LEFT_OUT}
    values.update(next(iter(mixtures.values()))[0], num_experts_per_tok=top_k, expert_layers=sorted(layers),
                  use_cache=True, dtype="float32")
    config = config_class(**values)
    config.auto_map = {"AutoConfig": f"{MODELING_MODULE}.{config_class.__name__}",
                       "AutoModelForCausalLM": f"{MODELING_MODULE}.{model_class.__name__}"}
    state = {name: tensor for name, tensor in model.state_dict().items()
             if not any(name.startswith(prefix + ".") for prefix in mixtures)}
    for prefix, (_, mixture_state) in mixtures.items():
        state.update({f"{prefix}.{name}": tensor for name, tensor in mixture_state.items()})
    exported = model_class(config)
    exported.load_state_dict(state, strict=True)
    exported.save_pretrained(directory)
    return model_class.__name__
