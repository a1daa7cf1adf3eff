"""Top-k schedules: k as a pure function of the optimizer step.

SMoE-Dropout grows k during training. The schedule never runs inside ``forward``:
the training loop evaluates ``schedule(step)`` before each optimizer step and sets the
result on every MoE layer (or, with ``k_sampling=per-layer``, each layer's own draw from
``k_min..schedule(step)``, :meth:`TopKSchedule.layer_ks`), so k can be plotted, tested and
restored from the step alone.

A run's schedules (k here, the lr in ``launcher/training/lr.py``) are planned over its
first ``max_steps``; :class:`StepPlan` maps the steps trained onto that plan when a resume
changed where the run ends.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

KINDS = ("linear", "constant", "step")


@dataclass(frozen=True)
class StepPlan:
    """Steps trained -> steps of the run's plan, which ends at the run's first end.

    Until the end first changes, the identity. A resume at ``step`` that moves the end
    stretches (or squeezes) what was left of the plan evenly onto the steps from ``step``
    to the new end: every schedule read through the plan continues from its value at
    ``step`` (no jump, a monotone k stays monotone) and reaches its final value at the new
    end. ``earlier``: ``(step, end until that step)`` of each such change, oldest first.
    """

    end: int
    earlier: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "earlier", tuple((int(s), int(e)) for s, e in self.earlier))
        start = 0
        for step, end in self.earlier:
            if not start < step <= end:
                raise ValueError(f"StepPlan.earlier {list(self.earlier)}: each change needs a step after the one "
                                 "before and an end at or after its step")
            start = step
        if self.end < start:
            raise ValueError(f"max_steps ({self.end}) is below step {start}, where the run already is: "
                             f"use max_steps >= {start}")

    @property
    def planned_steps(self) -> int:
        """The plan's length: the run's first end."""
        return self.earlier[0][1] if self.earlier else self.end

    def __call__(self, step: int) -> float:
        """The plan's step at ``step`` trained (an int, ``step`` itself, before the first change)."""
        if not self.earlier or step <= self.earlier[0][0]:
            return step
        start, planned = self.earlier[0][0], self.earlier[0][0]
        for until, end in (*self.earlier[1:], (math.inf, self.end)):
            fraction = min((min(step, until) - start) / max(end - start, 1), 1.0)
            planned = self.planned_steps - (self.planned_steps - planned) * (1 - fraction)
            if step <= until:
                return planned
            start = until
        raise AssertionError("unreachable: the last segment has no end")

    def resumed(self, step: int, end: int) -> "StepPlan":
        """This plan continued at ``step`` towards ``end``; the same plan when the end is the same."""
        if end == self.end:
            return self
        if end < step:
            raise ValueError(f"max_steps ({end}) is below step {step}, where the run already is: "
                             f"use max_steps >= {step}")
        last_change = self.earlier[-1][0] if self.earlier else 0
        earlier = self.earlier + (((step, self.end),) if step > last_change else ())
        return StepPlan(end, earlier)


@dataclass(frozen=True)
class TopKSchedule:
    """``linear``: the paper's ``clip(round((k_max - k_min) * step / total_steps) + k_min)``.
    ``constant``: always ``k_max`` (``k_min == k_max``).
    ``step``: ``milestones`` is ``((first_step, k), ...)``; k of the last milestone reached.
    A linear schedule whose run changed its end on a resume reads its step through
    ``StepPlan(total_steps, earlier)``: ``total_steps`` is where k reaches ``k_max``.
    """

    kind: str = "constant"
    k_min: int = 1
    k_max: int = 1
    total_steps: int = 1
    milestones: tuple[tuple[int, int], ...] = ()
    earlier: tuple[tuple[int, int], ...] = ()  # StepPlan.earlier: linear schedules only

    @classmethod
    def constant(cls, k: int) -> "TopKSchedule":
        return cls("constant", k, k)

    @classmethod
    def linear(cls, k_min: int, k_max: int, total_steps: int, earlier=()) -> "TopKSchedule":
        return cls("linear", k_min, k_max, total_steps, earlier=tuple(tuple(change) for change in earlier))

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
        if self.earlier and self.kind != "linear":
            raise ValueError(f"a {self.kind} TopKSchedule takes no earlier ends (got {list(self.earlier)}): "
                             "only a linear schedule is planned over the run's steps")
        if self.kind == "linear":
            StepPlan(self.total_steps, self.earlier)  # refused here when the changes do not fit
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
            plan = StepPlan(self.total_steps, self.earlier)
            k = round((self.k_max - self.k_min) * plan(step) / plan.planned_steps) + self.k_min
            return min(max(k, self.k_min), self.k_max)
        return [k for first, k in self.milestones if first <= step][-1]

    def layer_ks(self, step: int, layers: int, seed: int) -> list[int]:
        """Per-layer random k (``k_sampling=per-layer``): each of ``layers`` MoE layers' own k at ``step``,
        drawn uniformly from ``k_min`` to the schedule's k, so the schedule still bounds every layer's
        cost and the range widens as it grows (:func:`draw_layer_ks`)."""
        return draw_layer_ks(seed, step, layers, self.k_min, self(step))

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
        for key in ("milestones", "earlier"):
            state[key] = tuple(tuple(m) for m in state.get(key, ()))
        return cls(**state)


def draw_layer_ks(seed: int, step: int, layers: int, k_low: int, k_high: int) -> list[int]:
    """``layers`` ks, each uniform on ``k_low..k_high``, a pure function of its arguments: a resumed run
    draws the ks of the uninterrupted one, and every rank the same ones (expert-parallel ranks must
    agree), with no generator state to save or share and the global RNG untouched. Python's string
    seeding and ``random()`` are the stream the standard library promises to keep across versions."""
    if not 1 <= k_low <= k_high:
        raise ValueError(f"draw_layer_ks: the range {k_low}..{k_high} needs 1 <= k_low <= k_high")
    generator = random.Random(f"per-layer k: seed {seed}, step {step}")
    return [k_low + int(generator.random() * (k_high - k_low + 1)) for _ in range(layers)]
