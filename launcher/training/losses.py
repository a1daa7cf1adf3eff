"""A training step's loss: what one forward pass gives, THOR's two-pass consistency term, and
when a non-finite loss stops the run."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from smoe.launcher.checkpoints.schema import latest_tag
from smoe.launcher.families.base import Pass


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite: the run stops (`smoe` exits with code 3)."""


class OverflowGuard:
    """When a non-finite loss stops the run.

    Under fp16, DeepSpeed's loss scaler skips the update of a step whose gradients overflow
    and lowers the scale, so a transient non-finite loss (an fp16 forward overflow) is survived
    the same way, up to ``patience`` steps in a row. In bf16 or fp32 nothing would recover:
    the first non-finite loss stops the run."""

    def __init__(self, ds: dict, patience: int):
        self.loss_scaled = bool(ds.get("fp16", {}).get("enabled"))
        self.patience = patience if self.loss_scaled else 0
        self.in_a_row = 0

    def check(self, ce: float, aux: float, step: int, k: int, ckpt_dir: Path) -> None:
        if math.isfinite(ce) and math.isfinite(aux):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row > self.patience:
            tag = latest_tag(ckpt_dir)
            streak = f", {self.in_a_row} steps in a row (overflow_patience={self.patience})" if self.patience else ""
            raise TrainingDiverged(f"loss is {ce} at step {step} (k={k}{streak}): training stopped. "
                                   f"The last good checkpoint is {tag or 'none'} in {ckpt_dir}; "
                                   "lower lr or clip and continue with --resume")


def loss_scale(engine) -> float:
    """The fp16 loss scale of DeepSpeed's optimizer (ZeRO's keeps it in a LossScaleConfig)."""
    optimizer = engine.optimizer
    return float(getattr(getattr(optimizer, "loss_scale_config", optimizer), "cur_scale"))


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """THOR's consistency term: KL(a||b) + KL(b||a) per token, averaged (Zuo et al. 2022)."""
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    per_token = ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1)
    return per_token.mean()


def micro_batch_losses(first: Pass, second: Pass | None, consistency_coef: float) -> dict:
    """Cross-entropy + aux of one pass; with a second pass (THOR: each draws its own experts),
    the two passes' mean + ``consistency_coef`` x their symmetric KL."""
    if second is None:
        return {"ce": first.ce, "aux": first.aux, "counts": first.counts, "total": first.ce + first.aux}
    ce, aux = (first.ce + second.ce) / 2, (first.aux + second.aux) / 2
    if first.scored is None:
        consistency = symmetric_kl(first.logits, second.logits)
    else:  # boolean indexing reads the count back: only THOR pays for it
        consistency = symmetric_kl(first.logits[first.scored], second.logits[first.scored])
    return {"ce": ce, "aux": aux, "counts": first.counts, "consistency": consistency,
            "total": ce + aux + consistency_coef * consistency}
