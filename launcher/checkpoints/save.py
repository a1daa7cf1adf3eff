"""Saving a checkpoint through DeepSpeed's engine, crash-safe (the layout: :mod:`.schema`).

Every file, DeepSpeed's included, is written under a temporary name, synced and renamed, and
checksummed as it is written; once every rank's files are on disk rank 0 writes the step
directory's manifest (:mod:`.manifest`), then moves ``latest``; older checkpoints are pruned
only after that, never one newer than the one ``latest`` names. A write that fails
(disk full, I/O error, no permission) stops the run with :class:`CheckpointWriteError`:
the half-written step directory is removed, ``latest`` and the checkpoints before stay.
"""

from __future__ import annotations

import errno
import io
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from smoe.launcher.checkpoints import manifest, reshard, schema
from smoe.launcher.runtime import log
from smoe.launcher.runtime.distributed import any_rank
from smoe.launcher.runtime.files import write_atomic, write_through_temporary


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, I/O error, no permission): the run stops, and the
    checkpoint ``latest`` names is untouched. `smoe` exits with code 4."""

    def __init__(self, message: str, code: int | None = None, path: Path | None = None):
        super().__init__(code, message)
        self.message, self.filename = message, None if path is None else str(path)

    def __str__(self) -> str:
        return self.message


class _RecordingFile:
    """A file for torch.save that checksums what is written (torch.save writes in order, never seeks)
    and remembers the OSError of a failed write: torch.save reports it as
    RuntimeError('[enforce fail at inline_container.cc] unexpected pos ...'), errno and path lost."""

    def __init__(self, f):
        self.f, self.error, self.checksum = f, None, manifest.Checksum()

    def write(self, data) -> int:
        try:
            written = self.f.write(data)
        except OSError as error:
            self.error = error
            raise
        self.checksum.update(data)
        return written

    def flush(self) -> None:
        self.f.flush()


@contextmanager
def _without_torch_record_crcs():
    """torch.save computes a CRC-32 of every record of its zip file that torch.load never checks (a
    flipped bit in a tensor loads silently); the manifest's CRC-32 of the whole file, checked by every
    loader, replaces it at the same cost, so a save is no slower than without a manifest."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def torch_save_atomic(state, path: Path, zipfile: bool = True) -> dict:
    """torch.save through a temporary name; a refused write raises its OSError (ENOSPC, EIO, EACCES).
    Returns the file's manifest entry."""
    recording = None

    def write(f):
        nonlocal recording
        recording = _RecordingFile(f)
        try:
            with _without_torch_record_crcs():
                torch.save(state, recording, _use_new_zipfile_serialization=zipfile)
        except RuntimeError:
            if recording.error is not None:
                raise recording.error from None
            raise

    write_through_temporary(path, write)
    return recording.checksum.entry()


def rank_state(engine, mems: list[torch.Tensor] | None) -> dict:
    model = engine.module
    return {
        "torch": torch.get_rng_state(),
        # This rank's device only: a job resumed on a node where it sees fewer GPUs must still load it.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": {name: g.get_state() for name, g in schema.generators(model).items()},
        "mems": None if mems is None else [m.cpu() for m in mems],
        "optimizer_params": reshard.optimizer_param_names(engine),  # to move Adam's state to another layout
    }


