"""The model card (``README.md`` in the Hub's format) of an exported model: what it is, how it
was trained, how to load it at any k, and its self-slimming table (quality, active
parameters, FLOPs and measured speed by k)."""

from __future__ import annotations

import json

from smoe.launcher.export import slices as exported_slices
from smoe.launcher.export.convert import Source

PIPELINES = {"causal-lm": "text-generation", "masked-lm": "fill-mask", "sequence-classification": "text-classification",
             "multiple-choice": "multiple-choice"}
FAMILY_NAMES = {"transformer-xl": "Transformer-XL", "bert": "BERT", "roberta": "RoBERTa"}
TRAINING_KEYS = ("method", "model", "n_layer", "d_model", "n_head", "d_ff", "num_experts", "moe_layers", "k_min",
                 "k_max", "k_fixed", "k_schedule", "router", "combine_scale", "max_steps", "batch_size", "grad_accum",
                 "tgt_len", "mem_len", "block_size", "lr", "lr_decay", "warmup_steps", "weight_decay", "dropout",
                 "seed", "ds_config")
LABELS = {"router": "router options", "ds_config": "DeepSpeed config"}


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _front_matter(source: Source) -> str:
    tags = ["smoe", "smoe-dropout", "mixture-of-experts", "self-slimmable", source.family]
    return ("---\nlibrary_name: transformers\n"
            f"pipeline_tag: {PIPELINES[source.head]}\n"
            "tags:\n" + "".join(f"- {tag}\n" for tag in tags) + "---\n")


def _loading(source: Source, config, name: str) -> str:
    k = config.num_experts_per_tok
    lines = [f"from transformers import {source.auto_class}", "",
             f'model = {source.auto_class}.from_pretrained("{name}", trust_remote_code=True, '
             f"num_experts_per_tok={k})"]
    if config.expert_layers != []:
        lines += [f"model.set_top_k({max(1, k // 2)})  # any k from 1 to {config.num_experts}, at any time"]
    if source.family == "transformer-xl":
        lines += ["", "import torch", "", 'segment = torch.tensor([list(b"<page><title>Anarchism</title>")])',
                  "out = model(input_ids=segment)  # out.logits: next-byte logits; out.mems: the memory",
                  "out = model(input_ids=segment, mems=out.mems)  # the next segment, after the first"]
    else:
        lines = [f"from transformers import AutoTokenizer, {source.auto_class}", "",
                 f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)', *lines[2:], "",
                 'inputs = tokenizer("the quick brown fox", return_tensors="pt")', "logits = model(**inputs).logits"]
    return "```python\n" + "\n".join(lines) + "\n```\n"


def _training(source: Source) -> str:
    facts = source.facts
    lines = []
    if source.config is not None:
        values = source.config.to_dict()
        lines.append("| setting | value |\n|---|---|")
        lines += [f"| {LABELS.get(key, key)} | "
                  f"{json.dumps(values[key]) if isinstance(values[key], (dict, list)) else values[key]} |"
                  for key in TRAINING_KEYS if key in values]
        lines.append("")
    for label, key in (("checkpoint", "checkpoint"), ("optimizer steps", "step"), ("data", "data")):
        if key in facts:
            lines.append(f"- {label}: {facts[key]}")
    if "slim" in facts:
        slim = facts["slim"]
        lines.append(f"- `smoe slim`: {slim.get('budget')} of the run's {slim.get('run_experts')} experts per layer "
                     f"kept (the most used, counted at k={slim.get('k')}), from {slim.get('run')}")
    if "fine-tuned" in facts:
        result = facts["fine-tuned"]
        lines.append(f"- fine-tuned on {result.get('task')} with `smoe finetune` at k={result.get('k')}: dev "
                     f"{result.get('metric')} {_number(result.get('dev', {}).get(result.get('metric')))} "
                     f"({len(result.get('splits', []))} split(s)), from {result.get('model')}")
    return "\n".join(lines) + "\n"


def _table(table: dict) -> str:
    unit = table["unit"]
    batch = next((row["batch"] for row in table["rows"] if "batch" in row), None)
    header = (f"| k | valid {unit} | test {unit} | active params | GFLOPs/token | batch 1: ms | batch 1: tokens/s"
              + (f" | batch {batch}: ms | batch {batch}: tokens/s" if batch else "") + " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in table["rows"]:
        cells = ["-" if row["k"] is None else str(row["k"]), _number(row["valid"]), _number(row["test"]),
                 f"{row['active_params'] / 1e6:.2f}M", f"{row['flops_per_token'] / 1e9:.4f}",
                 _number(row.get("batch1_latency_ms"), 2), f"{row.get('batch1_tokens_per_s', 0):,.0f}"]
        if batch:
            cells += [_number(row.get("batch_latency_ms"), 2), f"{row.get('batch_tokens_per_s', 0):,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_card(source: Source, config, table: dict, name: str, slices: dict | None = None) -> str:
    """The README.md of the exported directory ``name`` (with the run's ``slices``, where it has them)."""
    family = FAMILY_NAMES[source.family]
    if config.expert_layers == []:
        what = f"A dense {family} (no experts: one row below)."
    else:
        where = "every layer" if config.expert_layers is None else f"layers {config.expert_layers}"
        what = (f"An SMoE-Dropout {family}: the MLP of {where} split into {config.num_experts} experts behind a "
                f"{config.router} router, of which each token uses k (`num_experts_per_tok`, "
                f"{config.num_experts_per_tok} by default). Any k from 1 to {config.num_experts} works; quality "
                "rises with k and cost with it.")
    quality = (f"Quality from {table['quality_source']}." if table["quality_source"] else
               "Quality was not measured for this export: `smoe eval RUN --json FILE`, then `smoe export ... "
               "--eval-json FILE`, fills it in.")
    return "\n".join([
        _front_matter(source),
        f"# {name}\n",
        f"{what} Exported by `smoe export` from {source.kind} `{source.path}` ({source.head}).\n",
        "## Load it\n",
        "Needs torch and transformers only (smoe and DeepSpeed need not be installed):\n",
        _loading(source, config, name),
        "## Training\n",
        _training(source),
        "## Self-slimming: quality and cost by k\n",
        _table(table),
        f"{quality} Active parameters and FLOPs (forward, per token; Transformer-XL: a segment of "
        f"{getattr(config, 'tgt_len', '-')} after a full memory) are counted by smoe on the model. Speed: one "
        f"forward of {table['length']} tokens per row, median of the timed repeats, measured on "
        f"{table['device']}, torch {table['torch']}, {table['dtype']}, at export; `smoe bench infer DIR` measures "
        "it on another machine and picks the best k or slice for a budget (`--budget-ms`, `--budget-gflops`). "
        f"The export was checked against smoe at every k{' and slice' if slices else ''}: the largest logit "
        f"difference was {table['max_difference']:.1e} (relative).\n",
        *([exported_slices.card_section(name, slices, source.auto_class, native=False)] if slices else []),
    ])
