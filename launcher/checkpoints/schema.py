"""What a run's checkpoints are on disk: the one place that names their files and keys.

Layout under ``RUN/checkpoints/``::

    step000250/             DeepSpeed's files: model states (with the client state
                            below), optimizer states, one file per expert
    step000250/rank0.pt     what only this rank knows: RNG states, Transformer-XL memory,
                            the random routers' generators, its optimizer's parameter
                            names (to reshard onto another layout, see reshard.py)
    step000250/manifest.json  every other file's size and CRC-32 (:mod:`.manifest`),
                            written last: a step directory without it is a save that
                            did not finish (or one of an smoe older than manifests)
    latest                  the tag of the last *complete* checkpoint

``latest`` is replaced atomically, and only after every rank has finished writing and the
manifest is on disk, so a run killed while saving resumes from the checkpoint before
(:mod:`.save`). Every loader checks a checkpoint file by file before loading it (:mod:`.load`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypedDict

import torch
from torch import nn

LATEST = "latest"
MANIFEST = "manifest.json"
TAG = re.compile(r"step(\d+)")  # the step directories; anything else in checkpoints/ is left alone
# DeepSpeed's file names (mp_rank_00: no model parallelism).
MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILES = "layer_*_expert_*_mp_rank_00_model_states.pt"


class ClientState(TypedDict):
    """What the loop saves in DeepSpeed's model-states file, next to the weights."""

    step: int  # optimizer steps taken (= batches consumed)
    world_size: int  # the ranks it was saved on
    data: dict  # the training stream's position
    k_schedule: dict  # TopKSchedule.state_dict()
    config: dict  # TrainConfig.to_dict() (ep_size: the expert layout it was saved on)
    optimizer_kind: str  # deepspeed_config.optimizer_kind: whose moments the optimizer files hold


def tag_of(step: int) -> str:
    return f"step{step:06d}"


def tag_step(tag: str) -> int | None:
    match = TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def expert_file(layer: int, expert: int) -> str:
    """DeepSpeed's file of one expert (``expert``: its global id) of the ``layer``-th MoE layer."""
    return f"layer_{layer}_expert_{expert}_{MODEL_STATES}"


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


RANK_FILES = "rank*.pt"


def expert_optimizer_file(ep_rank: int) -> str:
    return f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def optimizer_files(main_state: dict, has_experts: bool) -> list[str]:
    """The optimizer files DeepSpeed writes for the layout a checkpoint was saved on: one per
    expert-parallel rank for a MoE model without ZeRO, one per data-parallel rank with ZeRO (``bf16_``
    first under bf16); none for a dense model without ZeRO (its optimizer is in the model states)."""
    ds = main_state.get("ds_config") or {}
    world = main_state.get("world_size") or main_state.get("dp_world_size") or 1
    if ds.get("zero_optimization", {}).get("stage", 0):
        prefix = "bf16_" if ds.get("bf16", {}).get("enabled") else ""
        return [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    if has_experts:
        ep_size = (main_state.get("config") or {}).get("ep_size", 1)
        return [expert_optimizer_file(r) for r in range(ep_size)]
    return []


def completed(tag_dir: Path) -> bool:
    """Whether the save of ``tag_dir`` got to its end: the manifest is written last."""
    return (Path(tag_dir) / MANIFEST).is_file()


def _followed_latest(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(the directory ``latest`` names, None) or (None, why it cannot be followed)."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.exists():
        return None, "is missing"
    try:
        text = pointer.read_bytes().decode(errors="replace").strip()
    except OSError as error:
        return None, f"cannot be read ({error.strerror})"
    if not text:
        return None, "is empty"
    if "/" in text or text in (".", "..") or not (pointer.parent / text).is_dir():
        return None, f"names {ascii(text[:40])}, which is not a directory in {pointer.parent}"
    return text, None


def latest(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(tag, why): the checkpoint to continue from, and why ``latest`` was not followed (None when it was).
    When ``latest`` is missing or damaged the tag is the newest step directory whose save completed
    (:func:`completed`), if any: never one a killed save left half-written."""
    tag, why = _followed_latest(ckpt_dir)
    if tag is not None:
        return tag, None
    done = [p.name for p in reversed(step_dirs(ckpt_dir)) if completed(p)]
    return (done[0] if done else None), why


def latest_tag(ckpt_dir: Path) -> str | None:
    """The checkpoint to continue from (:func:`latest`); None when the run has none."""
    return latest(ckpt_dir)[0]


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """The step directories under ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if tag_step(p.name) is not None and p.is_dir()),
                  key=lambda p: tag_step(p.name))


def generators(model: nn.Module) -> dict[str, torch.Generator]:
    """The private generators of modules (random and THOR routers), by module name: saved in each
    rank file."""
    return {name: module.generator for name, module in model.named_modules()
            if isinstance(getattr(module, "generator", None), torch.Generator)}
