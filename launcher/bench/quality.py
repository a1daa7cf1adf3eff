"""`smoe bench quality`: methods compared at the same budget, over seeds.

Trains the ``tiny`` preset (or ``bert-tiny`` / ``roberta-tiny`` on text) once per method
and seed with ``smoe train``, each in its own process, then reads each run's test
BPC-vs-k sweep. A method is a name with optional overrides of its own,
``smoe-dropout:combine_scale=1``. The table gives, per method and k, the mean +- sample
standard deviation over the seeds; the paired table gives, seed by seed, the method's
BPC minus dense's (the same seed means the same data order and initial shared weights),
so that a gap is judged against its own spread, and how many seeds the method beat dense
on. "Monotone" counts the seeds whose curve never gets worse as k grows. Seconds per step
are TensorBoard's train/step_time_s averaged over each whole run (so smoe-dropout's covers
its whole k schedule); with ``--jobs 2`` the runs share the cores and their times are
contended. Finished runs (those with an eval.json) are read, not run again.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from smoe.launcher.bench.runs import add_data_arguments, data_arguments, scalars
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic

DEFAULT_METHODS = ("smoe-dropout", "smoe-learned", "dense")


@dataclass(frozen=True)
class Variant:
    """A method and its own overrides, e.g. ``smoe-dropout:combine_scale=1``."""

    label: str
    method: str
    overrides: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Variant":
        method, *overrides = text.split(":")
        if not method:
            raise ValueError(f"--methods entry '{text}' names no method: use e.g. smoe-dropout:combine_scale=1")
        return cls(text, method, tuple(overrides))


def parse_methods(text: str) -> list[Variant]:
    return [Variant.parse(item) for item in text.split(",") if item]


def parse_seeds(text: str) -> list[int | None]:
    """``0,1,2`` as integers; empty: one run with the preset's seed."""
    if not text:
        return [None]
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text}: expected comma-separated integers, e.g. --seeds 0,1,2") from None


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for the runs (OUT/METHOD/seed-S)")
    parser.add_argument("--preset", default="tiny", help="tiny (Transformer-XL), bert-tiny or roberta-tiny, or "
                                                         "causal-lm with each method's init=DIR")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods, each with optional :key=value overrides "
                             "(e.g. dense,smoe-dropout:combine_scale=1,smoe-dropout:combine_scale=N; causal-lm: "
                             "dense:init=DENSE_DIR,smoe-dropout:init=UPCYCLED_DIR)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds, e.g. 0,1,2 (default: the preset's seed)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, sharing the cores (default 1)")
    parser.add_argument("--json", help="write every run's sweep and the statistics here")
    parser.add_argument("--markdown", help="write the tables here as markdown")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. max_steps=3000")


def run_dir_of(out: Path, variant: Variant, seed: int | None) -> Path:
    """OUT/LABEL/seed-S, the label's path separators (an ``init=DIR`` override's) made underscores."""
    return out / variant.label.replace("/", "_") / ("seed-default" if seed is None else f"seed-{seed}")


def train_command(args, variant: Variant, seed: int | None, run_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "smoe.launcher.cli", "train", "--preset", args.preset, "--method",
               variant.method, *data_arguments(args), "--out", str(run_dir), *args.overrides, *variant.overrides,
               "--auto-resume"]
    if seed is not None:
        command.append(f"seed={seed}")
    return command


def train_all(args, pending: list[tuple[Variant, int | None, Path]]) -> None:
    """Every pending run, ``args.jobs`` at a time. One job streams its progress; several
    write theirs to RUN/train.log and report when each ends."""
    env = dict(os.environ)
    if args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    running: list[tuple[subprocess.Popen, Path, float, object]] = []

    def wait_one() -> None:
        while True:
            for entry in running:
                process, run_dir, started, log_file = entry
                if process.poll() is not None:
                    running.remove(entry)
                    if log_file:
                        log_file.close()
                    if process.returncode:  # stop the others too; finished runs are kept and read next time
                        for other, *_ in running:
                            other.terminate()
                        raise SystemExit(f"smoe: error: the run in {run_dir} failed (exit {process.returncode})"
                                         + (f": see {run_dir / 'train.log'}" if log_file else "")
                                         + "; the same command continues the unfinished runs")
                    log.info(f"finished {run_dir} in {time.monotonic() - started:.0f} s "
                             f"({len(running)} running, {len(pending)} waiting)")
                    return
            time.sleep(1.0)

    while pending:
        variant, seed, run_dir = pending.pop(0)
        command = train_command(args, variant, seed, run_dir)
        log.info("$ " + " ".join(command[1:]))
        log_file = None
        if args.jobs > 1:
            run_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(run_dir / "train.log", "a")
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT if log_file else None)
        running.append((process, run_dir, time.monotonic(), log_file))
        if len(running) >= args.jobs:
            wait_one()
    while running:
        wait_one()


