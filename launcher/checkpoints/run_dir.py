"""The layout of a run directory, shared by `smoe train`, `smoe eval` and the benchmarks,
and the lock that gives it one writer."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from smoe.launcher.config import TrainConfig


SLICES_FILE = "slices.json"  # `smoe slice`'s, in a run and in its export


class RunDirLocked(ValueError):
    """Another process is writing this run directory."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def pruned(self) -> Path:
        """The validation sweep by k of the weights a run started from (an upcycled model before training)."""
        return self.root / "pruned.json"

    @property
    def dispatch(self) -> Path:
        """What ``dispatch=auto`` runs at each k, as timed when the run started (a resume reuses it)."""
        return self.root / "dispatch.json"

    @property
    def slices(self) -> Path:
        """Named per-layer ks searched under budgets by `smoe slice`; `smoe eval --k NAME` reads them."""
        return self.root / SLICES_FILE

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def load_config(self) -> TrainConfig:
        if not self.config.is_file():
            raise ValueError(f"{self.root} is not a run directory (no config.json): "
                             "pass the --out of a `smoe train` run")
        return TrainConfig.from_saved(json.loads(self.config.read_text()))


class WriterLock:
    """An exclusive advisory lock (``flock``) on ``RUN/.lock``: one writer per run directory.

    The kernel drops the lock when its holder exits, however it exits, so a killed run never
    leaves it held. The file records the holder's host and pid for the refusal message. On a
    file system without locks (Lustre mounted without ``-o flock``) the run goes on unguarded,
    with a note.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; raises :class:`RunDirLocked` naming the holder. Returns a note when
        the file system cannot lock."""
        self.run.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                return (f"note: {self.run.lock} cannot be locked here ({error.strerror}): this run is not protected "
                        "against a second writer (on Lustre, mount with -o flock)")
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunDirLocked(f"{self.run.root} is being written by another `smoe train` ({holder}): wait for it "
                               "to finish, or stop it (SIGUSR1 or SIGTERM checkpoints it), then resume with "
                               "--resume; nothing was changed") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None
