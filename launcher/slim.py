"""`smoe slim RUN_DIR --budget B --data FILE --out DIR`: a smaller model for fine-tuning.

One forward pass over the downstream training text counts how often the router picks
each expert of each layer (at k = B, or ``--k``); the B most used experts
per layer are kept and the rest dropped (:mod:`smoe.model.slim`). The result is a
transformers directory (model, tokenizer, and ``slim.json`` with the kept experts and
their counts) that fine-tuning loads like any other. ``--budget N`` gives back the full
model. A dense baseline cannot drop experts: there a budget means a dense MLP of width
B/N, freshly initialised, and the command says so.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import torch

from smoe.model.bert import feedforward_modules
from smoe.model.feedforward import get_method
from smoe.model.moe import SMoE
from smoe.model.slim import keep_experts, most_used


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a BERT/RoBERTa `smoe train` run")
    parser.add_argument("--budget", type=int, required=True, help="experts kept per layer, 1..N")
    parser.add_argument("--data", required=True, help="downstream training text: a text file (one example per line) "
                                                      "or a TSV with a 'sentence' column (SST-2)")
    parser.add_argument("--out", required=True, help="directory for the slim model")
    parser.add_argument("--k", type=int, help="top-k while counting (default: the budget, so that each token "
                                              "votes for the B experts it would use)")
    parser.add_argument("--max-examples", type=int, default=5000, help="examples to count on (default 5000)")


def read_examples(path: Path, limit: int) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--data {path} does not exist")
    if path.suffix == ".tsv":
        with open(path, newline="") as f:
            rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if "sentence" not in (rows.fieldnames or []):
                raise ValueError(f"{path} has columns {rows.fieldnames}: a TSV needs a 'sentence' column (SST-2)")
            texts = [row["sentence"] for row in rows]
    else:
        texts = [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no example")
    return texts[:limit]


@torch.no_grad()
def count_experts(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32) -> list[torch.Tensor]:
    """Tokens routed to each expert of each MoE layer over ``texts``. Examples are batched
    by length, so no padding token is ever routed or counted."""
    model.eval()
    by_length: dict[int, list[list[int]]] = {}
    for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]:
        by_length.setdefault(len(ids), []).append(ids)
    totals = None
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            model(input_ids=torch.tensor(rows[start:start + batch_size]))
            counts = [m.expert_counts.clone() for m in feedforward_modules(model) if m.expert_counts is not None]
            totals = counts if totals is None else [t + c for t, c in zip(totals, counts)]
    return totals


def run(args) -> None:
    from transformers import AutoTokenizer

    from .consolidate import full_state_dict
    from .checkpoint import latest_tag
    from .masked_lm import build_mlm_model
    from .run_dir import RunDir

    run_dir = RunDir(Path(args.run_dir))
    config = replace(run_dir.load_config(), ep_size=1)
    if not config.masked_lm:
        raise ValueError(f"{run_dir.root} is a Transformer-XL run: smoe slim takes BERT/RoBERTa runs")
    if not 1 <= args.budget <= config.num_experts:
        raise ValueError(f"--budget {args.budget} must be between 1 and the run's {config.num_experts} experts")
    if config.moe_layers != "all":
        raise ValueError(f"the run has experts in moe_layers={config.moe_layers} only: slimming needs every layer "
                         "to have experts (one intermediate size for the whole model)")
    tag = latest_tag(run_dir.checkpoints)
    if tag is None:
        raise ValueError(f"{run_dir.checkpoints} holds no complete checkpoint: train the run first")
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or run_dir.root / "tokenizer")
    model = build_mlm_model(config, tokenizer.pad_token_id)
    model.load_state_dict(full_state_dict(run_dir.checkpoints / tag))
    width = config.d_inner // config.num_experts
    report = {"run": str(run_dir.root), "checkpoint": tag, "budget": args.budget, "method": config.method}
    if get_method(config.method).dense and args.budget < config.num_experts:
        print(f"note: the {config.method} run has no experts to drop: budget {args.budget}/{config.num_experts} "
              f"means a dense MLP of width {width * args.budget}, freshly initialised (the other weights are the "
              "run's), to be trained from scratch")
        shared = {name: t for name, t in model.state_dict().items() if ".output.block." not in name}
        model = build_mlm_model(replace(config, d_inner=width * args.budget), tokenizer.pad_token_id)
        model.load_state_dict(shared, strict=False)
        report["dense_width"] = width * args.budget
    elif get_method(config.method).dense:
        print(f"note: the {config.method} run is dense; the full budget keeps it whole")
    else:
        k = args.k or args.budget
        for layer in (m for m in model.modules() if isinstance(m, SMoE)):
            layer.set_top_k(k)
        counts = count_experts(model, tokenizer, read_examples(Path(args.data), args.max_examples),
                               config.block_size)
        kept = [most_used(c, args.budget) for c in counts]
        for module, keep in zip(feedforward_modules(model), kept):
            module.block = keep_experts(module.block, keep)
        model.config.num_experts, model.config.intermediate_size = args.budget, width * args.budget
        model.config.top_k = min(k, args.budget)
        report.update(k=k, kept=kept, counts=[c.tolist() for c in counts])
        print(f"kept {args.budget} of {config.num_experts} experts per layer (counted at k={k}): "
              + "; ".join(f"layer {i}: {keep}" for i, keep in enumerate(kept)))
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "slim.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
