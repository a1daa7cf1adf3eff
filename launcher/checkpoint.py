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
deleted only after that, and never one newer than the one ``latest`` names.

Every file, DeepSpeed's included, is written under a temporary name, synced and renamed. A
write that fails (disk full, I/O error, no permission) stops the run with
:class:`CheckpointWriteError`; the half-written step directory is removed and ``latest``
and the checkpoints before stay as they were.

Every loader (``--resume``, `smoe eval`, `smoe slim`, `smoe ckpt consolidate`) goes through
:func:`loadable_tag`: the checkpoint ``latest`` names is checked file by file (present,
readable, the model's tensor names and shapes) before anything is loaded, and when it is
damaged the newest complete older one is used instead, with a note; nothing is deleted.
"""

from __future__ import annotations

import errno
import io
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.moe.layer import MoE
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from torch import nn

from . import deepspeed_config, reshard
from .build import any_rank
from .files import write_atomic, write_through_temporary

TAG = re.compile(r"step(\d+)")  # the step directories; anything else in checkpoints/ is left alone
MODEL_STATES = "mp_rank_00_model_states.pt"
# What torch.load raises on a truncated or corrupt file (zip: RuntimeError from miniz; legacy or
# garbage: UnpicklingError, EOFError; an unreadable file: OSError; odd bytes: ValueError and kin).
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError, KeyError, IndexError,
              AttributeError)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, I/O error, no permission): the run stops, and the
    checkpoint ``latest`` names is untouched. `smoe` exits with code 4."""

    def __init__(self, message: str, code: int | None = None, path: Path | None = None):
        super().__init__(code, message)
        self.message, self.filename = message, None if path is None else str(path)

    def __str__(self) -> str:
        return self.message


class _ErrorRecordingFile:
    """A file for torch.save that remembers the OSError of a failed write: torch.save reports it as
    RuntimeError('[enforce fail at inline_container.cc] unexpected pos ...'), errno and path lost."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save_atomic(state, path: Path, zipfile: bool = True) -> None:
    """torch.save through a temporary name; a refused write raises its OSError (ENOSPC, EIO, EACCES)."""
    def write(f):
        recording = _ErrorRecordingFile(f)
        try:
            torch.save(state, recording, _use_new_zipfile_serialization=zipfile)
        except RuntimeError:
            if recording.error is not None:
                raise recording.error from None
            raise

    write_through_temporary(path, write)


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = Path(ckpt_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def tag_step(tag: str) -> int | None:
    match = TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """The step directories under ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if tag_step(p.name) is not None and p.is_dir()),
                  key=lambda p: tag_step(p.name))


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


class _Writes:
    """While DeepSpeed saves: its file writes go through :func:`torch_save_atomic`, and the first one
    that fails is recorded instead of raised. DeepSpeed's save has collectives (barriers) inside, so
    a rank must not leave it early; once a write failed, the rank writes nothing more."""

    def __init__(self):
        self.failure: tuple[Path, BaseException] | None = None

    def attempt(self, path: Path, write) -> None:
        if self.failure is not None:
            return
        try:
            write()
        except Exception as error:  # noqa: BLE001 - raised after every rank has agreed, see save()
            self.failure = (Path(path), error)

    @contextmanager
    def through(self, engine):
        writer = getattr(engine, "checkpoint_engine", None)
        if not isinstance(writer, TorchCheckpointEngine):  # another engine (Nebula, decoupled): its own writes
            yield
            return

        def save(state_dict, path):
            self.attempt(path, lambda: torch_save_atomic(state_dict, Path(path), writer.zipfile_serialization))

        writer.save = save  # shadows the method on this instance only
        try:
            yield
        finally:
            del writer.save


def _write_error(tag: str, ckpt_dir: Path, step: int, failure: tuple[Path, BaseException] | None) -> BaseException:
    previous = latest_tag(ckpt_dir)
    kept = (f"`latest` still names {previous}, which is unchanged: continue from it with --resume"
            if previous else "no earlier checkpoint exists: start again with --auto-resume (it starts over)")
    if failure is None:
        return CheckpointWriteError(f"checkpoint {tag} (step {step}) could not be written on another rank (its error "
                                    f"names the file and why); the run stopped. {kept} once the cause is fixed")
    path, error = failure
    if not isinstance(error, OSError):
        return error  # not a refused write but a failure of its own: raised as it is
    reason = error.strerror or str(error)
    name = errno.errorcode.get(error.errno, "") if error.errno else ""
    return CheckpointWriteError(
        f"checkpoint {tag} (step {step}) could not be written: {path}: {reason}{f' [{name}]' if name else ''}. "
        f"The run stopped and the half-written {tag} was removed; {kept} after freeing space on (or fixing "
        f"the permissions of) {ckpt_dir}", error.errno, path)


def _clear_the_way(tag_dir: Path) -> None:
    """A step directory in the way of a new save with its tag: the run resumed from an older one, past
    this. Without a rank file it is what a save killed midway left, never a checkpoint: removed. With
    one it was complete once (damaged since, so that the resume went past it, even though `latest` may
    still name it; or `latest` was moved back from it): kept, not overwritten, as ``stepNNNNNN.old``
    (``.old2``, ...)."""
    if not any(tag_dir.glob("rank*.pt")):
        shutil.rmtree(tag_dir)
        return
    aside = _set_aside(tag_dir)
    print(f"note: {tag_dir} existed already (a checkpoint this run resumed past: damaged, or `latest` was moved "
          f"back from it): kept as {aside.name}", flush=True)


