"""A run's TensorBoard scalars read back, for the benchmarks that run `smoe train`."""

from __future__ import annotations

from pathlib import Path


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """Step -> value of one scalar over every event file of the run (a resumed run writes several)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((Path(run_dir) / "tb").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values
