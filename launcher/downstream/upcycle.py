"""`smoe upcycle MODEL OUT --num-experts N` (`smoe convert` is the same command): a dense
Hugging Face model whose MLPs become SMoE-Dropout experts, written as a new directory.

MODEL is a local transformers directory or a hub id (downloaded by ``from_pretrained``).
Each selected layer's MLP has its neurons put in the order of ``--split`` (a permutation:
the same function), is cut into N experts of d_ff / N neurons and gets a router whose
weights are flattened to equal, so that at k = N the model is the dense one:

- decoder LMs (llama, mistral, qwen2, qwen3, gpt2) become an upcycled directory
  (:mod:`smoe.model.decoder`: the dense config.json, upcycling.json, model.safetensors);
- BERT/RoBERTa masked-LMs become a transformers directory with smoe's config fields
  (:func:`smoe.model.bert.from_dense`), what `smoe finetune` takes.

The tokenizer and the generation config go along when MODEL has them. Before OUT appears,
the written model is loaded back and run at k = N against the dense one on random token
ids: a relative logit difference above 1e-4 is refused. Everything is written into a
temporary directory beside OUT and renamed at the end, so a refusal leaves nothing behind;
an OUT that exists is refused, never overwritten.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from smoe.data.mlm import TOKENIZER_FILES
from smoe.launcher.config import DEFAULT_COMBINE_SCALE
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import atomic_directory
from smoe.model.split import SPLITS

EXACT_TOLERANCE = 1e-4  # max relative logit difference at k = N, fp32 (measured ~3e-7)
CHECK_IDS_SHAPE = (2, 8)  # the random token ids of the exactness check
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class Family:
    """What a kind of dense model becomes and how it is written and read back."""

    name: str  # DEFAULT_COMBINE_SCALE's key
    model_types: tuple[str, ...]
    split: str  # --split's default
    auto_class: str  # transformers' Auto class that loads the dense model
    upcycle: Callable[[nn.Module, object], nn.Module]  # (dense, args with numbers resolved) -> the SMoE model
    save: Callable[[nn.Module, object, Path], None]
    load: Callable[[Path], nn.Module]


def _decoder_upcycling(args):
    from smoe.model.decoder import Upcycling

    return Upcycling(args.num_experts, args.method, args.moe_layers, args.combine_scale, args.seed, args.k,
                     args.split)


def _upcycle_decoder(dense, args):
    from smoe.model.decoder import upcycle

    return upcycle(dense, **asdict(_decoder_upcycling(args)))


def _save_decoder(model, args, directory: Path) -> None:
    from smoe.model.decoder import save_upcycled

    save_upcycled(model, _decoder_upcycling(args), directory)


def _load_decoder(directory: Path):
    from smoe.model.decoder import load_upcycled

    return load_upcycled(directory)


def _upcycle_masked_lm(dense, args):
    from smoe.model.bert import from_dense

    return from_dense(dense, dense.config.model_type, split=args.split, method=args.method,
                      num_experts=args.num_experts, top_k=args.k or args.num_experts, moe_layers=args.moe_layers,
                      combine_scale=args.combine_scale, router_seed=args.seed)


def _save_masked_lm(model, args, directory: Path) -> None:
    model.save_pretrained(directory)


def _load_masked_lm(directory: Path):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(directory)


def families() -> list[Family]:
    from smoe.model.bert import MODELS
    from smoe.model.decoder import ARCHITECTURES

    return [
        Family("causal-lm", tuple(ARCHITECTURES), "random", "AutoModelForCausalLM", _upcycle_decoder, _save_decoder,
               _load_decoder),
        Family("bert", tuple(MODELS), "contiguous", "AutoModelForMaskedLM", _upcycle_masked_lm, _save_masked_lm,
               _load_masked_lm),
    ]


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a local Hugging Face directory (save_pretrained) or a hub id; model types: "
                                      "llama, mistral, qwen2, qwen3, gpt2 (causal LM), bert, roberta (masked LM)")
    parser.add_argument("out", help="the directory to write; must not exist")
    parser.add_argument("--num-experts", type=int, default=16, help="N (must divide the intermediate size; default 16)")
    parser.add_argument("--method", default="smoe-dropout", help="router method (default smoe-dropout)")
    parser.add_argument("--k", type=int, help="top-k saved with the model (default N: the dense model back)")
    parser.add_argument("--moe-layers", default="all", help="all, early, middle, later or every-2")
    parser.add_argument("--combine-scale", help="1 (the paper's) or N (inverted dropout); default: what the family "
                                                "trains with, 1 for BERT/RoBERTa and N for decoder LMs. The experts "
                                                "are scaled so that k = N gives the dense model either way")
    parser.add_argument("--split", choices=SPLITS,
                        help="which neurons each expert gets: random (a seeded shuffle, SMoE-Dropout's; the default "
                             "for decoder LMs), kmeans (balanced clusters of the neurons' input rows, LLaMA-MoE's and "
                             "MoEfication's) or contiguous (neurons i*d_ff/N to (i+1)*d_ff/N, the default for "
                             "BERT/RoBERTa, what `smoe convert` always wrote)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the routers and the random and kmeans splits "
                                                            "(layer i: seed + 101 i; default 0)")


def run(args) -> None:
    import transformers

    from smoe.model.feedforward import combine_scale_value

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} exists: smoe upcycle never overwrites; pass a new directory")
    if args.num_experts < 1:
        raise ValueError(f"--num-experts {args.num_experts} must be at least 1 (and divide intermediate_size)")
    if args.k is not None and not 1 <= args.k <= args.num_experts:
        raise ValueError(f"--k {args.k} must be between 1 and --num-experts ({args.num_experts})")
    config = read_config(args.model)
    family = family_of(config.model_type, args.model)
    args.split = args.split or family.split
    args.combine_scale = combine_scale_value(args.combine_scale or DEFAULT_COMBINE_SCALE[family.name],
                                             args.num_experts)
    dense = load_dense(getattr(transformers, family.auto_class), args.model, config)
    model = family.upcycle(dense, args)
    counts = parameter_counts(dense, model)
    with atomic_directory(out) as staging:
        family.save(model, args, staging)
        del model
        extras = copy_extras(args.model, staging)
        difference = max_relative_difference(dense, family.load(staging), args.num_experts, config.vocab_size)
        if not difference <= EXACT_TOLERANCE:
            raise ValueError(f"the upcycled model at k = N differs from the dense one by {difference:.1e} (relative "
                             f"logits; at most {EXACT_TOLERANCE:g} expected): nothing was written; please report "
                             "this with the model's config.json")
    biases = f"; expert output biases: {counts['expert_biases']:,}" if counts["expert_biases"] else ""
    log.info(f"upcycled {config.model_type}: {args.num_experts} experts in {counts['moe_layers']} of "
             f"{config.num_hidden_layers} layers ({args.method}, moe_layers={args.moe_layers}, split={args.split}, "
             f"combine_scale={args.combine_scale:g}, k={args.k or args.num_experts}); parameters {counts['dense']:,} "
             f"dense -> {counts['upcycled']:,} upcycled (routers: {counts['router_parameters']:,} parameters and "
             f"{counts['router_buffers']:,} buffer values{biases}); k = N matches the dense logits to "
             f"{difference:.1e} (relative)")
    log.info(f"wrote {out}" + (f" with the {' and '.join(extras)}" if extras else "")
             + ("" if "tokenizer" in extras else f"; {args.model} has no tokenizer, only the model was written"))


def read_config(source: str):
    """MODEL's transformers config: a local directory with config.json, or a hub id."""
    from transformers import AutoConfig

    path = Path(source)
    if path.exists() or not HUB_ID.fullmatch(source):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no config.json{'' if path.exists() else ' (no such directory)'}: "
                                    "pass a Hugging Face model directory (save_pretrained) or a hub id")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the config of {source} ({_first_line(error)}): pass a transformers "
                         "model directory or a hub id you can download") from None


