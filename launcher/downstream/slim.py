"""`smoe slim RUN_DIR --budget B | --params P --data FILE --out DIR`: a smaller model for fine-tuning.

One forward pass over the downstream training text counts how often the router picks
each expert of each layer (at k = B, or ``--k``); the B most used experts
per layer are kept and the rest dropped (:mod:`smoe.model.slim`). ``--params P`` picks
the largest B whose slim model has at most P parameters. ``--budget N`` gives back the
full model. A dense baseline cannot drop experts: there a budget means a dense MLP of
width B/N, freshly initialised, and the command says so.

A BERT/RoBERTa run gives a transformers directory (model and tokenizer). A Transformer-XL
run counts on the bytes of each example, as it was pretrained, and gives
``model.safetensors`` in the `smoe ckpt consolidate` format (its config, with B experts,
in the metadata). Both get ``slim.json`` with the kept experts and their counts, and
`smoe finetune` loads either.
"""

from __future__ import annotations

import bisect
import csv
import functools
import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from smoe.launcher.config import TrainConfig
from smoe.launcher.evaluation.metrics import model_size
from smoe.launcher.families import Family, family_of
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic
from smoe.model.dense import DenseFFN
from smoe.model.feedforward import get_method
from smoe.model.moe import SMoE, moe_layers_of, set_top_k
from smoe.model.slim import keep_experts, most_used

