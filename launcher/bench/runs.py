"""What the benchmarks that run `smoe train` share: the data options, and a run's TensorBoard
scalars read back."""

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


def add_data_arguments(parser, required: bool = True) -> None:
    data = parser.add_mutually_exclusive_group(required=required)
    data.add_argument("--data-file",
                      help="raw byte file for Transformer-XL (e.g. ../shared/data/enwik8/enwik8-head-4154399)")
    data.add_argument("--data-files", nargs="+", metavar="PATH",
                      help="text for the masked-LM presets (e.g. ../shared/data/books)")


def data_arguments(args) -> list[str]:
    """The data options of `smoe train`, as the benchmark was given them."""
    return ["--data-file", args.data_file] if args.data_file else ["--data-files", *args.data_files]
