"""enwik8 fetched and split as Transformer-XL does, and any raw byte file split 90/5/5.

Every byte is one token (vocabulary 256), so the splits are plain ``uint8`` tensors and
bits-per-character is the loss in bits. enwik8 is split like Transformer-XL's
``prep_enwik8.py``: the last 5M bytes are test, the 5M before them valid, the first 90M
train; results are then comparable with the published ones.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
# sha256 of the 36,445,475-byte enwik8.zip, as pinned by Hugging Face `datasets`
# (datasets/enwik8/dataset_infos.json, "download_checksums"); other public scripts
# that download this URL pin the same digest.
ENWIK8_ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ENWIK8_BYTES = 100_000_000
# Bytes in each of valid and test (Transformer-XL's num_test_chars).
ENWIK8_HELDOUT_BYTES = 5_000_000

_CHUNK = 1 << 20


@dataclass
class Splits:
    """Train/valid/test token sequences (1-D ``uint8``, one token per byte) and where they came from."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    source: str


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_zip(path: str | os.PathLike, sha256: str = ENWIK8_ZIP_SHA256) -> None:
    """Refuse a zip whose sha256 is not ``sha256``; the file is left as it is for the user to judge."""
    got = file_sha256(path)
    if got != sha256:
        raise ValueError(f"{path} has sha256 {got}, expected {sha256}: the file is corrupt or is not "
                         f"{ENWIK8_URL}; delete it and run again to download it afresh, or download it "
                         f"by hand into {Path(path).parent}")


