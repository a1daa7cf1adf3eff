"""Checkpoints through DeepSpeed's engine, made crash-safe and exactly resumable.

Layout under ``RUN/checkpoints/``::

    step000250/             DeepSpeed's files: model states (with the training state
                            below as client state), optimizer, one file per expert
    step000250/rank0.pt     what only this rank knows: RNG states, Transformer-XL memory,
                            the random routers' generators, its optimizer's parameter
                            names (to reshard onto another layout, see reshard.py)
    latest                  the tag of the last *complete* checkpoint

``latest`` is replaced atomically, and only after every rank has finished writing, so a
run killed while saving resumes from the checkpoint before. Older checkpoints are
deleted only after that.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import deepspeed.comm as dist
import numpy as np
import torch
from torch import nn

from smoe.model.moe import ExpertDispatcher

from . import deepspeed_config, reshard


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside ``path``, then rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = Path(ckpt_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def generators(model: nn.Module) -> dict[str, torch.Generator]:
    """The private generators of modules (random and THOR routers), by module name."""
    return {name: module.generator for name, module in model.named_modules()
            if isinstance(getattr(module, "generator", None), torch.Generator)}


def rank_state(engine, mems: list[torch.Tensor] | None) -> dict:
    model = engine.module
    return {
        "torch": torch.get_rng_state(),
        # This rank's device only: a job resumed on a node where it sees fewer GPUs must still load it.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": {name: g.get_state() for name, g in generators(model).items()},
        "mems": None if mems is None else [m.cpu() for m in mems],
        "optimizer_params": reshard.optimizer_param_names(engine),  # to move Adam's state to another layout
    }


def restore_rank_state(model: nn.Module, state: dict, device: torch.device) -> list[torch.Tensor] | None:
    """Put the RNG states back and return the saved memory (on ``device``).

    A state saved on another kind of device (a CPU run resumed on a GPU) does not fit; that
    generator keeps its fresh seed."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # older checkpoints saved every visible device's state
        index = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for name, generator in generators(model).items():
        saved = state["generators"][name]
        if saved.numel() == generator.get_state().numel():
            generator.set_state(saved)
    return None if state["mems"] is None else [m.to(device) for m in state["mems"]]


def save(engine, ckpt_dir: Path, step: int, client_state: dict, mems, keep: int) -> str:
    """Save on every rank (a collective); returns the tag."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step:06d}"
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    buffer = io.BytesIO()
    torch.save(rank_state(engine, mems), buffer)
    write_atomic(ckpt_dir / tag / f"rank{rank}.pt", buffer.getvalue())
    dist.barrier()  # every rank's files are on disk before `latest` moves
    if rank == 0:
        write_atomic(ckpt_dir / "latest", tag.encode())
        older = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name != tag)
        for path in older[:max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return tag


def saved_optimizer_kind(main_state: dict) -> str | None:
    """The optimizer kind a checkpoint was written with (older ones: from their ds_config, None if gone)."""
    if "optimizer_kind" in main_state:
        return main_state["optimizer_kind"]
    try:
        return deepspeed_config.optimizer_kind(deepspeed_config.load(main_state["config"]["ds_config"])[0])
    except ValueError:
        return None


def load(engine, ckpt_dir: Path, device: torch.device, ep_size: int, seed: int) -> tuple[dict, list | None]:
    """Load the latest complete checkpoint: DeepSpeed's states, then this rank's own state.

    On the layout it was saved with, everything is restored exactly; on another world size
    or ep_size it is resharded (:mod:`.reshard`). Returns the client state saved with it
    and this rank's Transformer-XL memory."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise ValueError(f"no complete checkpoint in {ckpt_dir} (no 'latest' file): start without --resume")
    tag_dir = ckpt_dir / tag
    main_state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    saved_world, saved_ep_size = main_state["world_size"], main_state["config"]["ep_size"]
    rank_files = [tag_dir / f"rank{r}.pt" for r in range(saved_world)]
    missing = [f.name for f in rank_files if not f.is_file()]
    moe_layers = [m for m in engine.module.modules() if isinstance(m, ExpertDispatcher)]
    if moe_layers:
        missing += reshard.expert_files_missing(tag_dir, len(moe_layers), moe_layers[0].num_experts)
    if missing:
        raise ValueError(f"checkpoint {tag_dir} is incomplete or holds other experts: {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} missing. Point 'latest' at a complete step "
                         "directory, or start a new run")
    if (saved_world, saved_ep_size) != (dist.get_world_size(), ep_size):
        rank_states = [torch.load(f, map_location="cpu", weights_only=False) for f in rank_files]
        mems, notes = reshard.load_resharded(engine, tag_dir, main_state, rank_states, device, ep_size, seed)
        if dist.get_rank() == 0:
            print("note: " + "; ".join(notes), flush=True)
        return main_state, mems
    saved_kind, kind = saved_optimizer_kind(main_state), deepspeed_config.optimizer_kind(engine.config)
    if saved_kind not in (None, kind):
        reshard.load_weights(engine, tag_dir, main_state)
        if dist.get_rank() == 0:
            print(f"note: the checkpoint's optimizer is {saved_kind}, this run's is {kind}: weights, lr schedule, "
                  "step and data position are loaded, the optimizer RESTARTS with zero moments (resume with the "
                  f"saved ds_config={main_state['config']['ds_config']} to keep them)", flush=True)
        state = torch.load(rank_files[dist.get_rank()], map_location="cpu", weights_only=False)
        return main_state, restore_rank_state(engine.module, state, device)
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {tag_dir}: it is incomplete or corrupt; "
                         f"point 'latest' at an older step directory or start a new run")
    state = torch.load(rank_files[dist.get_rank()], map_location="cpu", weights_only=False)
    return client_state, restore_rank_state(engine.module, state, device)