def mean_step_time(run_dir: Path) -> float:
    return statistics.fmean(scalars(run_dir, "train/step_time_s").values())


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values), "values": values}


def summarize(variant: Variant, runs: list[dict], dense: list[dict] | None) -> dict:
    """Per k: the spread over seeds; the paired difference to dense; the seeds with a monotone curve."""
    sweeps = [{row["k"]: row["test_bpc"] for row in r["rows"]} for r in runs]
    ks = sorted(k for k in sweeps[0] if k is not None) or [None]
    summary = {"method": variant.label, "runs": runs, "by_k": {str(k): spread([s[k] for s in sweeps]) for k in ks},
               "s_per_step": spread([r["s_per_step"] for r in runs])}
    if ks != [None]:
        summary["monotone_seeds"] = sum(all(b <= a for a, b in zip(curve, curve[1:]))
                                        for curve in ([s[k] for k in ks] for s in sweeps))
    if dense is not None and ks != [None]:
        dense_by_seed = {r["seed"]: r["rows"][0]["test_bpc"] for r in dense}
        paired = {}
        for k in ks:
            diffs = [s[k] - dense_by_seed[r["seed"]] for s, r in zip(sweeps, runs)]
            stats = spread(diffs)
            stats["better_seeds"] = sum(d < 0 for d in diffs)
            if stats["sd"] > 0:
                stats["t"] = stats["mean"] / (stats["sd"] / math.sqrt(len(diffs)))
            paired[str(k)] = stats
        summary["paired_vs_dense"] = paired
    return summary


def _cell(stats: dict, signed: bool = False) -> str:
    mean = f"{stats['mean']:+.4f}" if signed else f"{stats['mean']:.4f}"
    return mean if stats["n"] == 1 else f"{mean} ± {stats['sd']:.4f}"


def tables(results: dict) -> str:
    """The statistics as markdown: BPC by k (mean ± sd), then the paired differences to dense."""
    summaries = results["methods"]
    ks = sorted({int(k) for s in summaries for k in s["by_k"] if k != "None"})
    unit = results["unit"]
    lines = [f"test {unit} on {results['source']} ({results['preset']} preset, same budget; "
             f"mean ± sd over seeds {', '.join(map(str, results['seeds']))})", "",
             "| method | " + " | ".join(f"k={k}" for k in ks) + " | monotone in k | s/step |",
             "|---|" + "---|" * (len(ks) + 2)]
    for s in summaries:
        if "None" in s["by_k"]:
            cells = [_cell(s["by_k"]["None"]) + " (one model)"] + [""] * (len(ks) - 1)
            monotone = ""
        else:
            cells = [_cell(s["by_k"][str(k)]) if str(k) in s["by_k"] else "-" for k in ks]
            monotone = f"{s['monotone_seeds']}/{len(s['runs'])} seeds"
        lines.append(f"| {s['method']} | " + " | ".join(cells) + f" | {monotone} | {s['s_per_step']['mean']:.3f} |")
    paired = [s for s in summaries if "paired_vs_dense" in s]
    if paired:
        lines += ["", f"paired difference to dense, same seed ({unit}, negative: better than dense; "
                      "seeds better than dense; t = mean / (sd / sqrt(n)))", "",
                  "| method − dense | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for s in paired:
            cells = []
            for k in ks:
                stats = s["paired_vs_dense"].get(str(k))
                if stats is None:
                    cells.append("-")
                    continue
                t = f", t={stats['t']:.1f}" if "t" in stats else ""
                cells.append(f"{_cell(stats, signed=True)} ({stats['better_seeds']}/{stats['n']}{t})")
            lines.append(f"| {s['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> None:
    from smoe.launcher.config import parse_override

    out = Path(args.out)
    variants, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    plan = [(v, seed, run_dir_of(out, v, seed)) for v in variants for seed in seeds]
    train_all(args, [entry for entry in plan if not (entry[2] / "eval.json").is_file()])

    runs: dict[str, list[dict]] = {v.label: [] for v in variants}
    for variant, seed, run_dir in plan:
        report = json.loads((run_dir / "eval.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
        runs[variant.label].append({"seed": config["seed"], "run": str(run_dir), "s_per_step": mean_step_time(run_dir),
                                    **report})
    first = runs[variants[0].label][0]
    dense = next((runs[v.label] for v in variants if v.method == "dense"), None)
    overrides = dict(parse_override(text) for text in args.overrides)
    results = {"preset": args.preset, "source": first["source"], "unit": first.get("unit", "BPC"),
               "seeds": [r["seed"] for r in runs[variants[0].label]], "overrides": overrides,
               "methods": [summarize(v, runs[v.label], dense if v.method != "dense" else None) for v in variants]}
    text = tables(results)
    log.info("\n" + text)
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=2, default=list))
    if args.markdown:
        write_atomic(args.markdown, text)
