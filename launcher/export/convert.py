"""What `smoe export` reads, and smoe's model as the exported classes' config and weights.

Sources: a run directory (its latest complete checkpoint, trained at any ep_size), a `smoe slim`
or `smoe finetune` model directory, or a consolidated ``.safetensors`` file. Each becomes one
smoe model on the CPU, on one process, in eval mode, plus what the model card tells of it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from smoe.launcher.config import TrainConfig
from smoe.model.dense import DenseFFN
from smoe.model.moe import SMoE, moe_layers_of, set_top_k, top_k_of

EXPORTABLE_ROUTERS = ("random-frozen", "learned", "hash")  # deterministic routes: the same at every call
# A transformers architecture of ours -> the head it has.
HEADS = {"ForMaskedLM": "masked-lm", "ForSequenceClassification": "sequence-classification",
         "ForMultipleChoice": "multiple-choice"}
# (family, head) -> (the transformers Auto class that loads the export, the exported class)
EXPORTED = {("transformer-xl", "causal-lm"): ("AutoModelForCausalLM", "SMoETransformerXLForCausalLM"),
            **{(family, head): (f"AutoModel{suffix}", f"SMoE{name}{suffix}")
               for family, name in (("bert", "Bert"), ("roberta", "Roberta")) for suffix, head in HEADS.items()}}
CONFIG_CLASSES = {"transformer-xl": "SMoETransformerXLConfig", "bert": "SMoEBertConfig",
                  "roberta": "SMoERobertaConfig"}
# smoe's names of the expert layer's parts -> the exported ExpertMixture's
RENAMES = ((".deepspeed_moe.gate.", ".router."), (".deepspeed_moe.experts.deepspeed_experts.", ".experts."))


@dataclass
class Source:
    """A model to export and what is known of it."""

    path: Path
    kind: str  # "run", "slim", "fine-tuned", "model directory" (`smoe convert`) or "consolidated"
    family: str  # "transformer-xl", "bert" or "roberta"
    head: str  # "causal-lm", "masked-lm", "sequence-classification" or "multiple-choice"
    model: nn.Module  # smoe's, eval mode, CPU, ep_size 1
    config: TrainConfig | None = None  # the run's (None for a transformers directory of ours)
    tokenizer: object | None = None
    facts: dict = field(default_factory=dict)  # for the card: checkpoint, step, data, quality by k, results

    @property
    def auto_class(self) -> str:
        return EXPORTED[self.family, self.head][0]

    @property
    def exported_class(self) -> str:
        return EXPORTED[self.family, self.head][1]


def read_source(path: Path) -> Source:
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        source = _from_run(path)
    elif path.is_dir() and (path / "config.json").is_file():
        source = _from_transformers_dir(path)
    elif path.is_file() and path.suffix == ".safetensors" or (path / "model.safetensors").is_file():
        source = _from_consolidated(path if path.is_file() else path / "model.safetensors")
    else:
        raise FileNotFoundError(f"{path} is not a run directory (config.json and checkpoints/), a `smoe slim` or "
                                "`smoe finetune` model directory or a consolidated .safetensors file: pass one of them")
    layers = moe_layers_of(source.model)
    routers = sorted({layer.config.router for layer in layers})
    if any(router not in EXPORTABLE_ROUTERS for router in routers):
        raise ValueError(f"{path} routes with '{routers[0]}', which draws new experts at every call: only "
                         f"{', '.join(EXPORTABLE_ROUTERS)} routers are exported (a deployed model must route alike "
                         "every time)")
    return source


def _from_run(root: Path) -> Source:
    from smoe.launcher.checkpoints.consolidate import full_state_dict
    from smoe.launcher.checkpoints.load import loadable_tag
    from smoe.launcher.checkpoints.run_dir import RunDir
    from smoe.launcher.checkpoints.schema import latest_tag, tag_step
    from smoe.launcher.families import family_of

    run = RunDir(root)
    config = replace(run.load_config(), ep_size=1)
    if latest_tag(run.checkpoints) is None:
        raise ValueError(f"{run.checkpoints} holds no complete checkpoint: train the run first")
    family = family_of(config, run.root)
    model = family.build(config)
    tag = loadable_tag(run.checkpoints, model)  # checked file by file; an older one if the newest is damaged
    model.load_state_dict(full_state_dict(run.checkpoints / tag))
    step = tag_step(tag)
    if moe_layers_of(model):
        set_top_k(model, config.k_schedule()(step))  # the k the checkpoint was trained at
    facts = {"checkpoint": tag, "step": step, "data": _data_of(config)}
    if run.eval.is_file():
        report = json.loads(run.eval.read_text())
        if report.get("step") == step:  # the sweep at the end of training, of this very checkpoint
            facts.update(quality=report["rows"], unit=report["unit"], quality_source=f"{run.eval} ({report['source']})")
    tokenizer = family.tokenizer if config.masked_lm else None
    return Source(root, "run", family.name, _head_of(config), model.eval(), config, tokenizer, facts)


def _head_of(config: TrainConfig) -> str:
    return "masked-lm" if config.masked_lm else "causal-lm"


def _data_of(config: TrainConfig) -> str:
    return config.data_file or config.data_dir or ", ".join(config.data_files) or config.dataset or "-"


def _from_consolidated(file: Path) -> Source:
    from smoe.launcher.checkpoints.consolidate import load_consolidated

    if (file.parent / "vocab.txt").is_file():
        raise ValueError(f"{file.parent} is a fine-tuned Transformer-XL classifier (a word vocabulary and smoe's own "
                         "head): export the pretrained or slim model instead")
    config, model = load_consolidated(file)
    slim = file.parent / "slim.json"
    kind = "slim" if slim.is_file() else "consolidated"
    facts = {"data": _data_of(config)}
    if slim.is_file():
        facts["slim"] = {key: value for key, value in json.loads(slim.read_text()).items() if key != "counts"}
    return Source(file, kind, config.model, _head_of(config), model, config, None, facts)


def _from_transformers_dir(directory: Path) -> Source:
    from transformers import AutoTokenizer

    from smoe.data.mlm import TOKENIZER_FILES
    from smoe.launcher.downstream.tasks import model_family
    from smoe.model.bert import CLASSES

    family = model_family(directory)  # refuses a plain transformers model
    architecture = (json.loads((directory / "config.json").read_text()).get("architectures") or ["?"])[0]
    head = next((head for suffix, head in HEADS.items() if architecture.endswith(suffix)), None)
    if head is None:
        raise ValueError(f"{directory} is a {architecture}: only masked-LM, sequence-classification and "
                         "multiple-choice models are exported (an encoder with smoe's equation decoder is not)")
    model = CLASSES[family][head].from_pretrained(directory).eval()
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer else None
    facts = {}
    for name, kind in (("slim.json", "slim"), ("../result.json", "fine-tuned")):
        if (directory / name).is_file():
            facts[kind] = json.loads((directory / name).read_text())
            facts[kind].pop("counts", None)
    kind = next((kind for kind in ("fine-tuned", "slim") if kind in facts), "model directory")
    return Source(directory, kind, family, head, model, None, tokenizer, facts)


def feedforward_blocks(model: nn.Module) -> list[nn.Module]:
    """Each layer's feed-forward block (experts or a dense MLP), in layer order."""
    return [m for m in model.modules() if isinstance(m, (SMoE, DenseFFN))]


