"""`smoe bench quality`: the paper's self-slimmable claim at CPU size, same budget for every method.

Trains the ``tiny`` preset (or ``bert-tiny`` / ``roberta-tiny`` on text) once per method with ``smoe train`` (each in its
own process, one after the other), then reads each run's BPC-vs-k sweep. Expected, as
in the paper: smoe-dropout (k 1 -> 16) gets better at every k up to N; smoe-learned,
trained at k = 2, stops improving past its training k. Seconds per step come from the
same runs (TensorBoard's train/step_time_s averaged over the whole run, so smoe-dropout's
covers its whole k schedule).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_METHODS = ("smoe-dropout", "smoe-learned", "dense")


def add_arguments(parser) -> None:
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-file", help="raw byte file for Transformer-XL (e.g. ../shared/data/enwik8/enwik8-head-4154399)")
    data.add_argument("--data-files", nargs="+", metavar="PATH", help="text for the masked-LM presets "
                                                                       "(e.g. ../shared/data/books)")
    parser.add_argument("--out", required=True, help="directory for the runs (one subdirectory per method)")
    parser.add_argument("--preset", default="tiny", help="tiny (Transformer-XL), bert-tiny or roberta-tiny")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--json", help="write the table here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run, "
                                                                      "e.g. max_steps=3000")


def mean_step_time(run_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = []
    for events in sorted((run_dir / "tb").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "train/step_time_s" in accumulator.Tags()["scalars"]:
            times += [e.value for e in accumulator.Scalars("train/step_time_s")]
    return statistics.fmean(times)


def run(args) -> None:
    out = Path(args.out)
    results = []
    for method in args.methods.split(","):
        run_dir = out / method
        if not (run_dir / "eval.json").is_file():
            data = ["--data-file", args.data_file] if args.data_file else ["--data-files", *args.data_files]
            command = [sys.executable, "-m", "smoe.launcher.cli", "train", "--preset", args.preset, "--method",
                       method, *data, "--out", str(run_dir), *args.overrides]
            if (run_dir / "config.json").is_file():
                command.append("--resume")
            print("$ " + " ".join(command[1:]), flush=True)
            subprocess.run(command, check=True, env={**os.environ})
        report = json.loads((run_dir / "eval.json").read_text())
        results.append({"method": method, "s_per_step": mean_step_time(run_dir), **report})

    ks = sorted({row["k"] for r in results for row in r["rows"] if row["k"] is not None})
    print(f"\ntest {results[0].get('unit', 'BPC')} on {results[0]['source']} ({args.preset} preset, same budget)")
    print(f"{'method':<28}" + "".join(f"{'k=' + str(k):>9}" for k in ks) + f"{'s/step':>9}")
    for r in results:
        by_k = {row["k"]: row["test_bpc"] for row in r["rows"]}
        cells = [f"{by_k[None]:>9.4f}"] * len(ks) if None in by_k else \
            [f"{by_k[k]:>9.4f}" if k in by_k else f"{'-':>9}" for k in ks]
        label = r["method"] + (" (dense: one model)" if None in by_k else "")
        print(f"{label:<28}" + "".join(cells) + f"{r['s_per_step']:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