def load_enwik8(data_dir: str | os.PathLike, download: bool = True, *, url: str = ENWIK8_URL,
                sha256: str = ENWIK8_ZIP_SHA256) -> Splits:
    """enwik8 from ``data_dir``: the unzipped ``enwik8``, else ``enwik8.zip``, else downloaded from ``url``."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ValueError(f"data directory {data_dir} is a file: --data-dir takes the directory holding enwik8 or "
                         f"enwik8.zip (the zip is downloaded there when absent); to train on this file as raw bytes, "
                         f"pass --data-file {data_dir}")
    raw, archive = data_dir / "enwik8", data_dir / "enwik8.zip"
    if not raw.exists():
        if archive.exists():
            verify_zip(archive, sha256)
        elif download:
            data_dir.mkdir(parents=True, exist_ok=True)
            _download(url, archive, sha256)
        else:
            raise FileNotFoundError(f"no enwik8 in {data_dir}: neither {raw.name} nor {archive.name} is there "
                                    f"and downloading is disabled: download {url} into {data_dir}, allow "
                                    f"downloading, or train on another file with --data-file")
        _unzip_enwik8(archive, raw)
    size = raw.stat().st_size
    if size != ENWIK8_BYTES:
        raise ValueError(f"{raw} is {size:,} bytes, but enwik8 is exactly {ENWIK8_BYTES:,}: the file is "
                         f"truncated or not enwik8; delete it so it is made again from {archive.name} "
                         f"(downloaded if absent), or train on it as a plain file with --data-file")
    data = _read_bytes(raw)
    cut = len(data) - 2 * ENWIK8_HELDOUT_BYTES
    return Splits(data[:cut], data[cut:cut + ENWIK8_HELDOUT_BYTES], data[-ENWIK8_HELDOUT_BYTES:], "enwik8")


def check_byte_file(path: str | os.PathLike) -> Path:
    """``--data-file``: refuse a path that is not a file, saying what to pass instead."""
    path = Path(path)
    if path.is_dir():
        hint = (f"; {path} holds enwik8, so pass --data-dir {path}" if any((path / name).is_file() for name in
                ("enwik8", "enwik8.zip")) else "; for a directory holding enwik8 or enwik8.zip, pass --data-dir")
        raise ValueError(f"data file {path} is a directory: --data-file takes one file (any raw bytes, split "
                         f"90/5/5){hint}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist: check the path given as --data-file")
    return path


def load_byte_file(path: str | os.PathLike) -> Splits:
    """Any file as bytes, in order: the first 90% train, the next 5% valid, the last 5% test."""
    path = check_byte_file(path)
    size = path.stat().st_size
    heldout = size // 20
    if heldout == 0:
        raise ValueError(f"data file {path} has {size:,} bytes: too small to split 90/5/5 into three non-empty "
                         f"splits (needs at least 20 bytes); use a bigger file")
    data = _read_bytes(path)
    cut = size - 2 * heldout
    return Splits(data[:cut], data[cut:cut + heldout], data[cut + heldout:], path.name)


def load_corpus(data_dir: str | os.PathLike | None = None, data_file: str | os.PathLike | None = None,
                download: bool = True) -> Splits:
    """enwik8 from ``data_dir``, or the raw file ``data_file``: exactly one of the two."""
    if (data_dir is None) == (data_file is None):
        raise ValueError("give exactly one of data_dir (enwik8, downloaded there if missing) and data_file "
                         f"(any raw byte file), not {'both' if data_dir is not None else 'neither'}")
    if data_file is not None:
        return load_byte_file(data_file)
    return load_enwik8(data_dir, download)


def _read_bytes(path: Path) -> torch.Tensor:
    # bytearray: torch.frombuffer wants a writable buffer to hand out a writable tensor.
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def _download(url: str, dest: Path, sha256: str) -> None:
    """Download to a temporary file beside ``dest``; only a complete file with the right digest gets the name."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url)
            except OSError as err:  # urllib.error.URLError included
                raise ConnectionError(f"could not download {url}: {err}; check the network, or download it "
                                      f"by hand into {dest.parent}") from err
            with response:
                _copy_with_progress(response, out, url, int(response.headers.get("Content-Length") or 0))
        got = file_sha256(tmp)
        if got != sha256:
            raise ValueError(f"the download of {url} has sha256 {got}, expected {sha256}: it is corrupt or the "
                             f"server changed the file; run again, or download it by hand into {dest.parent}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _copy_with_progress(src, out, url: str, total: int) -> None:
    print(f"downloading {url} ({total / 1e6:.1f} MB)" if total else f"downloading {url}", file=sys.stderr)
    done, reported = 0, 0
    while chunk := src.read(_CHUNK):
        out.write(chunk)
        done += len(chunk)
        # A line per 10% (or per 8 MB when the size is unknown) reads well in Slurm logs too.
        step = done * 10 // total if total else done // (8 * _CHUNK)
        if step > reported:
            reported = step
            print(f"  {done / 1e6:.1f} MB" + (f" ({100 * done // total}%)" if total else ""), file=sys.stderr)


def _unzip_enwik8(archive: Path, dest: Path) -> None:
    """Extract the ``enwik8`` member to a temporary name, then rename: no half-written ``enwik8``."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with zipfile.ZipFile(archive) as zf:
                    if "enwik8" not in zf.namelist():
                        raise ValueError(f"{archive} has no member named 'enwik8' (it holds "
                                         f"{', '.join(zf.namelist()) or 'nothing'}): it is not {ENWIK8_URL}; "
                                         f"delete it and run again to download it afresh")
                    size = zf.getinfo("enwik8").file_size
                    if size != ENWIK8_BYTES:
                        raise ValueError(f"the enwik8 in {archive} is {size:,} bytes, but enwik8 is exactly "
                                         f"{ENWIK8_BYTES:,}: the zip is not {ENWIK8_URL}; delete it and run "
                                         f"again to download it afresh")
                    with zf.open("enwik8") as member:
                        while chunk := member.read(_CHUNK):
                            out.write(chunk)
            except zipfile.BadZipFile as err:
                raise ValueError(f"{archive} is not a readable zip ({err}): the file is corrupt; delete it and "
                                 f"run again to download it afresh") from err
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
