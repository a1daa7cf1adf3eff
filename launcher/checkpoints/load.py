"""Loading a checkpoint: checked file by file first, then exactly resumed or resharded.

Every loader (``--resume``, `smoe eval`, `smoe slim`, `smoe ckpt consolidate`) goes through
:func:`loadable_tag`: the checkpoint ``latest`` names is checked file by file (against its
manifest's sizes and checksums, then present, readable, the model's tensor names and shapes)
before anything is loaded, and when it is damaged the newest complete older one is used
instead, with a note; so is the newest complete one when ``latest`` itself is missing or
damaged. Nothing is deleted.
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.moe.layer import MoE
from torch import nn

from smoe.launcher.checkpoints import manifest, reshard, schema
from smoe.launcher.runtime import deepspeed_config
from smoe.launcher.runtime import log


# What torch.load raises on a truncated or corrupt file (zip: RuntimeError from miniz; legacy or
# garbage: UnpicklingError, EOFError; an unreadable file: OSError; odd bytes: ValueError and kin).
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError, KeyError, IndexError,
              AttributeError)


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
    for name, generator in schema.generators(model).items():
        saved = state["generators"][name]
        if saved.numel() == generator.get_state().numel():
            generator.set_state(saved)
    return None if state["mems"] is None else [m.to(device) for m in state["mems"]]


class DamagedCheckpoint(ValueError):
    """One step directory that cannot be loaded: ``file`` (a name in it) and why."""

    def __init__(self, file: str, why: str):
        super().__init__(f"{file} {why}" if why == "missing" else f"{file}: {why}")
        self.file, self.why = file, why


def _read(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except UNREADABLE as error:
        reason = str(error).splitlines()[0].split(" This is an internal miniz error")[0] if str(error) else ""
        raise DamagedCheckpoint(path.name, f"truncated or corrupt: {type(error).__name__}: {reason[:200]}") from None


def _shape(value) -> tuple | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _expected_tensors(model: nn.Module) -> tuple[dict[str, tuple | None], dict[tuple[int, int], dict]]:
    """The shapes ``model`` needs from DeepSpeed's model-states file, and from each expert file by
    (layer, global expert id). DeepSpeed's split: in a MoE layer every key with 'expert' in it goes to
    the expert files (experts.deepspeed_experts.<local id> renumbered by global id), the rest to the
    model states. The experts of a layer are alike, so this rank's first one gives every one's shapes."""
    main = {name: _shape(value) for name, value in model.state_dict().items()}
    experts = {}
    for layer, (prefix, module) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
        prefix = f"{prefix}." if prefix else ""
        template = {}
        for name in [n for n in main if n.startswith(prefix) and "expert" in n and "moe.gate.wg.weight" not in n]:
            shape = main.pop(name)
            local = re.search(r"deepspeed_experts\.(\d+)\.", name)
            if local and int(local.group(1)) == 0:
                template[name] = shape
        for expert in range(module.num_experts):
            experts[layer, expert] = {name.replace("deepspeed_experts.0.", f"deepspeed_experts.{expert}.", 1): shape
                                      for name, shape in template.items()}
    return main, experts


def _compare(file: str, saved: dict, expected: dict) -> None:
    if not isinstance(saved, dict):
        raise DamagedCheckpoint(file, f"holds a {type(saved).__name__}, not a state dict")
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    if missing or unexpected:
        raise DamagedCheckpoint(file, "holds other tensors than the model"
                                + (f": missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                                   if missing else "")
                                + (f"; unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
                                   if unexpected else ""))
    for name, shape in expected.items():
        if shape is not None and _shape(saved[name]) != shape:
            raise DamagedCheckpoint(file, f"shapes do not match the model: {name} is {list(_shape(saved[name]) or [])} "
                                          f"in the file, {list(shape)} in the model")


def _check_manifest(tag_dir: Path) -> None:
    """Every file the manifest lists is there with its size and checksum (all of them, whatever this
    loader reads: a checkpoint is damaged or not). Without a manifest (an older smoe's), nothing."""
    try:
        entries = manifest.read(tag_dir)
    except ValueError as error:
        raise DamagedCheckpoint(schema.MANIFEST, str(error)) from None
    mismatch = entries and manifest.first_mismatch(tag_dir, entries)
    if mismatch:
        raise DamagedCheckpoint(*mismatch)


def check_checkpoint(tag_dir: Path, model: nn.Module, optimizer: bool = False) -> dict:
    """Raise :class:`DamagedCheckpoint` unless every file of ``tag_dir``'s manifest has its size and
    checksum, and every file that ``model`` needs is there, reads back (torch.load) and holds the model's
    tensor names and shapes (experts by global id). With ``optimizer``, the optimizer files of the saved
    layout must read back too (resuming needs them; evaluating does not). Returns the model states
    (DeepSpeed's state and the client state).

    Each file is read here (for its checksum, and once more by torch.load) and again by whatever loads
    it: simple, and small next to the training or evaluation that follows."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise DamagedCheckpoint(tag_dir.name + "/", "missing")
    _check_manifest(tag_dir)
    if not (tag_dir / schema.MODEL_STATES).is_file():
        raise DamagedCheckpoint(schema.MODEL_STATES, "missing")
    main_state = _read(tag_dir / schema.MODEL_STATES)
    if not isinstance(main_state, dict) or "module" not in main_state:
        raise DamagedCheckpoint(schema.MODEL_STATES, "is not a DeepSpeed model-states file (no 'module')")
    expected_main, expected_experts = _expected_tensors(model)
    world = main_state.get("world_size") or 1
    expert_names = {key: schema.expert_file(*key) for key in expected_experts}
    needed = [*expert_names.values(), *(schema.rank_file(r) for r in range(world)),
              *(schema.optimizer_files(main_state, bool(expected_experts)) if optimizer else [])]
    missing = [name for name in needed if not (tag_dir / name).is_file()]
    if missing:
        raise DamagedCheckpoint(", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""), "missing")
    _compare(schema.MODEL_STATES, main_state["module"], expected_main)
    for key, name in expert_names.items():
        _compare(name, _read(tag_dir / name), expected_experts[key])
    for name in needed[len(expert_names):]:  # rank files and optimizer files: they must read back
        _read(tag_dir / name)
    return main_state


def _first_loadable(ckpt_dir: Path, model: nn.Module, optimizer: bool, verb: str) -> str:
    ckpt_dir = Path(ckpt_dir)
    first, latest_damage = schema.latest(ckpt_dir)
    if first is None:
        unfinished = [p.name for p in schema.step_dirs(ckpt_dir)]
        raise ValueError(f"{ckpt_dir} holds no complete checkpoint (`latest` {latest_damage}"
                         + (f"; {', '.join(unfinished)} {'has' if len(unfinished) == 1 else 'have'} no manifest: saves "
                            "killed midway, or of an smoe older than manifests; to load one of the latter, write its "
                            "name into `latest`)" if unfinished else ")")
                         + ": train the run first (`smoe train` without --resume starts it)")
    newest = schema.tag_step(first)
    # Followed from `latest`: the older step directories; else only older ones whose save completed.
    older = [p.name for p in reversed(schema.step_dirs(ckpt_dir)) if p.name != first
             and (newest is None or schema.tag_step(p.name) < newest)
             and (latest_damage is None or schema.completed(p))]
    damaged = []
    for tag in [first, *older]:
        try:
            check_checkpoint(ckpt_dir / tag, model, optimizer)
        except DamagedCheckpoint as error:
            damaged.append((tag, str(error)))
            continue
        problems = ([f"`latest` {latest_damage}"] if latest_damage else []) \
            + [f"checkpoint {t} is damaged ({why})" for t, why in damaged]
        if problems:
            tags = [t for t, _ in damaged]
            kept = f"; {', '.join(tags)} {'is' if len(tags) == 1 else 'are'} kept" if tags else ""
            log.note("; ".join(problems) + f"; {verb} {tag}"
                     + (" instead" if damaged else ", the newest checkpoint whose save completed") + kept)
        return tag
    raise ValueError(f"no checkpoint in {ckpt_dir} can be loaded; tried {', '.join(t for t, _ in damaged)}: "
                     + "; ".join(f"{t}: {why}" for t, why in damaged)
                     + (f" (`latest` {latest_damage})" if latest_damage else "")
                     + ". Nothing was changed or deleted. Restore the damaged files from a copy, point 'latest' at a "
                       "complete step directory, or start a new run (another --out, or drop --resume)")


def loadable_tag(ckpt_dir: Path, model: nn.Module, optimizer: bool = False, verb: str = "using") -> str:
    """The checkpoint to load: the one ``latest`` names if :func:`check_checkpoint` passes, else the newest
    older step directory that does (with a note naming each damaged one, the file and why; nothing is
    deleted). When none does: ValueError listing every tag tried and why. Every loader uses this.

    On several ranks rank 0 checks and tells the others, so that all load the same one."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return _first_loadable(ckpt_dir, model, optimizer, verb)
    answer = [None]
    if dist.get_rank() == 0:
        try:
            answer = [("tag", _first_loadable(ckpt_dir, model, optimizer, verb))]
        except ValueError as error:
            answer = [("error", str(error))]
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise ValueError(value)
    return value


def saved_optimizer_kind(main_state: dict) -> str | None:
    """The optimizer kind a checkpoint was written with (older ones: from their ds_config, None if gone)."""
    if "optimizer_kind" in main_state:
        return main_state["optimizer_kind"]
    try:
        return deepspeed_config.optimizer_kind(deepspeed_config.load(main_state["config"]["ds_config"])[0])
    except ValueError:
        return None


def load(engine, ckpt_dir: Path, device: torch.device, ep_size: int, seed: int) -> tuple[dict, list | None]:
    """Load the latest complete checkpoint (:func:`loadable_tag`: an older one when it is damaged):
    DeepSpeed's states, then this rank's own state.

    On the layout it was saved with, everything is restored exactly; on another world size
    or ep_size it is resharded (:mod:`.reshard`). Returns the client state saved with it
    and this rank's Transformer-XL memory."""
    ckpt_dir = Path(ckpt_dir)
    tag = loadable_tag(ckpt_dir, engine.module, optimizer=True, verb="resuming from")
    tag_dir = ckpt_dir / tag
    # Checked above; read again here (and by DeepSpeed): see check_checkpoint.
    main_state = torch.load(tag_dir / schema.MODEL_STATES, map_location="cpu", weights_only=False)
    saved_world, saved_ep_size = main_state["world_size"], main_state["config"]["ep_size"]
    rank_files = [tag_dir / schema.rank_file(r) for r in range(saved_world)]
    if (saved_world, saved_ep_size) != (dist.get_world_size(), ep_size):
        rank_states = [torch.load(f, map_location="cpu", weights_only=False) for f in rank_files]
        mems, notes = reshard.load_resharded(engine, tag_dir, main_state, rank_states, device, ep_size, seed)
        log.note("; ".join(notes))
        return main_state, mems
    saved_kind, kind = saved_optimizer_kind(main_state), deepspeed_config.optimizer_kind(engine.config)
    if saved_kind not in (None, kind):
        reshard.load_weights(engine, tag_dir, main_state)
        log.note(f"the checkpoint's optimizer is {saved_kind}, this run's is {kind}: weights, lr schedule, "
                 "step and data position are loaded, the optimizer RESTARTS with zero moments (resume with the "
                 f"saved ds_config={main_state['config']['ds_config']} to keep them)")
        state = torch.load(rank_files[dist.get_rank()], map_location="cpu", weights_only=False)
        return main_state, restore_rank_state(engine.module, state, device)
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {tag_dir}: it is incomplete or corrupt; "
                         f"point 'latest' at an older step directory or start a new run")
    state = torch.load(rank_files[dist.get_rank()], map_location="cpu", weights_only=False)
    return client_state, restore_rank_state(engine.module, state, device)