PARAMS_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a `smoe train` run: Transformer-XL, BERT or RoBERTa")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", type=int, help="experts kept per layer, 1..N")
    size.add_argument("--params", help="a parameter budget for the slim model instead, e.g. 600k or 1.5M: the most "
                                       "experts per layer that fit")
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
            texts = [row["sentence"] for row in rows if row["sentence"].strip()]
    else:
        texts = [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no example")
    return texts[:limit]


def save_slim(model: nn.Module, config: TrainConfig, family: Family, out: Path) -> None:
    """A transformers directory with the run's tokenizer (BERT/RoBERTa), or one consolidated
    safetensors file (Transformer-XL)."""
    if config.masked_lm:
        model.save_pretrained(out)  # its transformers config was built from ``config``
        family.tokenizer.save_pretrained(out)
    else:
        from smoe.launcher.checkpoints.consolidate import save_consolidated

        save_consolidated(model, config, out / "model.safetensors")


def slim_config(config: TrainConfig, budget: int, k: int) -> TrainConfig:
    """The run's config with ``budget`` experts per layer, each as wide as before, all at top-k
    ``k`` (at most ``budget``): what the slim model is built from and saved with."""
    width = config.d_ff // config.num_experts
    return replace(config, num_experts=budget, d_ff=width * budget, k_min=k, k_max=k, k_fixed=k,
                   eval_ks=tuple(sorted({min(e, budget) for e in config.eval_ks})), ep_size=1)


def parameter_count(text: str) -> int:
    """``--params``: a plain count or one with a k, M or G suffix (600000, 600k, 1.5M)."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?)([kmg]?)", text.strip().lower())
    if not match:
        raise ValueError(f"--params {text} is not a parameter count: write e.g. 600000, 600k or 1.5M")
    return round(float(match[1]) * PARAMS_SUFFIXES[match[2]])


def budget_for_params(text: str, config: TrainConfig, family: Family) -> int:
    """The largest number of experts per layer whose slim model has at most ``--params`` parameters."""
    limit = parameter_count(text)

    @functools.cache
    def size(budget: int) -> int:
        return model_size(family.build(slim_config(config, budget, k=1)))

    budget = bisect.bisect_right(range(1, config.num_experts + 1), limit, key=size)  # size grows with the budget
    if budget == 0:
        raise ValueError(f"--params {text} is too small: the slim model with one expert per layer has "
                         f"{size(1):,} parameters ({size(1) / 1e6:.2f}M); ask for at least that")
    log.info(f"--params {text} -> budget {budget} of {config.num_experts} experts per layer: "
             f"{size(budget) / 1e6:.2f}M parameters")
    return budget


@torch.no_grad()
def count_experts(family: Family, model: nn.Module, texts: list[str], batch_size: int = 32
                  ) -> list[torch.Tensor]:
    """Tokens routed to each expert of each MoE layer over ``texts``. Examples are batched
    by length, so no padding token is ever routed or counted."""
    model.eval()
    by_length: dict[int, list[list[int]]] = {}
    for ids in family.token_ids(texts):
        by_length.setdefault(len(ids), []).append(ids)
    totals = None
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            counts = family.expert_counts(model, torch.tensor(rows[start:start + batch_size]))
            totals = counts if totals is None else [t + c for t, c in zip(totals, counts)]
    return totals


def feedforward_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Each layer's feed-forward block (experts or a dense MLP), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (SMoE, DenseFFN))}


def copy_all_but_feedforward(source: nn.Module, target: nn.Module) -> None:
    """Every tensor of ``source`` into ``target`` (the same architecture at another budget),
    except the feed-forward blocks', which differ in size and are the caller's to fill."""
    blocks = tuple(f"{name}." for name in feedforward_blocks(source))
    target.load_state_dict({name: tensor for name, tensor in source.state_dict().items()
                            if not name.startswith(blocks)}, strict=False)


def run(args) -> None:
    from smoe.launcher.checkpoints.consolidate import full_state_dict
    from smoe.launcher.checkpoints.load import loadable_tag
    from smoe.launcher.checkpoints.run_dir import RunDir
    from smoe.launcher.checkpoints.schema import latest_tag

    run_dir = RunDir(Path(args.run_dir))
    config = replace(run_dir.load_config(), ep_size=1)
    experts = config.num_experts
    if config.moe_layers != "all":
        raise ValueError(f"the run has experts in moe_layers={config.moe_layers} only: slimming needs every layer "
                         "to have experts (one intermediate size for the whole model)")
    tag = latest_tag(run_dir.checkpoints)
    if tag is None:
        raise ValueError(f"{run_dir.checkpoints} holds no complete checkpoint: train the run first")
    family = family_of(config, run_dir.root)
    budget = args.budget if args.params is None else budget_for_params(args.params, config, family)
    if not 1 <= budget <= experts:
        raise ValueError(f"--budget {budget} must be between 1 and the run's {experts} experts")
    model = family.build(config)
    tag = loadable_tag(run_dir.checkpoints, model)  # checked file by file; an older one if the newest is damaged
    model.load_state_dict(full_state_dict(run_dir.checkpoints / tag))
    width = config.d_ff // experts
    report = {"run": str(run_dir.root), "checkpoint": tag, "run_experts": experts, "budget": budget,
              "method": config.method}
    if get_method(config.method).dense:
        target = slim_config(config, budget, k=1)  # dense: k is unused
        slim = family.build(target)
        copy_all_but_feedforward(model, slim)
        if budget < experts:
            log.note(f"the {config.method} run has no experts to drop: budget {budget}/{experts} "
                     f"means a dense MLP of width {width * budget}, freshly initialised (the other weights are the "
                     "run's), to be trained from scratch")
            report["dense_width"] = width * budget
        else:
            log.note(f"the {config.method} run is dense; the full budget keeps it whole")
            for block, slim_block in zip(feedforward_blocks(model).values(), feedforward_blocks(slim).values()):
                slim_block.load_state_dict(block.state_dict())
    else:
        k = args.k or budget
        set_top_k(model, k)
        counts = count_experts(family, model, read_examples(Path(args.data), args.max_examples))
        kept = [most_used(c, budget) for c in counts]
        target = slim_config(config, budget, min(k, budget))
        slim = family.build(target)
        copy_all_but_feedforward(model, slim)
        for layer, slim_layer, keep in zip(moe_layers_of(model), moe_layers_of(slim), kept):
            slim_layer.load_state_dict(keep_experts(layer, keep).state_dict())
        report.update(k=k, kept=kept, counts=[c.tolist() for c in counts])
        log.info(f"kept {budget} of {experts} experts per layer (counted at k={k}): "
                 + "; ".join(f"layer {i}: {keep}" for i, keep in enumerate(kept)))
    report["parameters"] = model_size(slim)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_slim(slim, target, family, out)
    write_atomic(out / "slim.json", json.dumps(report, indent=2))
    log.info(f"wrote {out}")
