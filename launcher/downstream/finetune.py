"""`smoe finetune TASK --model DIR --out RUN`: downstream fine-tuning at any expert budget.

``--model`` is a pretrained model directory of ours: `smoe slim` output (B experts per
layer, BERT/RoBERTa or Transformer-XL) or `smoe convert` output. The task builds its
head on it (:mod:`smoe.launcher.downstream.tasks`), and every weight but the frozen routers is
fine-tuned with AdamW and a linear decay on the DeepSpeed engine, at the k given by
``--k`` (default: the model's). Cross-validated tasks fine-tune a fresh copy per fold.
``RUN/result.json`` holds the dev metrics (per split and their mean) with the method,
budget, k and active parameters; `smoe report` reads it.

Tasks: ``sst2`` (BERT/RoBERTa/Transformer-XL), ``csqa`` (BERT/RoBERTa), ``asdiv-a`` and
``mawps`` (5-fold cross-validation) and ``svamp`` (BERT/RoBERTa with an equation decoder).
``--data`` is the task's directory (the layout of ``../shared/data``), or omitted to
load the task through ``datasets``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from smoe.data.lm_stream import rank_share
from smoe.launcher.downstream.tasks import TASKS, TaskModel, get_task, model_family
from smoe.launcher.runtime import deepspeed_config
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic


@dataclass
class FinetuneConfig:
    lr: float = 0.0  # 0: the body's default, 2e-5 for BERT/RoBERTa and 1e-4 for Transformer-XL
    batch_size: int = 32
    epochs: int = 3
    max_length: int = 128
    weight_decay: float = 0.01
    seed: int = 0
    max_train_examples: int = 0  # 0: all
    log_every: int = 50
    head_lr: float = 0.0  # 0: --lr everywhere; else the lr of a head trained from scratch (an equation decoder)
    ds_config: str = ""  # DeepSpeed JSON (a ds_configs/ name or a path, e.g. bf16 or fp16); empty: cpu (fp32)

    def __post_init__(self):
        for name in ("batch_size", "epochs", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if min(self.lr, self.head_lr, self.max_train_examples) < 0:
            raise ValueError("--lr, --head-lr and --max-train-examples must not be negative")


def add_config_arguments(parser) -> None:
    for field, default in asdict(FinetuneConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)


def config_from(args) -> FinetuneConfig:
    return FinetuneConfig(**{field: getattr(args, field) for field in asdict(FinetuneConfig())})


def add_arguments(parser) -> None:
    parser.add_argument("task", help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--model", required=True, help="a pretrained directory from `smoe slim` or `smoe convert`")
    parser.add_argument("--out", required=True, help="directory for result.json and the fine-tuned model")
    parser.add_argument("--data", help="task data directory (default: download through datasets)")
    parser.add_argument("--k", type=int, help="top-k during fine-tuning and evaluation (default: the model's)")
    parser.add_argument("--splits", help="comma-separated splits to run, e.g. fold0,fold1 (default: all)")
    add_config_arguments(parser)


def batches(examples: list, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
    """This rank's share of each global batch of a shuffled epoch. Every rank draws the same order,
    so the shares are disjoint; a last batch too short to give every rank a row is left out."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if len(batch) >= world:
            yield [examples[i] for i in batch[rank_share(len(batch), rank, world)]]


def set_k(model: TaskModel, k: int | None) -> int | None:
    """Top-k of every MoE layer set to ``k`` (default: as loaded); None for a dense model."""
    from smoe.model import moe_layers_of, set_top_k, top_k_of

    layers = moe_layers_of(model)
    if not layers or k is None:
        return top_k_of(model)
    experts = layers[0].num_experts
    if not 1 <= k <= experts:
        raise ValueError(f"--k {k} must be between 1 and the model's {experts} experts")
    set_top_k(model, k)
    return k