def _set_aside(tag_dir: Path) -> Path:
    for n in range(1, 1000):
        aside = tag_dir.with_name(f"{tag_dir.name}.old{n if n > 1 else ''}")
        if not aside.exists():
            tag_dir.rename(aside)
            return aside
    raise CheckpointWriteError(f"{tag_dir} is in the way of a new checkpoint and 999 copies are set aside already: "
                               "remove old ones")


def save(engine, ckpt_dir: Path, step: int, client_state: dict, mems, keep: int) -> str:
    """Save on every rank (a collective); returns the tag.

    A refused write on any rank raises :class:`CheckpointWriteError` on every rank after the
    half-written directory is removed; ``latest`` is moved only once every file is on disk."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step:06d}"
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    writes = _Writes()
    if rank == 0 and tag_dir.exists():
        _clear_the_way(tag_dir)
    dist.barrier()
    writes.attempt(tag_dir, lambda: tag_dir.mkdir(parents=True, exist_ok=True))  # DeepSpeed would only log this
    with writes.through(engine):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    buffer = io.BytesIO()
    torch.save(rank_state(engine, mems), buffer)
    rank_file = tag_dir / f"rank{rank}.pt"
    writes.attempt(rank_file, lambda: write_atomic(rank_file, buffer.getvalue()))
    # every rank's files are on disk (or some rank failed) before `latest` moves
    if any_rank(writes.failure is not None):
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        raise _write_error(tag, ckpt_dir, step, writes.failure)
    if rank == 0:
        writes.attempt(ckpt_dir / "latest", lambda: write_atomic(ckpt_dir / "latest", tag.encode()))
    if any_rank(writes.failure is not None):
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        raise _write_error(tag, ckpt_dir, step, writes.failure)
    if rank == 0:
        # Only checkpoints older than the one `latest` now names are pruned: a newer one (damaged, kept
        # when a resume went past it) stays, and so does `latest`'s own.
        older = [p for p in step_dirs(ckpt_dir) if tag_step(p.name) < step]
        for path in older[:max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return tag


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
        return [f"expp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ep_size)]
    return []


def check_checkpoint(tag_dir: Path, model: nn.Module, optimizer: bool = False) -> dict:
    """Raise :class:`DamagedCheckpoint` unless every file of ``tag_dir`` that ``model`` needs is there,
    reads back (torch.load) and holds the model's tensor names and shapes (experts by global id). With
    ``optimizer``, the optimizer files of the saved layout must read back too (resuming needs them;
    evaluating does not). Returns the model states (DeepSpeed's state and the client state).

    Each file is read here and again by whatever loads it: twice the reading, simple, and small next to
    the training or evaluation that follows."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise DamagedCheckpoint(tag_dir.name + "/", "missing")
    if not (tag_dir / MODEL_STATES).is_file():
        raise DamagedCheckpoint(MODEL_STATES, "missing")
    main_state = _read(tag_dir / MODEL_STATES)
    if not isinstance(main_state, dict) or "module" not in main_state:
        raise DamagedCheckpoint(MODEL_STATES, "is not a DeepSpeed model-states file (no 'module')")
    expected_main, expected_experts = _expected_tensors(model)
    world = main_state.get("world_size") or 1
    expert_names = {key: f"layer_{key[0]}_expert_{key[1]}_{MODEL_STATES}" for key in expected_experts}
    needed = [*expert_names.values(), *(f"rank{r}.pt" for r in range(world)),
              *(optimizer_files(main_state, bool(expected_experts)) if optimizer else [])]
    missing = [name for name in needed if not (tag_dir / name).is_file()]
    if missing:
        raise DamagedCheckpoint(", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""), "missing")
    _compare(MODEL_STATES, main_state["module"], expected_main)
    for key, name in expert_names.items():
        _compare(name, _read(tag_dir / name), expected_experts[key])
    for name in needed[len(expert_names):]:  # rank files and optimizer files: they must read back
        _read(tag_dir / name)
    return main_state


def _first_loadable(ckpt_dir: Path, model: nn.Module, optimizer: bool, verb: str) -> str:
    ckpt_dir = Path(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    if latest is None:
        raise ValueError(f"{ckpt_dir} holds no complete checkpoint (no 'latest' file): train the run first "
                         "(`smoe train` without --resume starts it)")
    newest = tag_step(latest)
    older = [p.name for p in reversed(step_dirs(ckpt_dir)) if p.name != latest
             and (newest is None or tag_step(p.name) < newest)]
    damaged = []
    for tag in [latest, *older]:
        try:
            check_checkpoint(ckpt_dir / tag, model, optimizer)
        except DamagedCheckpoint as error:
            damaged.append((tag, str(error)))
            continue
        if damaged:
            tags = [t for t, _ in damaged]
            print("note: " + "; ".join(f"checkpoint {t} is damaged ({why})" for t, why in damaged)
                  + f"; {verb} {tag} instead; {', '.join(tags)} {'is' if len(tags) == 1 else 'are'} kept", flush=True)
        return tag
    raise ValueError(f"no checkpoint in {ckpt_dir} can be loaded; tried {', '.join(t for t, _ in damaged)}: "
                     + "; ".join(f"{t}: {why}" for t, why in damaged)
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
    main_state = torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=False)
    saved_world, saved_ep_size = main_state["world_size"], main_state["config"]["ep_size"]
    rank_files = [tag_dir / f"rank{r}.pt" for r in range(saved_world)]
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
