"""`smoe eval RUN`: the sweep by k of a run's latest checkpoint, on its own data or another's."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch
from torch import nn

from smoe.launcher.checkpoints.load import loadable_tag
from smoe.launcher.checkpoints.run_dir import RunDir
from smoe.launcher.config import TrainConfig, check_k_settings
from smoe.launcher.evaluation.sweep import SweepRow, format_header, k_label, plot, rows_to_json, sweep
from smoe.launcher.families import Family, family_of
from smoe.launcher.runtime import log
from smoe.launcher.runtime.distributed import init_distributed
from smoe.launcher.runtime.engine import build_engine, engine_config
from smoe.launcher.runtime.files import write_atomic
from smoe.model.autotune import set_auto_paths


@dataclass
class LoadedRun:
    """A run's latest loadable checkpoint in its engine's module, with what evaluating it needs."""

    run: RunDir
    config: TrainConfig
    tag: str
    family: Family
    model: nn.Module
    device: torch.device
    rank: int
    world: int


def load_run(run_dir, data_dir: str | None = None, data_file: str | None = None) -> LoadedRun:
    """The run's latest loadable checkpoint (an older one when the newest is damaged, with a note) and
    its data, on one process (ep_size 1) or on as many ranks as it was trained with: experts load by
    global id."""
    rank, world = init_distributed()
    run = RunDir(run_dir)
    config = run.load_config()
    if world % config.ep_size:
        config = replace(config, ep_size=1)
    family = family_of(config, run.root)
    family.load_data(data_dir, data_file)
    model = family.build(config, rank)
    # Checked (every file there, readable, the model's shapes) before DeepSpeed loads it. The optimizer
    # files are not needed here.
    tag = loadable_tag(run.checkpoints, model)
    engine = build_engine(model, engine_config(config, world, None, training=False))
    engine.load_checkpoint(str(run.checkpoints), tag=tag, load_optimizer_states=False,
                           load_lr_scheduler_states=False, load_module_only=True)
    if run.dispatch.is_file():  # dispatch=auto as the run timed it
        set_auto_paths(engine.module, json.loads(run.dispatch.read_text()))
    return LoadedRun(run, config, tag, family, engine.module, engine.device, rank, world)


def evaluate_run(run_dir, ks: list[int | tuple[int, ...]] | None = None, json_path=None, plot_path=None,
                 data_dir: str | None = None, data_file: str | None = None) -> list[SweepRow]:
    """`smoe eval`: the sweep for a run's latest checkpoint, on its own data unless told otherwise."""
    config = RunDir(run_dir).load_config()
    ks = list(ks or config.eval_ks)
    check_k_settings(ks, config, f"--k {','.join(map(k_label, ks))}")
    loaded = load_run(run_dir, data_dir, data_file)
    model, device, family, rank, world = loaded.model, loaded.device, loaded.family, loaded.rank, loaded.world
    unit = family.unit
    log.info(f"{loaded.run.root} ({config.method}, {loaded.tag}) on {family.source}\n{format_header(unit)}")
    rows = sweep(model, ks, lambda: family.eval_loss(model, "valid", rank, world, device),
                 lambda: family.eval_loss(model, "test", rank, world, device),
                 lambda: family.flops_per_token(model, device))
    if rank == 0:
        if json_path:
            report = {"run": str(loaded.run.root), "checkpoint": loaded.tag, "source": family.source,
                      "method": config.method, "unit": unit, "rows": rows_to_json(rows)}
            write_atomic(json_path, json.dumps(report, indent=2))
        if plot_path:
            plot(rows, plot_path, f"{config.method} on {family.source}", unit)
    return rows
