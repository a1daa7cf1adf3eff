"""`smoe export` of an upcycled decoder LM as transformers' own MoE class: no trust_remote_code.

Llama and Mistral become ``MixtralForCausalLM`` (every layer must be an MoE layer: Mixtral has
no dense ones), Qwen3 becomes ``Qwen3MoeForCausalLM`` (layers left dense go in
``mlp_only_layers``). The tensors are written under the names and in the layout of the published
Mixtral / Qwen3-MoE checkpoints (one ``w1``/``w3``/``w2`` or ``gate_proj``/``up_proj``/``down_proj``
per expert), which transformers 5 fuses on load and which older transformers and the converters
of vLLM and llama.cpp read as they are.

The native router takes the softmax over all N logits in fp32, the k largest probabilities,
renormalised; smoe's routers compute the same (:func:`smoe.routing.routers.top_k_softmax`), so
smoe's router projection is the gate's weight as it is (a router bias must be zero: the gate has
none). ``combine_scale`` (a layer's output is ``combine_scale * sum_i w_i expert_i(x)``) is folded
into each expert's down projection. The gate is written in fp32; a bf16 load computes its logits
in bf16, which changes some routes (docs/export.md measures how many).

Load with ``AutoModelForCausalLM.from_pretrained(OUT, num_experts_per_tok=k)``, any k from 1 to N.

:func:`export_decoder` is what `smoe export` runs on an upcycled directory or a causal-LM run: the
native class where one holds the model (:func:`native_obstacle` says why not), else the remote-code
export (:mod:`smoe.launcher.export.remote_decoder`: GPT-2, Qwen2, Llama or Mistral with layers left
dense, ...). Both are checked and carded alike; :func:`native_export` is the native class or a refusal.
Either takes an in-memory model, so an upcycled directory and a trained run export alike. What no
export holds is refused by name (:func:`moe_layers_by_index`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from smoe.launcher.evaluation.metrics import active_parameters, sparse_flops
from smoe.launcher.export import slices as exported_slices
from smoe.launcher.export.remote_decoder import write_remote
from smoe.launcher.export.verify import CHECK_LENGTH, check_at_every_k, padded_ids, staged
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic
from smoe.model.decoder import HF_ACTIVATIONS, UPCYCLING_FILE, UpcycledMLP, architecture_of, load_upcycled
from smoe.model.moe import set_top_k, top_k_of

WEIGHTS_FILE = "model.safetensors"
DETERMINISTIC_ROUTERS = ("random-frozen", "learned")  # of the routers upcycling builds: the same routes every call
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class Target:
    """A native MoE class and how its published checkpoints name an MoE layer's tensors."""

    model_type: str
    architecture: str
    block: str  # the MoE block's name in a decoder layer of the published checkpoints
    expert_names: tuple[str, str, str]  # the gate, up and down projections of one expert
    dense_layers: bool  # whether the class can keep some layers' dense MLP
    fixed: dict = field(default_factory=dict)  # source config field -> the only value the class can hold
    published_keys: tuple[str, ...] = ()  # config.json keys under the published checkpoints' names


