"""`smoe export SOURCE OUT`: a Hugging Face model directory that runs without smoe or DeepSpeed.

SOURCE is a `smoe train` run (its latest complete checkpoint, of any ep_size), a `smoe slim` or
`smoe finetune` model directory, or a consolidated ``.safetensors`` file. OUT gets
``config.json`` (with ``auto_map``), ``modeling_smoe.py`` (smoe's own torch-only model code,
:mod:`smoe.launcher.export.bundle`), ``model.safetensors``, the tokenizer where there is one,
``slimming.json``, a model card (``README.md``) with quality, active parameters, FLOPs and
measured speed by k, and the run's named slices where `smoe slice` wrote them (``slices.json``,
``frontier.png``: :mod:`smoe.launcher.export.slices`). Load it with

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True, num_experts_per_tok=4)

(``AutoModelForMaskedLM``, ``...ForSequenceClassification`` or ``...ForMultipleChoice`` for
BERT/RoBERTa). Before OUT appears, the export is loaded back that way and its outputs are
compared with smoe's at every k (fp32, 1e-5); OUT is written under a temporary name and
renamed at the end, so a failed export leaves nothing behind. An upcycled directory (`smoe upcycle`)
or a causal-LM run is exported by :func:`smoe.launcher.export.native.export_decoder` instead: as
transformers' own MoE class where one holds the model, else as its own dense class with smoe's experts
(remote code, :mod:`smoe.launcher.export.remote_decoder`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from smoe.launcher.bench.infer import SLIMMING_FILE, default_ks, device_name, load_exported, max_tokens, measure
from smoe.launcher.config import parse_ks
from smoe.launcher.evaluation.metrics import active_parameters, flops_per_token, sparse_flops
from smoe.launcher.export import slices as exported_slices
from smoe.launcher.export.bundle import MODELING_FILE, MODELING_MODULE, bundle, import_modeling
from smoe.launcher.export.card import model_card
from smoe.launcher.export.convert import CONFIG_CLASSES, Source, exported_config, exported_state, read_source
from smoe.launcher.export.verify import CHECK_LENGTH, check_at_every_k, padded_ids, refuse_existing, staged
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic
from smoe.model.moe import moe_layers_of, set_top_k



def add_arguments(parser) -> None:
    parser.add_argument("source", help="a `smoe train` run, a `smoe slim` / `smoe finetune` model directory, a "
                                       "consolidated .safetensors file, or a `smoe upcycle` directory (exported as "
                                       "transformers' own MoE class where one holds it, else with remote code)")
    parser.add_argument("out", help="the directory to write (new, or empty)")
    parser.add_argument("--k", type=int, help="num_experts_per_tok the directory loads at (default: the model's)")
    parser.add_argument("--ks", help="the ks of the card's speed table (default: 1, 2, 4, ... up to N)")
    parser.add_argument("--batch", type=int, default=32, help="the large batch of the speed table (default 32)")
    parser.add_argument("--length", type=int, default=128, help="tokens per row of the speed table (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per setting (default 3)")
    parser.add_argument("--eval-json", help="a `smoe eval --json` report of this model, for the card's quality column")


def write_export(source: Source, directory: Path, k: int | None) -> None:
    """The modelling file, the config and the weights (and the tokenizer) into ``directory``."""
    (directory / MODELING_FILE).write_text(bundle())
    modeling = import_modeling(directory / MODELING_FILE)
    config = exported_config(source, modeling)
    if k is not None:
        modeling.check_top_k(config, k)
        config.num_experts_per_tok = k
    config.auto_map = {"AutoConfig": f"{MODELING_MODULE}.{CONFIG_CLASSES[source.family]}",
                       source.auto_class: f"{MODELING_MODULE}.{source.exported_class}"}
    model = getattr(modeling, source.exported_class)(config)
    model.load_state_dict(exported_state(source), strict=True)
    model.save_pretrained(directory)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(directory)


def comparison_inputs(source: Source, exported) -> dict:
    """Inputs for both models: random ids, and for BERT/RoBERTa an attention mask with padding."""
    config = exported.config
    if source.family == "transformer-xl":
        return {"input_ids": padded_ids(config.vocab_size, (2, 2, CHECK_LENGTH))["input_ids"]}
    length = min(CHECK_LENGTH, max_tokens(config))
    return padded_ids(config.vocab_size, (2, 2, length) if source.head == "multiple-choice" else (2, length))


def outputs(source: Source, model, inputs: dict, exported: bool) -> torch.Tensor:
    """Logits of ``inputs``; Transformer-XL reads two segments, the second after the first's memory."""
    if source.family != "transformer-xl":
        return model(**inputs).logits
    mems, logits = None, []
    if not exported:
        model.mem_len = source.config.eval_mem_len  # as the run evaluates
    for segment in inputs["input_ids"].unbind(1):
        out = model(input_ids=segment, mems=mems) if exported else model(segment, mems)
        mems = out.mems
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def check_outputs(source: Source, exported, ks: list[int | list[int]]) -> float:
    """:func:`check_at_every_k` of the remote-code export against smoe's model (a k: one for every layer, or one
    per expert layer)."""
    inputs = comparison_inputs(source, exported)

    def smoe_logits(k):
        if k is not None:
            set_top_k(source.model, k)
        return outputs(source, source.model, inputs, exported=False)

    def exported_logits(k):
        if k is not None:
            exported.set_top_k(k)
        return outputs(source, exported, inputs, exported=True)

    return check_at_every_k(ks, smoe_logits, exported_logits)


