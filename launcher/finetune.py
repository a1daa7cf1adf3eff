"""`smoe finetune TASK --model DIR --out RUN`: downstream fine-tuning at any expert budget.

``--model`` is a transformers directory of ours: `smoe slim` output (B experts per
layer), or `smoe convert` output. The encoder and its routers are loaded from it, the
task's head is new, and every weight but the frozen routers is fine-tuned with AdamW
on the DeepSpeed engine at the k given by ``--k`` (default: the model's). The result,
``RUN/result.json``, holds dev accuracy with the budget, k and active parameters.

Tasks: ``sst2`` (GLUE SST-2 sentiment, BERT/RoBERTa classification heads; ``--data``
is a directory with ``train.tsv`` and ``dev.tsv``, or omitted to load GLUE through
``datasets``).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TASKS = ("sst2",)


@dataclass
class FinetuneConfig:
    lr: float = 2e-5
    batch_size: int = 32
    epochs: int = 3
    max_length: int = 128
    weight_decay: float = 0.01
    seed: int = 0
    max_train_examples: int = 0  # 0: all
    log_every: int = 50


def add_arguments(parser) -> None:
    parser.add_argument("task", help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--model", required=True, help="a transformers directory from `smoe slim` or `smoe convert`")
    parser.add_argument("--out", required=True, help="directory for result.json and the fine-tuned model")
    parser.add_argument("--data", help="task data directory (default: download through datasets)")
    parser.add_argument("--k", type=int, help="top-k during fine-tuning and evaluation (default: the model's)")
    for field, default in asdict(FinetuneConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)


def read_sst2_split(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) pairs from a GLUE SST-2 TSV, refusing other columns or labels."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --data must hold SST-2's train.tsv and dev.tsv")
    with open(path, newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not {"sentence", "label"} <= set(rows.fieldnames or []):
            raise ValueError(f"{path} has columns {rows.fieldnames}: SST-2 needs 'sentence' and 'label'")
        examples = []
        for line, row in enumerate(rows, start=2):
            if row["label"] not in ("0", "1"):
                raise ValueError(f"{path}:{line}: label {row['label']!r} is not one of SST-2's classes 0, 1")
            examples.append((row["sentence"], int(row["label"])))
    return examples


def load_sst2(data_dir: str | None) -> dict[str, list[tuple[str, int]]]:
    if data_dir:
        return {split: read_sst2_split(Path(data_dir) / f"{split}.tsv") for split in ("train", "dev")}
    import datasets

    glue = datasets.load_dataset("glue", "sst2")
    return {split: list(zip(glue[name]["sentence"], glue[name]["label"]))
            for split, name in (("train", "train"), ("dev", "validation"))}


def batches(examples, batch_size: int, generator: torch.Generator | None = None):
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]


@torch.no_grad()
def accuracy(model, tokenizer, examples, config: FinetuneConfig, device) -> float:
    model.eval()
    correct = 0
    for batch in batches(examples, 64):
        inputs = tokenizer([text for text, _ in batch], truncation=True, max_length=config.max_length,
                           padding=True, return_tensors="pt").to(device)
        predictions = model(**inputs).logits.argmax(dim=-1).cpu()
        correct += int((predictions == torch.tensor([label for _, label in batch])).sum())
    model.train()
    return correct / len(examples)


def run(args) -> None:
    import deepspeed
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from smoe.model.bert import aux_loss  # importing smoe.model.bert registers our configs with the Auto classes
    from smoe.model.parallel import optimizer_param_groups

    from .build import device, init_distributed
    from .evaluate import active_parameters, moe_layers_of, set_top_k

    if args.task not in TASKS:
        raise ValueError(f"task '{args.task}' is unknown: use one of {', '.join(TASKS)}")
    config = FinetuneConfig(**{field: getattr(args, field) for field in asdict(FinetuneConfig())})
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir} holds no config.json: pass `smoe slim` or `smoe convert` output")
    model_config = AutoConfig.from_pretrained(model_dir)
    if not hasattr(model_config, "num_experts"):
        raise ValueError(f"--model {model_dir} is a plain '{model_config.model_type}' model: make it ours with "
                         "`smoe convert` first")
    positions = model_config.max_position_embeddings - (
        model_config.pad_token_id + 1 if model_config.model_type == "smoe-roberta" else 0)
    if config.max_length > positions:
        print(f"note: --max-length {config.max_length} cut to the model's {positions} positions")
        config.max_length = positions
    data = load_sst2(args.data)
    train = data["train"][:config.max_train_examples or None]
    init_distributed()
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    experts = moe_layers_of(model)
    k = args.k or model_config.top_k
    if experts:
        if not 1 <= k <= model_config.num_experts:
            raise ValueError(f"--k {k} must be between 1 and the model's {model_config.num_experts} experts")
        set_top_k(model, k)
    steps = math.ceil(len(train) / config.batch_size) * config.epochs
    optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config={
        "train_micro_batch_size_per_gpu": config.batch_size, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0}, "steps_per_print": 2**31 - 1})
    where = device()
    generator = torch.Generator().manual_seed(config.seed)
    step, started = 0, time.perf_counter()
    print(f"fine-tuning {model_dir} on {args.task}: {len(train):,} examples x {config.epochs} epochs = {steps} steps, "
          f"{model_config.num_experts if experts else 'dense'} experts, k={k if experts else '-'}", flush=True)
    for epoch in range(config.epochs):
        for batch in batches(train, config.batch_size, generator):
            inputs = tokenizer([text for text, _ in batch], truncation=True, max_length=config.max_length,
                               padding=True, return_tensors="pt").to(where)
            labels = torch.tensor([label for _, label in batch], device=where)
            loss = engine(**inputs, labels=labels).loss + aux_loss(engine.module)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} at step {step + 1}: lower --lr")
            engine.backward(loss)
            engine.step()
            step += 1
            if step % config.log_every == 0 or step == steps:
                elapsed = time.perf_counter() - started
                print(f"epoch {epoch + 1} step {step}/{steps} | loss {loss.item():.4f} | "
                      f"{elapsed / step:.3f} s/step | ETA {(steps - step) * elapsed / step:.0f}s", flush=True)
    dev_accuracy = accuracy(engine.module, tokenizer, data["dev"], config, where)
    result = {"task": args.task, "model": str(model_dir), "method": model_config.method,
              "experts": model_config.num_experts, "k": k if experts else None,
              "active_params": active_parameters(engine.module, k if experts else None),
              "dev_accuracy": dev_accuracy, "train_examples": len(train), **asdict(config)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine.module.save_pretrained(out / "model")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"{args.task} dev accuracy {dev_accuracy:.4f} ({model_config.num_experts} experts, k={result['k']}, "
          f"{result['active_params'] / 1e6:.2f}M active parameters): {out / 'result.json'}")