class _Writes:
    """While DeepSpeed saves: its file writes go through :func:`torch_save_atomic`, and the first one
    that fails is recorded instead of raised. DeepSpeed's save has collectives (barriers) inside, so
    a rank must not leave it early; once a write failed, the rank writes nothing more. ``entries``:
    the manifest entries of the files this rank wrote into ``tag_dir``."""

    def __init__(self, tag_dir: Path):
        self.tag_dir = tag_dir
        self.failure: tuple[Path, BaseException] | None = None
        self.entries: dict[str, dict] = {}

    def attempt(self, path: Path, write) -> None:
        """``write()``; what it returns, a manifest entry, is recorded for ``path``."""
        if self.failure is not None:
            return
        try:
            entry = write()
        except Exception as error:  # noqa: BLE001 - raised after every rank has agreed, see save()
            self.failure = (Path(path), error)
            return
        if entry is not None and Path(path).parent == self.tag_dir:
            self.entries[Path(path).name] = entry

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
    previous = schema.latest_tag(ckpt_dir)
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
    this, or started over. Without a rank file it is what a save killed midway left, never a checkpoint:
    removed. With one it may have been complete (damaged since, so that the resume went past it, even
    though `latest` may still name it; `latest` moved back from it; or `latest` lost and no manifest in
    it): kept, not overwritten, as ``stepNNNNNN.old`` (``.old2``, ...)."""
    if not any(tag_dir.glob(schema.RANK_FILES)):
        shutil.rmtree(tag_dir)
        return
    aside = _set_aside(tag_dir)
    log.note(f"{tag_dir} existed already (a checkpoint this run went past: it resumed from an older one, the newer "
             f"damaged or `latest` moved back, or it started over): kept as {aside.name}")


def _set_aside(tag_dir: Path) -> Path:
    for n in range(1, 1000):
        aside = tag_dir.with_name(f"{tag_dir.name}.old{n if n > 1 else ''}")
        if not aside.exists():
            tag_dir.rename(aside)
            return aside
    raise CheckpointWriteError(f"{tag_dir} is in the way of a new checkpoint and 999 copies are set aside already: "
                               "remove old ones")


def _gathered(entries: dict[str, dict]) -> dict[str, dict]:
    """Every rank's manifest entries, on rank 0 (a collective; the other ranks get theirs back)."""
    if dist.get_world_size() == 1:
        return entries
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, entries)
    return {name: entry for rank_entries in every for name, entry in rank_entries.items()}


def _complete(tag_dir: Path, entries: dict[str, dict]) -> dict[str, dict]:
    """``entries`` and an entry for every other file of ``tag_dir``, read back from disk: files that a
    rank wrote outside DeepSpeed's torch checkpoint engine (another engine, NVMe offload copies)."""
    complete = dict(entries)
    for path in sorted(tag_dir.rglob("*")):
        name = str(path.relative_to(tag_dir))
        if path.is_file() and name not in complete:
            complete[name] = manifest.of_file(path)
    return complete


def save(engine, ckpt_dir: Path, step: int, client_state: dict, mems, keep: int) -> str:
    """Save on every rank (a collective); returns the tag.

    A refused write on any rank raises :class:`CheckpointWriteError` on every rank after the
    half-written directory is removed; the manifest is written once every file is on disk, and
    ``latest`` moved after it.

    Every rank checksums the files it writes, and rank 0 gathers the entries: nothing is read back.
    Assumed, as by the loaders: every rank writes into the same run directory, on a file system
    that all nodes share."""
    ckpt_dir = Path(ckpt_dir)
    tag = schema.tag_of(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    writes = _Writes(tag_dir)
    if rank == 0 and tag_dir.exists():
        _clear_the_way(tag_dir)
    dist.barrier()
    writes.attempt(tag_dir, lambda: tag_dir.mkdir(parents=True, exist_ok=True))  # DeepSpeed would only log this
    with writes.through(engine):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    buffer = io.BytesIO()
    with _without_torch_record_crcs():
        torch.save(rank_state(engine, mems), buffer)
    rank_file = tag_dir / schema.rank_file(rank)

    def write_rank_file() -> dict:
        data = buffer.getvalue()
        write_atomic(rank_file, data)
        return manifest.of_bytes(data)

    writes.attempt(rank_file, write_rank_file)
    # every rank's files are on disk (or some rank failed) before the manifest is written and `latest` moves
    if any_rank(writes.failure is not None):
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        raise _write_error(tag, ckpt_dir, step, writes.failure)
    entries = _gathered(writes.entries)
    if rank == 0:
        writes.attempt(tag_dir / schema.MANIFEST, lambda: manifest.write(tag_dir, _complete(tag_dir, entries)))
        pointer = ckpt_dir / schema.LATEST
        writes.attempt(pointer, lambda: write_atomic(pointer, tag))
    if any_rank(writes.failure is not None):
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        raise _write_error(tag, ckpt_dir, step, writes.failure)
    if rank == 0:
        # Only checkpoints older than the one `latest` now names are pruned: a newer one (damaged, kept
        # when a resume went past it) stays, and so does `latest`'s own.
        older = [p for p in schema.step_dirs(ckpt_dir) if schema.tag_step(p.name) < step]
        for path in older[:max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return tag