@torch.no_grad()
def cost_by_k(source: Source, ks: list[int | None]) -> dict:
    """Active parameters and forward FLOPs per token at each k, counted on smoe's model (FLOPs on the
    sparse path: they follow k)."""
    model, costs = source.model, {}
    for k in ks:
        if k is not None:
            set_top_k(model, k)
        if source.family == "transformer-xl":
            config = source.config
            flops = flops_per_token(model, config.eval_tgt_len, config.eval_mem_len, config.vocab_size)
        else:
            inputs = comparison_inputs(source, model)
            ids = inputs["input_ids"][:1]
            flops = sparse_flops(model, lambda: model(input_ids=ids)) / ids.numel()
        costs[k] = {"active_params": active_parameters(model, k), "flops_per_token": flops}
    return costs


def quality_by_k(source: Source, eval_json: str | None) -> tuple[dict[int, dict], str | None, str | None]:
    """Validation and test bits by k, from ``--eval-json`` or the run's own final sweep."""
    if eval_json:
        report = json.loads(Path(eval_json).read_text())
        rows, unit, where = report["rows"], report.get("unit"), f"{eval_json} ({report.get('source', '?')})"
    else:
        rows, unit, where = (source.facts.get(key) for key in ("quality", "unit", "quality_source"))
    return {row["k"]: row for row in rows or []}, unit, where


def slimming_rows(source: Source, ks: list[int | None], speed, quality: dict) -> list[dict]:
    costs = cost_by_k(source, ks)
    rows = []
    for k in ks:
        row = {"k": k, **costs[k], "valid": quality.get(k, {}).get("valid_bpc"),
               "test": quality.get(k, {}).get("test_bpc")}
        for r in speed:
            if r.k == k or k is None:
                prefix = "batch1" if r.batch == 1 else "batch"
                row.update({f"{prefix}_latency_ms": r.latency_ms, f"{prefix}_tokens_per_s": r.tokens_per_s,
                            **({"batch": r.batch} if r.batch != 1 else {})})
        rows.append(row)
    return rows


def unit_of(family: str) -> str:
    """What the family's quality is measured in (its ``Family.unit``)."""
    from smoe.launcher.families import TransformerXLFamily

    if family == TransformerXLFamily.name:
        return TransformerXLFamily.unit
    from smoe.launcher.families.masked_lm import MaskedLMFamily

    return MaskedLMFamily.unit


def expert_layer_indices(config) -> list[int]:
    """The exported model's layers with experts (``expert_layers``; None: every one)."""
    if config.expert_layers is not None:
        return sorted(config.expert_layers)
    return list(range(config.n_layer if hasattr(config, "n_layer") else config.num_hidden_layers))


def export(source: Source, out: Path, args) -> dict:
    """Write, load back, compare, time and describe; returns the slimming table."""
    with staged(out) as staging:
        write_export(source, staging, args.k)
        exported = load_exported(staging)
        layers = moe_layers_of(source.model)
        all_ks = list(range(1, layers[0].num_experts + 1)) if layers else [None]
        k = exported.top_k if layers else None
        slices = exported_slices.run_slices(source.path if source.kind == "run" else None) if layers else None
        difference = check_outputs(source, exported, all_ks + exported_slices.settings(slices))
        log.info(f"the export loads with transformers and matches smoe at every k ({', '.join(map(str, all_ks))})"
                 f"{' and slice' if slices else ''}: largest difference {difference:.1e}")
        if slices:
            exported_slices.write(slices, expert_layer_indices(exported.config), staging)
        if layers:
            set_top_k(source.model, k)
            exported.set_top_k(k)
        ks = (args.ks or default_ks(layers[0].num_experts)) if layers else [None]  # dense: one row
        speed = measure(exported, ks, sorted({1, args.batch}), args.length, args.repeats)
        quality, unit, quality_source = quality_by_k(source, args.eval_json)
        table = {"family": source.family, "head": source.head, "unit": unit or unit_of(source.family),
                 "quality_source": quality_source, "device": device_name(exported.device), "torch": torch.__version__,
                 "dtype": "fp32", "length": args.length, "max_difference": difference, "num_experts_per_tok": k,
                 "rows": slimming_rows(source, ks, speed, quality)}
        write_atomic(staging / SLIMMING_FILE, json.dumps(table, indent=2))
        write_atomic(staging / "README.md", model_card(source, exported.config, table, out.name, slices))
    return table


def run(args) -> None:
    from smoe.launcher.export.native import export_causal_run, export_upcycled, is_upcycled

    out = Path(args.out)
    refuse_existing(out)
    if is_upcycled(Path(args.source)):  # a decoder LM (export_decoder): no speed table, no quality
        export_upcycled(Path(args.source), out, args.k)
        return
    for name in ("batch", "length", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} ({getattr(args, name)}) must be at least 1")
    if args.eval_json and not Path(args.eval_json).is_file():
        raise FileNotFoundError(f"--eval-json {args.eval_json} does not exist: write one with "
                                "`smoe eval RUN --json FILE`")
    source = read_source(Path(args.source))
    if source.config is not None and source.config.model == "causal-lm":  # transformers' own classes
        config = source.config
        tokenizer_dir = Path(config.tokenizer) if config.tokenizer else source.path / "tokenizer"
        origin = f"`{source.path}` ({source.facts.get('checkpoint', source.kind)})"
        export_causal_run(source.model, out, args.k, tokenizer_dir, origin,
                          exported_slices.run_slices(source.path if source.kind == "run" else None))
        return
    args.ks = parse_ks(args.ks, "--ks") if args.ks else None
    table = export(source, out, args)
    log.info(f"wrote {out}: {source.family} {source.head}, {len(table['rows'])} k(s) in the card; load it with "
             f"{source.auto_class}.from_pretrained('{out}', trust_remote_code=True)")
