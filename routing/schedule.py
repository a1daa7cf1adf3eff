"""Top-k schedules: k as a pure function of the optimizer step.

SMoE-Dropout grows k during training. The schedule never runs inside ``forward``:
the training loop evaluates ``schedule(step)`` before each optimizer step and sets the
result on every MoE layer, so k can be plotted, tested and restored from the step alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

KINDS = ("linear", "constant", "step")


@dataclass(frozen=True)
class TopKSchedule:
    """``linear``: the paper's ``clip(round((k_max - k_min) * step / total_steps) + k_min)``.
    ``constant``: always ``k_max`` (``k_min == k_max``).
    ``step``: ``milestones`` is ``((first_step, k), ...)``; k of the last milestone reached.
    """

    kind: str = "constant"
    k_min: int = 1
    k_max: int = 1
    total_steps: int = 1
    milestones: tuple[tuple[int, int], ...] = ()

    @classmethod
    def constant(cls, k: int) -> "TopKSchedule":
        return cls("constant", k, k)

    @classmethod
    def linear(cls, k_min: int, k_max: int, total_steps: int) -> "TopKSchedule":
        return cls("linear", k_min, k_max, total_steps)

    @classmethod
    def step(cls, milestones) -> "TopKSchedule":
        milestones = tuple((int(s), int(k)) for s, k in milestones)
        ks = [k for _, k in milestones] or [1]
        return cls("step", min(ks), max(ks), milestones=milestones)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TopKSchedule.kind '{self.kind}' is unknown: use one of {', '.join(KINDS)}")
        if self.k_min < 1:
            raise ValueError(f"TopKSchedule.k_min ({self.k_min}) must be at least 1: every token needs an expert")
        if self.k_min > self.k_max:
            raise ValueError(f"TopKSchedule.k_min ({self.k_min}) is larger than k_max ({self.k_max}): "
                             "swap them or raise k_max")
        if self.kind == "constant" and self.k_min != self.k_max:
            raise ValueError(f"a constant TopKSchedule needs k_min == k_max (got {self.k_min}, {self.k_max}): "
                             "use TopKSchedule.constant(k)")
        if self.kind == "linear" and self.total_steps < 1:
            raise ValueError(f"TopKSchedule.total_steps ({self.total_steps}) must be at least 1 for a linear "
                             "schedule: set it to the number of training steps")
        if self.kind == "step":
            steps = [s for s, _ in self.milestones]
            if not steps or steps[0] != 0 or steps != sorted(set(steps)):
                raise ValueError(f"TopKSchedule.milestones {list(self.milestones)} must start at step 0 and have "
                                 "strictly increasing steps, e.g. ((0, 1), (1000, 2), (2000, 4))")
            if [k for _, k in self.milestones] != sorted(k for _, k in self.milestones):
                raise ValueError(f"TopKSchedule.milestones {list(self.milestones)} must not decrease k")

    def check_experts(self, num_experts: int) -> None:
        """Raise unless ``1 <= k_min <= k_max <= num_experts``."""
        if self.k_max > num_experts:
            raise ValueError(f"TopKSchedule.k_max ({self.k_max}) is larger than the number of experts "
                             f"({num_experts}): lower k_max or use more experts")

    def __call__(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step ({step}) must be non-negative")
        if self.kind == "constant":
            return self.k_max
        if self.kind == "linear":
            k = round((self.k_max - self.k_min) * step / self.total_steps) + self.k_min
            return min(max(k, self.k_min), self.k_max)
        return [k for first, k in self.milestones if first <= step][-1]

    def values(self) -> list[int]:
        """Every k the schedule takes, smallest first."""
        if self.kind == "step":
            return sorted({k for _, k in self.milestones})
        return list(range(self.k_min, self.k_max + 1)) if self.kind == "linear" else [self.k_max]

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "TopKSchedule":
        state = dict(state)
        state["milestones"] = tuple(tuple(m) for m in state.get("milestones", ()))
        return cls(**state)
