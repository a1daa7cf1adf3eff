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
:func:`native_export` takes an in-memory model, so an upcycled directory (`smoe export
UPCYCLED_DIR OUT`) and a trained causal-LM run export alike.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from smoe.launcher.evaluation.metrics import active_parameters, sparse_flops
from smoe.launcher.export.verify import CHECK_LENGTH, check_at_every_k, padded_ids, staged
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic
from smoe.model.decoder import HF_ACTIVATIONS, UPCYCLING_FILE, UpcycledMLP, load_upcycled
from smoe.model.moe import SMoE, set_top_k, top_k_of

WEIGHTS_FILE = "model.safetensors"
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


def is_upcycled(path: Path) -> bool:
    """Whether ``path`` is an upcycled directory (`smoe upcycle`'s output)."""
    return (Path(path) / UPCYCLING_FILE).is_file()


def target_of(model: nn.Module) -> Target:
    """The native class ``model`` exports to, or a refusal saying what cannot be held."""
    config = model.config
    if config.model_type not in TARGETS:
        raise ValueError(f"a '{config.model_type}' model has no native transformers MoE class to export to (llama, "
                         "mistral -> MixtralForCausalLM, qwen3 -> Qwen3MoeForCausalLM); the remote-code export of "
                         "upcycled decoder LMs is not built yet")
    target = TARGETS[config.model_type]
    for name, value in target.fixed.items():
        if getattr(config, name, value) != value:
            raise ValueError(f"the '{config.model_type}' model has {name}={getattr(config, name)}, which "
                             f"{target.architecture} cannot hold: the native export cannot represent this model")
    return target


def expert_layers(model: nn.Module, target: Target) -> dict[int, SMoE]:
    """Decoder layer index -> its SMoE layer, checked to be what the native class can hold."""
    decoder_layers = model.model.layers
    layers = {i: layer.mlp.moe for i, layer in enumerate(decoder_layers) if isinstance(layer.mlp, UpcycledMLP)}
    cannot = f"{target.architecture} cannot hold it: the native export cannot represent this model"
    if not layers:
        raise ValueError("the model has no MoE layer: nothing to export as an MoE")
    if not target.dense_layers and len(layers) < len(decoder_layers):
        dense = sorted(set(range(len(decoder_layers))) - set(layers))
        raise ValueError(f"layers {dense} of the model are dense and {cannot} (every layer must be an MoE layer: "
                         "upcycle with --moe-layers all)")
    activation = HF_ACTIVATIONS.get(model.config.hidden_act)
    for index, moe in layers.items():
        proj = getattr(moe.router, "proj", None)
        problem = ("its experts live on several ranks (ep_size > 1): pass the whole model" if moe.ep_size > 1 else
                   f"its router '{moe.config.router}' has no projection to be a gate" if proj is None else
                   "its router has a bias" if getattr(proj, "bias", None) is not None and proj.bias.any() else
                   "its experts are not gated or have biases" if not moe.config.gated or moe.config.bias else
                   f"its experts' activation '{moe.config.activation}' is not the config's" if
                   moe.config.activation != activation else
                   "its number of experts differs from the first layer's"
                   if moe.num_experts != next(iter(layers.values())).num_experts else None)
        if problem:
            raise ValueError(f"layer {index}: {problem}, and {cannot}")
    return layers