def family_of(model_type: str, source: str) -> Family:
    for family in families():
        if model_type in family.model_types:
            return family
    supported = [t for family in families() for t in family.model_types]
    raise ValueError(f"cannot upcycle {source}, a '{model_type}' model: supported model types are "
                     f"{', '.join(supported)}")


def load_dense(auto_class, source: str, config) -> nn.Module:
    """The dense model, every weight from MODEL's files: a missing, damaged or partial weight file is refused."""
    from safetensors import SafetensorError

    try:
        dense, loading = auto_class.from_pretrained(source, config=config, output_loading_info=True)
    except (OSError, SafetensorError, RuntimeError) as error:
        raise ValueError(f"cannot read the weights of {source} ({_first_line(error)}): the weight file is missing "
                         "or damaged; save the model again with save_pretrained") from None
    missing = sorted(loading["missing_keys"]) + sorted(loading.get("mismatched_keys", []))
    if missing:
        raise ValueError(f"the weights of {source} lack {len(missing)} tensors or have them in other shapes (e.g. "
                         f"{missing[0]}): the weight file is damaged or belongs to another config; save the model "
                         "again with save_pretrained")
    return dense.eval()


def copy_extras(source: str, directory: Path) -> list[str]:
    """MODEL's tokenizer and generation config into ``directory``, where it has them; what was copied."""
    from transformers import AutoTokenizer, GenerationConfig

    copied = []
    local = Path(source)
    if not local.is_dir() or any((local / name).is_file() for name in TOKENIZER_FILES):
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(directory)
            copied.append("tokenizer")
        except OSError:  # a hub model without one
            pass
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(directory)
        copied.append("generation config")
    except OSError:  # none: an encoder, or a model saved without one
        pass
    return copied


def parameter_counts(dense: nn.Module, model: nn.Module) -> dict[str, int]:
    """Dense and upcycled parameters; the difference is the routers' parameters plus, for BERT/RoBERTa's
    biased MLPs, N - 1 more output biases per layer (each expert keeps its own; a decoder's is the layer's)."""
    from smoe.model.moe import moe_layers_of

    def parameters(module):
        return sum(p.numel() for p in module.parameters())

    layers = moe_layers_of(model)
    counts = {"dense": parameters(dense), "upcycled": parameters(model), "moe_layers": len(layers),
              "router_parameters": sum(parameters(layer.router) for layer in layers),
              "router_buffers": sum(b.numel() for layer in layers for b in layer.router.buffers())}
    counts["expert_biases"] = counts["upcycled"] - counts["dense"] - counts["router_parameters"]
    return counts


def max_relative_difference(dense: nn.Module, upcycled: nn.Module, num_experts: int, vocab_size: int) -> float:
    """max |logits - dense logits| / max |dense logits|, both in fp32, the upcycled model at k = N."""
    from smoe.model.moe import set_top_k

    set_top_k(upcycled, num_experts)
    token_ids = torch.randint(vocab_size, CHECK_IDS_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = dense.float().eval()(input_ids=token_ids).logits
        logits = upcycled.float().eval()(input_ids=token_ids).logits
    return float((logits - reference).abs().max() / reference.abs().max())


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
