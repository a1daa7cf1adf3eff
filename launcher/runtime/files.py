"""Writing files so that a reader (or a crash) never sees half of one: a temporary name beside
the target, synced, then renamed. Every file the project writes goes through here."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_through_temporary(path: Path, write) -> None:
    """``write(file)`` into a temporary name beside ``path``, sync, rename: readers see old or new,
    never half. On any failure the temporary file is removed and the error raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    """``data`` (text is written as UTF-8) into ``path``, atomically."""
    payload = data.encode() if isinstance(data, str) else data
    write_through_temporary(path, lambda f: f.write(payload))


@contextlib.contextmanager
def atomic_output(path: Path):
    """For writers that take a file name (matplotlib, safetensors): yields a temporary name beside
    ``path``, renamed to ``path`` when the block ends without error, removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(out: Path):
    """For writers of a whole directory (`smoe upcycle`, `smoe export`): yields a temporary directory
    beside ``out``, renamed to ``out`` when the block ends without error (an empty ``out`` is replaced;
    one that gained files meanwhile is never overwritten) and removed otherwise."""
    import shutil
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            raise ValueError(f"{out} appeared while it was being written: nothing is overwritten; pass a new directory")
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