def native_config(model: nn.Module, target: Target, layers: dict[int, SMoE], top_k: int, dtype: torch.dtype):
    """The native class's config: the dense model's own fields it knows, and the experts'."""
    from transformers import AutoConfig

    config = model.config
    known = set(AutoConfig.for_model(target.model_type).to_dict()) | {"head_dim"}
    values = {name: value for name, value in config.to_dict().items() if name in known
              and name not in ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype")}
    first = next(iter(layers.values()))
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


def native_state(model: nn.Module, target: Target, layers: dict[int, SMoE], dtype: torch.dtype) -> dict:
    """The tensors under the published checkpoints' names: the model's own, less the MoE layers',
    plus each layer's gate (fp32) and experts (combine_scale folded into the down projection)."""
    state = {name: tensor for name, tensor in model.state_dict().items() if ".mlp.moe." not in name}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings again on load
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in state.items()}
    for index, moe in layers.items():
        prefix = f"model.layers.{index}.{target.block}."
        state[prefix + "gate.weight"] = moe.router.proj.weight.detach().to("cpu", torch.float32)
        gate_name, up_name, down_name = target.expert_names
        for expert_id, expert in enumerate(moe.local_experts):
            gate, up = expert.fc1.weight.detach().float().chunk(2)
            down = expert.fc2.weight.detach().float() * moe.config.combine_scale
            for name, tensor in ((gate_name, gate), (up_name, up), (down_name, down)):
                state[f"{prefix}experts.{expert_id}.{name}.weight"] = tensor.to("cpu", dtype)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def set_native_top_k(native: nn.Module, k: int) -> None:
    """Every router of a loaded native model to top-k ``k`` (what ``num_experts_per_tok=k`` gives at load)."""
    native.config.num_experts_per_tok = k
    for module in native.modules():
        if hasattr(module, "top_k"):
            module.top_k = k


@torch.no_grad()
def check_native(reference: nn.Module, directory: Path, target: Target, num_experts: int) -> float:
    """Load ``directory`` with plain transformers (fp32) and compare its logits with smoe's at every k;
    raises on a tensor it does not load or a difference above the tolerance."""
    from transformers import AutoModelForCausalLM

    native, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    wrong = {key: value for key, value in info.items() if value and key != "error_msgs"}
    if wrong or type(native).__name__ != target.architecture:
        raise RuntimeError(f"transformers loads the export as {type(native).__name__} with {wrong}: the export is "
                           "wrong, please report it")
    native.eval()
    length = min(CHECK_LENGTH, reference.config.max_position_embeddings)
    inputs = padded_ids(reference.config.vocab_size, (2, length))

    def smoe_logits(k):
        set_top_k(reference, k)
        return reference(**inputs).logits

    def native_logits(k):
        set_native_top_k(native, k)
        return native(**inputs).logits

    return check_at_every_k(list(range(1, num_experts + 1)), smoe_logits, native_logits)


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


def native_card(name: str, target: Target, config, rows: list[dict], difference: float, origin: str) -> str:
    """The README.md of the exported directory ``name``: what it is, how to load it at any k, cost by k."""
    n = config.num_local_experts
    mlp_only = getattr(config, "mlp_only_layers", [])
    where = "every layer" if not mlp_only else f"every layer but {mlp_only}"
    table = ["| k | active params | GFLOPs/token |", "|---|---|---|"]
    table += [f"| {row['k']} | {row['active_params']:,} | {row['flops_per_token'] / 1e9:.4g} |" for row in rows]
    return "\n".join([
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- smoe\n- smoe-dropout\n"
        f"- mixture-of-experts\n- self-slimmable\n- {target.model_type}\n---\n",
        f"# {name}\n",
        f"A self-slimmable mixture of experts ({target.architecture}): the MLP of {where} is {n} experts, of "
        f"which each token uses k (`num_experts_per_tok`, {config.num_experts_per_tok} by default). Any k from 1 "
        f"to {n} works; cost rises with k. Exported by `smoe export` from {origin}.\n",
        "## Load it\n",
        "Plain transformers, no `trust_remote_code`:\n",
        "```python\nfrom transformers import AutoModelForCausalLM\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}", num_experts_per_tok={config.num_experts_per_tok})\n'
        "```\n",
        "The router computes its logits in the model's dtype: a bf16 load routes some tokens differently from "
        "fp32 (docs/export.md of smoe measures how many).\n",
        "## Cost by k\n",
        "\n".join(table) + "\n",
        f"Counted by smoe on the model (forward, per token). The export was checked against smoe at every k in fp32: "
        f"the largest logit difference was {difference:.1e} (relative).\n",
    ])