def feedforward_fields(model: nn.Module) -> dict:
    """The exported config's feed-forward fields (:class:`smoe.model.hub.SlimmableFields`)."""
    blocks = feedforward_blocks(model)
    layers = [i for i, block in enumerate(blocks) if isinstance(block, SMoE)]
    if not layers:
        return {"num_experts": 1, "num_experts_per_tok": 1, "expert_layers": []}
    moe = blocks[layers[0]].config
    return {"num_experts": moe.num_experts, "num_experts_per_tok": top_k_of(model), "router": moe.router,
            "router_options": asdict(moe.router_options), "combine_scale": float(moe.combine_scale),
            "expert_layers": layers}


def exported_config(source: Source, modeling) -> object:
    """The config of the exported model, an instance of the bundled module's config class."""
    fields = feedforward_fields(source.model)
    if source.family == "transformer-xl":
        txl, run = source.model.config, source.config
        first = feedforward_blocks(source.model)[0]
        activation = (first.local_experts[0] if isinstance(first, SMoE) else first.mlp).activation_name
        values = dict(vocab_size=txl.vocab_size, n_layer=txl.n_layer, d_model=txl.d_model, n_head=txl.n_head,
                      d_head=txl.d_head, d_ff=txl.d_ff, activation=activation, dropout=txl.dropout,
                      dropatt=txl.dropatt, tgt_len=run.eval_tgt_len, mem_len=run.eval_mem_len,
                      clamp_len=txl.clamp_len, same_length=txl.same_length)
    else:
        from smoe.model.bert import SMoEFields

        values = source.model.config.to_dict()  # transformers' BERT/RoBERTa fields, less smoe's own
        for name in (*SMoEFields.__annotations__, "model_type", "architectures", "auto_map", "transformers_version"):
            values.pop(name, None)
    return getattr(modeling, CONFIG_CLASSES[source.family])(**values, **fields)


def exported_state(source: Source) -> dict[str, torch.Tensor]:
    """smoe's tensors under the exported classes' names. Concrete Dropout's learned rate is left
    out: at inference the dense MLP runs without dropout."""
    prefix = "transformer." if source.family == "transformer-xl" else ""
    state = {}
    for name, tensor in source.model.state_dict().items():
        if name.endswith(".mlp.dropout.p_logit"):
            continue
        for old, new in RENAMES:
            name = name.replace(old, new)
        state[prefix + name] = tensor.detach().clone()
    return state
