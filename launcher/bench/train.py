"""`smoe bench train`: end-to-end training s/step and peak memory, smoe-dropout at each k
against dense, measured in the same run.

    smoe bench train --data-file ../shared/data/enwik8/enwik8-head-4154399 --out runs/bench-train batch_size=4
    smoe bench train --preset bert-paper --data-files ../shared/data/books --out runs/bench-bert batch_size=8

Each method is its own `smoe train` process (so that its peak memory is its own) at the
preset's shape: dense, then smoe-dropout at every k of ``--ks`` (k_min = k_max = k), for
``--warmup`` + ``--steps`` steps. s/step is the median of TensorBoard's train/step_time_s
over the timed steps, memory its train/peak_memory_mb (the allocator's peak on a GPU, the
process's peak resident set on the CPU). Each is a ratio to dense, beside the ideal: dense
with its MLP time scaled by k / N, ``1 - f + f k / N`` for the MLP's share f of a dense
step (the dense MLPs' forward and backward on a step's tokens, timed here). The schedule's
average weighs each k by the steps the preset's linear k_min -> k_max schedule spends at
it; the paper reports 0.98 of dense (Transformer-XL) and 0.91 (BERT).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from smoe.launcher.bench.runs import add_data_arguments, data_arguments, scalars
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic

PAPER = {"transformer-xl": 0.98, "bert": 0.91, "roberta": 0.91}  # time per iteration against dense


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for the runs (OUT/dense, OUT/k8, ...)")
    parser.add_argument("--preset", default="paper", help="paper (Transformer-XL) or bert-paper, or any preset")
    parser.add_argument("--ks", default="", help="comma-separated ks (default: every k of the schedule)")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="steps timed (default 5)")
    parser.add_argument("--json", help="write the table here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. batch_size=4 ds_config=bf16")


# Every run: training steps only (no validation, one checkpoint when it stops), each one logged.
RUN = ["max_steps=1000000", "log_every=1", "eval_every=1000000", "save_every=1000000", "keep_checkpoints=1"]


def train(args, out: Path, method: str, extra: list[str]) -> dict:
    """One `smoe train` of the benchmark (read back when it finished before); ``extra`` overrides win."""
    steps = args.warmup + args.steps
    if not scalars(out, "train/step_time_s").get(steps):
        command = [sys.executable, "-m", "smoe.launcher.cli", "train", "--preset", args.preset, "--method", method,
                   *data_arguments(args), "--out", str(out), *RUN, *args.overrides, *extra, "--stop-at", str(steps),
                   "--auto-resume"]
        log.info("$ " + " ".join(command[1:]))
        if subprocess.run(command).returncode:
            raise SystemExit(f"smoe: error: the run in {out} failed; the same command continues the benchmark")
    times = scalars(out, "train/step_time_s")
    return {"s_per_step": statistics.median(times[s] for s in range(args.warmup + 1, steps + 1)),
            "peak_mb": scalars(out, "train/peak_memory_mb")[steps]}


def mlp_share(config, seconds_per_step: float, tokens: int) -> float:
    """The dense MLPs' share of a dense step: their forward and backward on one step's tokens, timed here."""
    from smoe.launcher.bench.layer import time_ms
    from smoe.model import MLP

    mlp = MLP(config.d_model, config.d_ff, "gelu" if config.masked_lm else "relu", config.dropout)
    x = torch.randn(tokens, config.d_model, requires_grad=True)
    ms = statistics.median(time_ms(mlp, mlp, x, torch.randn_like(x), repeats=5))
    return min(config.n_layer * ms / 1e3 / seconds_per_step, 1.0)


def schedule_weights(config) -> dict[int, float]:
    """The share of a linear k_min -> k_max schedule's steps spent at each k."""
    from smoe.routing import TopKSchedule

    schedule = TopKSchedule.linear(config.k_min, config.k_max, 1000)
    ks = [schedule(step) for step in range(1000)]
    return {k: ks.count(k) / len(ks) for k in sorted(set(ks))}


def run(args) -> None:
    from smoe.launcher.config import build_config, parse_override

    config = build_config(args.preset, dict(parse_override(text) for text in args.overrides))
    ks = [int(k) for k in args.ks.split(",")] if args.ks else list(range(config.k_min, config.k_max + 1))
    out = Path(args.out)
    dense = train(args, out / "dense", "dense", [])
    rows = [{"method": "dense", "k": None, **dense, "time_ratio": 1.0, "memory_ratio": 1.0, "ideal_ratio": 1.0}]
    tokens = config.batch_size * (config.block_size if config.text else config.tgt_len)
    share = mlp_share(config, dense["s_per_step"], tokens)
    for k in ks:
        measured = train(args, out / f"k{k}", "smoe-dropout", [f"k_min={k}", f"k_max={k}", f"eval_ks={k}"])
        rows.append({"method": "smoe-dropout", "k": k, **measured,
                     "time_ratio": measured["s_per_step"] / dense["s_per_step"],
                     "memory_ratio": measured["peak_mb"] / dense["peak_mb"],
                     "ideal_ratio": 1 - share + share * k / config.num_experts})
    weights = schedule_weights(config)
    measured_ks = [k for k in weights if k in ks]
    total = sum(weights[k] for k in measured_ks)
    by_k = {row["k"]: row for row in rows[1:]}
    schedule = {key: sum(weights[k] * by_k[k][key] for k in measured_ks) / total
                for key in ("time_ratio", "ideal_ratio", "memory_ratio")} if measured_ks else None
    report = {"preset": args.preset, "overrides": args.overrides, "tokens_per_step": tokens, "mlp_share": share,
              "warmup": args.warmup, "steps": args.steps, "rows": rows, "schedule": schedule,
              "schedule_ks": measured_ks, "paper": PAPER.get(config.model)}
    log.info(format_table(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2))


def format_table(report: dict) -> str:
    lines = [f"{report['preset']} {' '.join(report['overrides'])}: {report['tokens_per_step']:,} tokens/step, "
             f"MLP share of a dense step {report['mlp_share']:.2f}",
             f"{'method':>13} {'k':>3} {'s/step':>8} {'x dense':>8} {'ideal':>6} {'peak MB':>9} {'x dense':>8}"]
    for row in report["rows"]:
        k = "-" if row["k"] is None else row["k"]
        lines.append(f"{row['method']:>13} {k:>3} {row['s_per_step']:8.3f} {row['time_ratio']:8.3f} "
                     f"{row['ideal_ratio']:6.3f} {row['peak_mb']:9.0f} {row['memory_ratio']:8.3f}")
    if report["schedule"]:
        s = report["schedule"]
        paper = f"; the paper: {report['paper']}" if report["paper"] else ""
        lines.append(f"schedule average (k {min(report['schedule_ks'])} -> {max(report['schedule_ks'])}): "
                     f"{s['time_ratio']:.3f} x dense (ideal {s['ideal_ratio']:.3f}, "
                     f"{s['time_ratio'] / s['ideal_ratio']:.3f} x ideal), "
                     f"memory {s['memory_ratio']:.3f} x dense{paper}")
    return "\n".join(lines)
