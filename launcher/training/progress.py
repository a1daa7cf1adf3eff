"""What the progress line and the TensorBoard events of a run are made of: the steps since the
last line, summed on the device, and the time left."""

from __future__ import annotations

import math

import torch


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this rank has held: on a GPU the allocator's peak, on the CPU the process's
    peak resident set (everything the process holds, libraries included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Window:
    """Running sums of the steps since the last log line."""

    def __init__(self):
        self.steps = 0
        self.finite_steps = 0
        self.seconds = 0.0
        self.sums: dict[str, float] = {}
        self.counts = None
        self.last: dict = {}

    def add(self, stats: dict, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.last = stats
        if not math.isfinite(stats["ce"]):  # an fp16 overflow DeepSpeed skipped: not part of the means
            return
        self.finite_steps += 1
        for key in ("ce", "aux", "grad_norm", "consistency", "mean_layer_k"):
            if stats[key] is not None:
                self.sums[key] = self.sums.get(key, 0.0) + stats[key]
        layer_counts = [c for c in stats["counts"] if c is not None]
        if layer_counts:  # summed on the device: read back only when logged
            stacked = torch.stack([c.detach().double() for c in layer_counts])
            self.counts = stacked if self.counts is None else self.counts + stacked

    def mean(self, key: str) -> float:
        return self.sums.get(key, math.nan) / self.finite_steps if self.finite_steps else math.nan