MIXTRAL = Target("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), dense_layers=False)
QWEN3_MOE = Target("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                   dense_layers=True, fixed={"use_sliding_window": False}, published_keys=("num_experts",))
TARGETS = {"llama": replace(MIXTRAL, fixed={"attention_bias": False, "mlp_bias": False}), "mistral": MIXTRAL,
           "qwen3": QWEN3_MOE}


def moe_layers_by_index(model: nn.Module) -> dict[int, UpcycledMLP]:
    """Decoder layer index -> its :class:`UpcycledMLP`, refusing what no export can hold: a model
    without one, experts spread over ranks, a router that draws new experts at every call, layers with
    different numbers of experts."""
    architecture, _ = architecture_of(model.config)
    layers = {i: layer.mlp for i, layer in enumerate(architecture.layers(model)) if isinstance(layer.mlp, UpcycledMLP)}
    if not layers:
        raise ValueError("the model has no MoE layer: nothing to export as an MoE")
    num_experts = next(iter(layers.values())).moe.num_experts
    for index, mlp in layers.items():
        moe = mlp.moe
        problem = ("its experts live on several ranks (ep_size > 1): pass the whole model" if moe.ep_size > 1 else
                   f"its router '{moe.config.router}' draws new experts at every call: only "
                   f"{' and '.join(DETERMINISTIC_ROUTERS)} routers are exported (a deployed model must route alike "
                   "every time)" if moe.config.router not in DETERMINISTIC_ROUTERS else
                   f"it has {moe.num_experts} experts and layer {next(iter(layers))} {num_experts}: every layer must "
                   "have as many" if moe.num_experts != num_experts else None)
        if problem:
            raise ValueError(f"layer {index}: {problem}")
    return layers


def native_obstacle(model: nn.Module, layers: dict[int, UpcycledMLP]) -> str | None:
    """Why no native transformers MoE class can hold ``model`` (whose MoE layers are ``layers``), or None."""
    config = model.config
    if config.model_type not in TARGETS:
        return (f"a '{config.model_type}' model has no native transformers MoE class (llama, mistral -> "
                "MixtralForCausalLM, qwen3 -> Qwen3MoeForCausalLM)")
    target = TARGETS[config.model_type]
    for name, value in target.fixed.items():
        if getattr(config, name, value) != value:
            return (f"the '{config.model_type}' model has {name}={getattr(config, name)}, which "
                    f"{target.architecture} cannot hold")
    if not target.dense_layers and len(layers) < config.num_hidden_layers:
        dense = sorted(set(range(config.num_hidden_layers)) - set(layers))
        return f"layers {dense} of the model are dense, which {target.architecture} cannot hold (it has no dense layer)"
    activation = HF_ACTIVATIONS.get(model.config.hidden_act)
    for index, mlp in layers.items():
        moe, bias = mlp.moe, mlp.moe.router.proj.bias
        problem = ("its router has a bias" if bias is not None and bias.any() else
                   "its experts are not gated or have biases" if not moe.config.gated or moe.config.bias else
                   f"its experts' activation '{moe.config.activation}' is not the config's" if
                   moe.config.activation != activation else None)
        if problem:
            return f"layer {index}: {problem}, which {target.architecture} cannot hold"
    return None


def native_config(model: nn.Module, target: Target, layers: dict[int, UpcycledMLP], top_k: int,
                  dtype: torch.dtype):
    """The native class's config: the dense model's own fields it knows, and the experts'."""
    from transformers import AutoConfig

    config = model.config
    known = set(AutoConfig.for_model(target.model_type).to_dict()) | {"head_dim"}
    values = {name: value for name, value in config.to_dict().items() if name in known
              and name not in ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype")}
    first = next(iter(layers.values())).moe
    width = first.local_experts[0].d_ff
    values.update(num_experts_per_tok=top_k, output_router_logits=False, architectures=[target.architecture],
                  dtype=str(dtype).removeprefix("torch."))
    if target.dense_layers:  # Qwen3-MoE
        values.update(num_experts=first.num_experts, moe_intermediate_size=width, norm_topk_prob=True,
                      decoder_sparse_step=1,
                      mlp_only_layers=[i for i in range(config.num_hidden_layers) if i not in layers])
    else:
        values.update(num_local_experts=first.num_experts, intermediate_size=width, router_jitter_noise=0.0)
    return AutoConfig.for_model(target.model_type, **values)


def published_fields(config, target: Target) -> dict:
    """config.json keys as the published checkpoints spell them, for readers older than transformers 5:
    Qwen3-MoE's ``num_experts`` and the top-level ``rope_theta`` (whose default differs between classes)."""
    values = {key: getattr(config, key) for key in target.published_keys}
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    return values


def native_state(model: nn.Module, target: Target, layers: dict[int, UpcycledMLP], dtype: torch.dtype) -> dict:
    """The tensors under the published checkpoints' names: the model's own, less the MoE layers',
    plus each layer's gate (fp32) and experts (combine_scale folded into the down projection)."""
    state = {name: tensor for name, tensor in model.state_dict().items() if ".mlp.moe." not in name}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings again on load
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in state.items()}
    for index, mlp in layers.items():
        moe = mlp.moe
        prefix = f"model.layers.{index}.{target.block}."
        state[prefix + "gate.weight"] = moe.router.proj.weight.detach().to("cpu", torch.float32)
        gate_name, up_name, down_name = target.expert_names
        for expert_id, expert in enumerate(moe.local_experts):
            gate, up = expert.fc1.weight.detach().float().chunk(2)
            down = expert.fc2.weight.detach().float() * moe.config.combine_scale
            for name, tensor in ((gate_name, gate), (up_name, up), (down_name, down)):
                state[f"{prefix}experts.{expert_id}.{name}.weight"] = tensor.to("cpu", dtype)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def write_native(model: nn.Module, layers: dict[int, UpcycledMLP], top_k: int, dtype: torch.dtype,
                 directory: Path) -> str:
    """``config.json`` and ``model.safetensors`` of the native class into ``directory``; returns its name."""
    from safetensors.torch import save_file

    target = TARGETS[model.config.model_type]
    config = native_config(model, target, layers, top_k, dtype)
    values = {**config.to_dict(), **published_fields(config, target)}
    write_atomic(directory / "config.json", json.dumps(values, indent=2, sort_keys=True) + "\n")
    save_file(native_state(model, target, layers, dtype), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return target.architecture


def set_native_top_k(native: nn.Module, k: int | list[int]) -> None:
    """Every router of a loaded native model to top-k ``k`` (what ``num_experts_per_tok=k`` gives at load), or
    each MoE layer's to its own (a slice: the loop of its card, :func:`smoe.launcher.export.slices.loading_code`)."""
    layers = [layer for layer in native.model.layers if any(hasattr(m, "top_k") for m in layer.modules())]
    ks = [k] * len(layers) if isinstance(k, int) else list(k)
    if len(ks) != len(layers):
        raise ValueError(f"{len(ks)} ks for a model with {len(layers)} MoE layers: give one per MoE layer")
    for layer, layer_k in zip(layers, ks):
        for module in layer.modules():
            if hasattr(module, "top_k"):
                module.top_k = layer_k
    if isinstance(k, int):
        native.config.num_experts_per_tok = k


@torch.no_grad()
def check_export(reference: nn.Module, directory: Path, architecture: str, num_experts: int, remote: bool,
                 slices: list[list[int]] = ()) -> float:
    """Load ``directory`` with transformers (fp32; its own class, or ``remote`` code) and compare its logits
    with smoe's at every k and every slice; raises on a tensor it does not load or a difference above the
    tolerance."""
    from transformers import AutoModelForCausalLM

    exported, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True,
                                                          trust_remote_code=remote)
    wrong = {key: value for key, value in info.items() if value and key != "error_msgs"}
    if wrong or type(exported).__name__ != architecture:
        raise RuntimeError(f"transformers loads the export as {type(exported).__name__} with {wrong}: the export is "
                           "wrong, please report it")
    exported.eval()
    length = min(CHECK_LENGTH, reference.config.max_position_embeddings)
    inputs = padded_ids(reference.config.vocab_size, (2, length))

    def smoe_logits(k):
        set_top_k(reference, k)
        return reference(**inputs).logits

    def exported_logits(k):
        exported.set_top_k(k) if remote else set_native_top_k(exported, k)
        return exported(**inputs).logits

    return check_at_every_k(list(range(1, num_experts + 1)) + list(slices), smoe_logits, exported_logits)


@torch.no_grad()
def cost_rows(reference: nn.Module, num_experts: int) -> list[dict]:
    """Active parameters and forward FLOPs per token at every k, counted on smoe's model."""
    ids = torch.randint(reference.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    for k in range(1, num_experts + 1):
        set_top_k(reference, k)
        rows.append({"k": k, "active_params": active_parameters(reference, k),
                     "flops_per_token": sparse_flops(reference, lambda: reference(input_ids=ids)) / ids.numel()})
    return rows


def decoder_card(name: str, facts: dict, origin: str, slices: dict | None = None) -> str:
    """The README.md of the exported directory ``name``: what it is, how to load it at any k, cost by k."""
    n, k, dense, remote = facts["num_experts"], facts["num_experts_per_tok"], facts["dense_layers"], facts["remote"]
    where = "every layer" if not dense else f"every layer but {dense}"
    table = ["| k | active params | GFLOPs/token |", "|---|---|---|"]
    table += [f"| {row['k']} | {row['active_params']:,} | {row['flops_per_token'] / 1e9:.4g} |"
              for row in facts["rows"]]
    if remote:
        how = ("With transformers' remote code (`modeling_smoe.py`: smoe's own modules, needing torch and "
               "transformers only):\n")
        loading = (f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, '
                   f"num_experts_per_tok={k})\nmodel.set_top_k({max(1, k // 2)})  # any k from 1 to {n}, at any time\n")
        dtype = ("A bf16 load keeps the random-frozen router's projection in fp32; its input, the hidden state, is "
                 "bf16, so some tokens can route differently from fp32.\n")
    else:
        how = "Plain transformers, no `trust_remote_code`:\n"
        loading = f'model = AutoModelForCausalLM.from_pretrained("{name}", num_experts_per_tok={k})\n'
        dtype = ("The router computes its logits in the model's dtype: a bf16 load routes some tokens differently "
                 "from fp32 (docs/export.md of smoe measures how many).\n")
    return "\n".join([
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- smoe\n- smoe-dropout\n"
        f"- mixture-of-experts\n- self-slimmable\n- {facts['model_type']}\n---\n",
        f"# {name}\n",
        f"A self-slimmable mixture of experts ({facts['architecture']}): the MLP of {where} is {n} experts, of "
        f"which each token uses k (`num_experts_per_tok`, {k} by default). Any k from 1 to {n} works; cost rises "
        f"with k. Exported by `smoe export` from {origin}.\n",
        "## Load it\n",
        how,
        "```python\nfrom transformers import AutoModelForCausalLM\n\n" + loading + "```\n",
        dtype,
        "## Cost by k\n",
        "\n".join(table) + "\n",
        f"Counted by smoe on the model (forward, per token). The export was checked against smoe at every k"
        f"{' and slice' if slices else ''} in fp32: the largest logit difference was {facts['max_difference']:.1e} "
        "(relative).\n",
        *([exported_slices.card_section(name, slices, "AutoModelForCausalLM", native=not remote)] if slices else []),
    ])


def copy_tokenizer(source: Path, directory: Path) -> None:
    """The tokenizer's files and the generation config, where ``source`` has them."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)


@contextlib.contextmanager
def fp32_reference(model: nn.Module):
    """``model`` in fp32 on the CPU and in eval mode (a copy where it is elsewhere or in another dtype), for
    the check; put back at its k and mode afterwards."""
    reference = model
    if model.get_input_embeddings().weight.dtype != torch.float32 or model.device.type != "cpu":
        reference = copy.deepcopy(model).to("cpu", torch.float32)
    was_training, was_k = reference.training, top_k_of(reference)
    reference.eval()
    try:
        yield reference
    finally:
        set_top_k(reference, was_k)
        reference.train(was_training)


def export_decoder(model: nn.Module, out: Path, top_k: int | None = None, tokenizer_dir: Path | None = None,
                   origin: str = "an in-memory model", native_only: bool = False, slices: dict | None = None) -> dict:
    """Write ``model`` (an upcycled or trained causal LM, any device and dtype, ep_size 1) to ``out``: as its
    native transformers MoE class where one holds it, else (unless ``native_only``) with remote code
    (:mod:`smoe.launcher.export.remote_decoder`); loading at ``top_k`` (default: the model's k). Copies the
    tokenizer and generation config from ``tokenizer_dir``, and ``slices`` (the run's slices.json) with its
    card. ``out`` appears only once transformers has loaded it back and matched smoe's logits at every k and
    slice (fp32, :data:`~smoe.launcher.export.verify.TOLERANCE`). The model is left as it was. Returns the
    facts of the card."""
    out = Path(out)
    layers = moe_layers_by_index(model)
    obstacle = native_obstacle(model, layers)
    if obstacle and native_only:
        raise ValueError(f"{obstacle}: the native export cannot represent this model (`smoe export` writes it with "
                         "remote code)")
    num_experts = next(iter(layers.values())).moe.num_experts
    top_k = top_k_of(model) if top_k is None else top_k
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the model's num_experts ({num_experts})")
    with fp32_reference(model) as reference, staged(out) as staging:
        if obstacle is None:
            architecture = write_native(model, layers, top_k, model.get_input_embeddings().weight.dtype, staging)
        else:
            log.info(f"{obstacle}: exporting with remote code (load it with trust_remote_code=True)")
            architecture = write_remote(reference, moe_layers_by_index(reference), top_k, staging)
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), staging)
        difference = check_export(reference, staging, architecture, num_experts, remote=obstacle is not None,
                                  slices=exported_slices.settings(slices))
        checked = f"every k (1 to {num_experts})" + (f" and slice ({len(slices['slices'])})" if slices else "")
        log.info(f"the export loads as {architecture} and matches smoe at {checked}: largest difference "
                 f"{difference:.1e}")
        if slices:
            exported_slices.write(slices, sorted(layers), staging)
        facts = {"architecture": architecture, "remote": obstacle is not None, "num_experts": num_experts,
                 "num_experts_per_tok": top_k, "max_difference": difference,
                 "model_type": TARGETS[model.config.model_type].model_type if obstacle is None
                 else model.config.model_type,
                 "dense_layers": [i for i in range(model.config.num_hidden_layers) if i not in layers],
                 "rows": cost_rows(reference, num_experts)}
        write_atomic(staging / "README.md", decoder_card(out.name, facts, origin, slices))
    return facts


def native_export(model: nn.Module, out: Path, top_k: int | None = None, tokenizer_dir: Path | None = None,
                  origin: str = "an in-memory model") -> dict:
    """:func:`export_decoder` as transformers' own MoE class only: refuses, by name, what it cannot hold."""
    return export_decoder(model, out, top_k, tokenizer_dir, origin, native_only=True)


def is_upcycled(path: Path) -> bool:
    """Whether ``path`` is an upcycled directory (`smoe upcycle`'s output)."""
    return (Path(path) / UPCYCLING_FILE).is_file()


def export_upcycled(directory: Path, out: Path, top_k: int | None = None) -> dict:
    """`smoe export UPCYCLED_DIR OUT`: the upcycled directory (at k = N, the dense model) as an MoE."""
    model = load_upcycled(Path(directory)).eval()
    facts = export_decoder(model, out, top_k, tokenizer_dir=directory,
                           origin=f"the upcycled directory `{directory}`")
    log.info(f"wrote {out}: {loaded_as(facts)}")
    return facts


def loaded_as(facts: dict) -> str:
    """What an exported directory is and how it loads, for the log."""
    remote = ", trust_remote_code=True" if facts["remote"] else ""
    return (f"{facts['architecture']}, {facts['num_experts']} experts, k={facts['num_experts_per_tok']} by default; "
            f"load it with AutoModelForCausalLM.from_pretrained(OUT{remote}, num_experts_per_tok=k)")


def export_causal_run(model: nn.Module, out: Path, top_k: int | None, tokenizer_dir: Path, origin: str,
                      slices: dict | None = None) -> None:
    """`smoe export RUN OUT` of a causal-LM run: an MoE through :func:`export_decoder` (with the run's
    ``slices``), a dense model as its own transformers class (the upcycling study's pretrained model), loaded
    back and matched with smoe before OUT appears."""
    if any(isinstance(module, UpcycledMLP) for module in model.modules()):
        facts = export_decoder(model, out, top_k, tokenizer_dir=tokenizer_dir, origin=origin, slices=slices)
        log.info(f"wrote {out}: {loaded_as(facts)}")
        return
    from transformers import AutoModelForCausalLM

    if top_k is not None:
        raise ValueError(f"--k {top_k}: {origin} is dense (no experts), so there is no k to choose; drop --k")
    model = model.eval()
    with staged(out) as staging:
        model.config.use_cache = True  # the run's training setting off: generation uses the cache
        model.save_pretrained(staging)
        copy_tokenizer(Path(tokenizer_dir), staging)
        loaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        inputs = padded_ids(model.config.vocab_size, (2, min(CHECK_LENGTH, model.config.max_position_embeddings)))
        check_at_every_k([None], lambda k: model(**inputs).logits, lambda k: loaded(**inputs).logits)
    log.info(f"wrote {out}: {type(model).__name__} (dense), from {origin}")
