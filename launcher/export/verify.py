"""What every export does before its directory appears: written under a temporary name, loaded back
with transformers and compared with smoe's logits at every k (fp32), then renamed into place."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from smoe.launcher.runtime.files import atomic_directory

TOLERANCE = 1e-5  # fp32: the largest difference from smoe's logits, relative to their largest magnitude
CHECK_LENGTH = 32  # tokens per row of the comparison


def padded_ids(vocab_size: int, shape: tuple[int, ...]) -> dict:
    """Random ids of ``shape`` and an attention mask that pads the second half of the last row."""
    ids = torch.randint(vocab_size, shape, generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, ..., shape[-1] // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def check_at_every_k(ks: list[int | None], expected_at, got_at) -> float:
    """The largest difference of the exported model's logits ``got_at(k)`` from smoe's ``expected_at(k)``
    over ``ks``, relative to their largest magnitude; raises above :data:`TOLERANCE`."""
    worst = 0.0
    for k in ks:
        expected, got = expected_at(k), got_at(k)
        difference = ((got - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()
        worst = max(worst, difference)
        if not difference <= TOLERANCE:
            raise RuntimeError(f"the exported model's logits differ from smoe's by {difference:.2e} at k={k} "
                               f"(tolerance {TOLERANCE:g}): the export is wrong, please report it")
    return worst


def refuse_existing(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory: export into a new directory")


@contextlib.contextmanager
def staged(out: Path):
    """A temporary directory beside ``out``, renamed to ``out`` when the block ends without error and
    removed otherwise: a failed export leaves nothing behind."""
    refuse_existing(out)
    with atomic_directory(out) as staging:
        yield staging