def fine_tune(model: TaskModel, train: list, config: FinetuneConfig, what: str = "fine-tuning") -> TaskModel:
    """Train ``model`` on ``train`` for ``config.epochs`` on a DeepSpeed engine built from
    ``config.ds_config`` (its precision and ZeRO stage); every data-parallel rank trains on its own
    share of each batch. Returns the trained module, on the engine's device."""
    import deepspeed.comm as dist
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from smoe.launcher.runtime.engine import build_engine
    from smoe.launcher.training.losses import TrainingDiverged
    from smoe.model import moe_layers_of

    rank, world = dist.get_rank(), dist.get_world_size()
    ds = deepspeed_config.engine_json(config.ds_config, config.batch_size, 1, world, clip=0.0,
                                      has_experts=bool(moe_layers_of(model)))
    steps = sum(1 for start in range(0, len(train), config.batch_size)
                if len(train) - start >= world) * config.epochs
    lr = config.lr or model.default_lr
    head = {id(p) for p in model.new_parameters()} if config.head_lr else set()
    trainable = [p for p in model.parameters() if p.requires_grad]  # the frozen routers are left out
    groups = [{"name": "body", "params": [p for p in trainable if id(p) not in head], "lr": lr},
              {"name": "head", "params": [p for p in trainable if id(p) in head], "lr": config.head_lr}]
    param_groups = split_params_into_different_moe_groups_for_optimizer([group for group in groups if group["params"]])
    engine = build_engine(model, ds, param_groups, lambda step: max(0.0, 1 - step / steps), config.weight_decay)
    torch.manual_seed(config.seed + rank)  # the model is built (alike on every rank); dropout differs by rank
    generator = torch.Generator().manual_seed(config.seed)
    step, started = 0, time.perf_counter()
    log.info(f"{what}: {len(train):,} examples x {config.epochs} epochs = {steps} steps of {config.batch_size} over "
             f"{world} rank(s), lr {lr:g}" + (f", head lr {config.head_lr:g}" if head else ""))
    for epoch in range(config.epochs):
        for batch in batches(train, config.batch_size, generator, rank, world):
            loss = engine(batch)
            engine.backward(loss)
            mean_loss = loss.detach().float() / world
            dist.all_reduce(mean_loss)  # the same value on every rank, so all of them stop together
            mean_loss = mean_loss.item()  # the step's one read-back
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"the loss is {mean_loss} at step {step + 1}: lower --lr")
            engine.step()
            step += 1
            if step % config.log_every == 0 or step == steps:
                elapsed = time.perf_counter() - started
                log.info(f"epoch {epoch + 1} step {step}/{steps} | loss {mean_loss:.4f} | "
                         f"{elapsed / step:.3f} s/step | ETA {(steps - step) * elapsed / step:.0f}s")
    return engine.module


def mean_metrics(per_split: list[dict]) -> dict[str, float]:
    return {name: statistics.fmean(r[name] for r in per_split) for name in per_split[0] if name != "split"}


def run(args) -> None:
    from smoe.launcher.runtime.distributed import init_distributed

    task = get_task(args.task)
    config = config_from(args)
    if args.k is not None and args.k < 1:  # the upper bound needs the model: checked when it is built
        raise ValueError(f"--k {args.k} must be at least 1")
    model_dir = Path(args.model)
    family = model_family(model_dir)
    if family not in task.families:
        raise ValueError(f"{task.name} fine-tunes {' or '.join(task.families)} models; {model_dir} holds a {family}")
    splits = task.splits(args.data)
    if args.splits:
        wanted = args.splits.split(",")
        unknown = sorted(set(wanted) - {split.name for split in splits})
        if unknown:
            raise ValueError(f"--splits {unknown} are not splits of {task.name}: "
                             f"use {', '.join(split.name for split in splits)}")
        splits = [split for split in splits if split.name in wanted]
    init_distributed()
    per_split, models = [], []
    for split in splits:
        torch.manual_seed(config.seed)
        model = task.build(model_dir, split, config.max_length)
        k = set_k(model, args.k)
        train = split.train[:config.max_train_examples or None]
        model = fine_tune(model, train, config, what=f"{task.name} {split.name} on {model_dir} "
                                                      f"({model.method}, k={k or '-'})")
        metrics = model.evaluate(split.dev)
        log.info(f"{task.name} {split.name}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
        per_split.append({"split": split.name, **metrics})
        models.append((split.name, model))
    result = {"task": task.name, "model": str(model_dir), "family": family, **slim_record(model_dir),
              **describe(model, k),
              "metric": task.metric, "dev": mean_metrics(per_split), "splits": per_split,
              "train_examples": len(train), **asdict(config)}
    write_result(Path(args.out), result, models)


def slim_record(model_dir: Path) -> dict:
    """What `smoe slim` recorded of the model: the run, its experts N and the budget B kept (none: the full model)."""
    path = model_dir / "slim.json"
    if not path.is_file():
        return {}
    slim = json.loads(path.read_text())
    return {key: slim[key] for key in ("run", "run_experts", "budget") if key in slim}


def describe(model: TaskModel, k: int | None) -> dict:
    """What the reports need of a fine-tuned model: its method, experts per layer, k and active parameters."""
    from smoe.model import moe_layers_of

    from smoe.launcher.evaluation.metrics import active_parameters

    layers = moe_layers_of(model)
    return {"method": model.method, "experts": layers[0].num_experts if layers else None, "k": k,
            "active_params": active_parameters(model, k)}


def write_result(out: Path, result: dict, models: list[tuple[str, TaskModel]]) -> None:
    """The fine-tuned model(s) and ``result.json``, written last: a directory with a result is complete.
    Rank 0 writes (every rank holds the same model)."""
    import deepspeed.comm as dist

    if dist.get_rank() != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, trained in models:
        trained.save(out / ("model" if len(models) == 1 else f"model-{name}"))
    write_atomic(out / "result.json", json.dumps(result, indent=2).encode())
    metric, experts = result["metric"], result["experts"]
    log.info(f"{result['task']} dev {metric} {result['dev'][metric]:.4f} over {len(result['splits'])} split(s) "
             f"({result['method']}, {f'{experts} expert(s)' if experts else 'dense'}, k={result['k'] or '-'}, "
             f"{result['active_params'] / 1e6:.2f}M active parameters): {out / 'result.json'}")
