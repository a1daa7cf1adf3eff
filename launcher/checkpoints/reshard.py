"""Resuming on another layout: a checkpoint written by W ranks with ep_size E, continued
by W' ranks with ep_size E' (2 -> 1 when the GPUs are gone, 1 -> 2 when more arrive).

DeepSpeed saves every expert in its own file under its global id, so the weights load
on any layout. The rest is per rank and is moved here:

* Adam's moments: DeepSpeed writes one optimizer file per expert-parallel rank,
  indexed by position. Each rank also saves its parameters' names (with global expert
  ids) in that order, so the state of every parameter is found by name and handed to
  whichever rank holds it now. Optimizers wrapped by DeepSpeed (fp16, bf16, ZeRO) keep
  flat partitions instead; for those the optimizer restarts, and the run says so.
* Transformer-XL memory: rank r holds rows [r B/W, (r+1) B/W) of the global batch; the
  rows are put back together and cut again for W'.
* The data position is global already; the lr schedule and step are in the client state.
* RNG streams cannot be split or merged; they are reseeded from (seed, step, rank).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from smoe.launcher.checkpoints import schema
from smoe.model.moe import global_names


def global_param_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> its name on an ep_size 1 model: local expert ids become global ones."""
    names = global_names(model)
    return {id(p): names[name] for name, p in model.named_parameters()}


def optimizer_param_names(engine) -> list[str] | None:
    """The names of the optimizer's parameters in its state order, or None when DeepSpeed wraps it."""
    optimizer = engine.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer) or engine.config.get("zero_optimization", {}).get("stage", 0):
        return None
    names = global_param_names(engine.module)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def move_optimizer(engine, tag_dir: Path, rank_states: list[dict], saved_ep_size: int) -> bool:
    """Give every parameter its saved Adam state; False when that is impossible (wrapped optimizer)."""
    names_now = optimizer_param_names(engine)
    saved_names = [state.get("optimizer_params") for state in rank_states[:saved_ep_size]]
    if names_now is None or any(names is None for names in saved_names):
        return False
    saved = {}  # name -> that parameter's Adam state
    for ep_rank, names in enumerate(saved_names):
        optimizer = torch.load(tag_dir / schema.expert_optimizer_file(ep_rank), map_location="cpu",
                               weights_only=False)["optimizer"]
        saved.update({name: optimizer["state"][index] for index, name in enumerate(names)
                      if index in optimizer["state"]})
    state = engine.optimizer.state_dict()
    state["state"] = {index: saved[name] for index, name in enumerate(names_now) if name in saved}
    for group in state["param_groups"]:  # one schedule drives every group
        group["lr"] = optimizer["param_groups"][0]["lr"]
    engine.optimizer.load_state_dict(state)
    return True


def split_mems(rank_states: list[dict], rank: int, world: int, device: torch.device) -> list[torch.Tensor] | None:
    """This rank's rows of the memory saved by all ranks of the old layout."""
    if any(state["mems"] is None for state in rank_states):
        return None
    layers = zip(*(state["mems"] for state in rank_states))
    return [torch.cat(rows, dim=0).chunk(world, dim=0)[rank].to(device) for rows in layers]


def load_weights(engine, tag_dir: Path, main_state: dict) -> None:
    """The weights (experts by global id) and the lr schedule of ``tag_dir``, not the optimizer's states:
    DeepSpeed refreshes a wrapped optimizer's fp32 master weights from them."""
    engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(main_state["lr_scheduler"])


def load_resharded(engine, tag_dir: Path, main_state: dict, rank_states: list[dict], device: torch.device,
                   ep_size: int, seed: int) -> tuple[list[torch.Tensor] | None, list[str]]:
    """Load ``tag_dir`` into an engine on another layout; returns this rank's memory and notes to print."""
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    load_weights(engine, tag_dir, main_state)
    notes = [f"resharded from {main_state['world_size']} ranks (ep_size {main_state['config']['ep_size']}) to "
             f"{world} ranks (ep_size {ep_size})"]
    if move_optimizer(engine, tag_dir, rank_states, main_state["config"]["ep_size"]):
        notes.append("Adam moments moved to the ranks that now hold their parameters")
    else:
        notes.append("the optimizer RESTARTS with zero moments: DeepSpeed's fp16/bf16/ZeRO optimizers keep flat "
                     "partitions that are not moved between layouts (resume on the saved layout to keep them)")
    step = main_state["step"]
    torch.manual_seed(seed + step * world + rank)
    for module in engine.module.modules():
        if isinstance(getattr(module, "generator", None), torch.Generator):
            module.generator.manual_seed(seed + step * world + rank)
    notes.append("random number streams are reseeded (dropout masks differ from an uninterrupted run)")
    return split_mems(rank_states, rank, world, device), notes