def copy_tokenizer(source: Path, directory: Path) -> None:
    """The tokenizer's files and the generation config, where ``source`` has them."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)


def native_export(model: nn.Module, out: Path, top_k: int | None = None, tokenizer_dir: Path | None = None,
                  origin: str = "an in-memory model") -> dict:
    """Write ``model`` (an upcycled or trained causal LM, any device and dtype, ep_size 1) to ``out`` as
    its native transformers MoE class, loading at ``top_k`` (default: the model's k); copy the tokenizer
    and generation config from ``tokenizer_dir``. ``out`` appears only once transformers has loaded it
    back and matched smoe's logits at every k (fp32, :data:`~smoe.launcher.export.verify.TOLERANCE`).
    The model is left as it was. Returns the facts of the card."""
    out = Path(out)
    target = target_of(model)
    layers = expert_layers(model, target)
    num_experts = next(iter(layers.values())).num_experts
    top_k = top_k_of(model) if top_k is None else top_k
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the model's num_experts ({num_experts})")
    dtype = model.get_input_embeddings().weight.dtype
    reference = model
    if dtype != torch.float32 or model.device.type != "cpu":
        reference = copy.deepcopy(model).to("cpu", torch.float32)  # the check runs in fp32
    was_training, was_k = reference.training, top_k_of(reference)
    reference.eval()
    try:
        with staged(out) as staging:
            from safetensors.torch import save_file

            config = native_config(model, target, layers, top_k, dtype)
            values = {**config.to_dict(), **published_fields(config, target)}
            write_atomic(staging / "config.json", json.dumps(values, indent=2, sort_keys=True) + "\n")
            save_file(native_state(model, target, layers, dtype), str(staging / WEIGHTS_FILE),
                      metadata={"format": "pt"})
            if tokenizer_dir is not None:
                copy_tokenizer(Path(tokenizer_dir), staging)
            difference = check_native(reference, staging, target, num_experts)
            log.info(f"the export loads as {target.architecture} and matches smoe at every k (1 to {num_experts}): "
                     f"largest difference {difference:.1e}")
            facts = {"architecture": target.architecture, "num_experts": num_experts, "num_experts_per_tok": top_k,
                     "max_difference": difference, "rows": cost_rows(reference, num_experts)}
            write_atomic(staging / "README.md", native_card(out.name, target, config, facts["rows"], difference,
                                                            origin))
    finally:
        set_top_k(reference, was_k)
        reference.train(was_training)
    return facts


def export_upcycled(directory: Path, out: Path, top_k: int | None = None) -> dict:
    """`smoe export UPCYCLED_DIR OUT`: the upcycled directory (at k = N, the dense model) as a native MoE."""
    model = load_upcycled(Path(directory)).eval()
    facts = native_export(model, out, top_k, tokenizer_dir=directory, origin=f"the upcycled directory `{directory}`")
    log.info(f"wrote {out}: {facts['architecture']}, {facts['num_experts']} experts, k={facts['num_experts_per_tok']} "
             f"by default; load it with AutoModelForCausalLM.from_pretrained('{out}', num_experts_per_tok=k)")
    return facts


def export_causal_run(model: nn.Module, out: Path, top_k: int | None, tokenizer_dir: Path, origin: str) -> None:
    """`smoe export RUN OUT` of a causal-LM run: an MoE as its native MoE class (:func:`native_export`), a
    dense model as its own transformers class (the upcycling study's pretrained model), loaded back and
    matched with smoe before OUT appears."""
    if any(isinstance(module, UpcycledMLP) for module in model.modules()):
        facts = native_export(model, out, top_k, tokenizer_dir=tokenizer_dir, origin=origin)
        log.info(f"wrote {out}: {facts['architecture']}, {facts['num_experts']} experts, "
                 f"k={facts['num_experts_per_tok']} by default")
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
