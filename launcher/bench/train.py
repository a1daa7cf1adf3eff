"""`smoe bench train`: end-to-end training s/step and peak memory, smoe-dropout at each k
against dense, measured in the same run.

    smoe bench train --data-file ../shared/data/enwik8/enwik8-head-4154399 --out runs/bench-train batch_size=4
    smoe bench train --preset bert-paper --data-files ../shared/data/books --out runs/bench-bert batch_size=8
    smoe bench train --init runs/llama-moe --dense-init path/to/llama --data-files books/ --out runs/bench-llama

Each method is its own `smoe train` process (so that its peak memory is its own) at the
preset's shape: dense, then smoe-dropout at every k of ``--ks`` (k_min = k_max = k), for
``--warmup`` + ``--steps`` steps. s/step is the median of TensorBoard's train/step_time_s
over the timed steps, memory its train/peak_memory_mb (the allocator's peak on a GPU, the
process's peak resident set on the CPU). Each is a ratio to dense, beside the ideal: dense
with its MLP time scaled by k / N, ``1 - f + f k / N`` for the MLP's share f of a dense
step (the dense MLPs' forward and backward on a step's tokens, timed here). The schedule's
average weighs each k by the steps the preset's linear k_min -> k_max schedule spends at
it; the paper reports 0.98 of dense (Transformer-XL) and 0.91 (BERT).

An upcycled decoder LM (preset causal-lm, the default with --init) is measured against the
model it was upcycled from: dense is ``smoe train --method dense --init DENSE_DIR``, each k
``--init UPCYCLED_DIR``; f is timed on that model's own MLP (Llama's gated, bias-free silu) on
the device and in the precision the runs train in. The report adds issue 25's criterion at
k = N/4: time at most the ideal + 0.10 and peak memory at most 1.05 x dense.
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
# Issue 25's bound for an upcycled model at k = N/4: time ratio <= ideal + TIME_MARGIN, memory ratio <= MEMORY_BOUND.
TIME_MARGIN, MEMORY_BOUND = 0.10, 1.05


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for the runs (OUT/dense, OUT/k8, ...)")
    parser.add_argument("--preset", help="paper (Transformer-XL) or bert-paper, or any preset (default: paper, or "
                                         "causal-lm with --init)")
    parser.add_argument("--init", help="causal-lm: the upcycled model (`smoe upcycle`'s output) the k runs start from")
    parser.add_argument("--dense-init", help="causal-lm: the dense model it was upcycled from, the dense run's --init")
    parser.add_argument("--ks", default="", help="comma-separated ks (default: every k of the schedule)")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="steps timed (default 5)")
    parser.add_argument("--json", help="write the table here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. batch_size=4 ds_config=bf16")


# Every run: training steps only (no validation, one checkpoint when it stops), each one logged.
RUN = ["max_steps=1000000", "log_every=1", "eval_every=1000000", "save_every=1000000", "keep_checkpoints=1"]


def preset(args) -> str:
    """The preset every run trains: --preset, else causal-lm with --init (as `smoe train`), else paper."""
    return args.preset or ("causal-lm" if args.init or args.dense_init else "paper")


def bench_config(args, overrides: dict):
    """The config of the benchmark's k runs (from --init for a causal LM), refusing a pair of
    models it cannot compare."""
    from smoe.launcher.config import build_config, init_fields, preset_values

    name = preset(args)
    causal = preset_values(name).get("model") == "causal-lm"
    if not causal:
        if args.init or args.dense_init:
            raise ValueError(f"--init and --dense-init benchmark a causal LM: preset {name} trains another model; use "
                             "--preset causal-lm (the default with --init)")
        return build_config(name, overrides)
    if not (args.init and args.dense_init):
        raise ValueError(f"preset {name} benchmarks an upcycled decoder LM against its dense model: pass both --init "
                         "UPCYCLED_DIR (`smoe upcycle`'s output) and --dense-init DENSE_DIR (the model it came from)")
    upcycled, dense = init_fields(args.init), init_fields(args.dense_init)
    if upcycled["method"] == "dense":
        raise ValueError(f"--init {args.init} is a dense model: pass it as --dense-init, and its `smoe upcycle` "
                         "output as --init")
    if dense["method"] != "dense":
        raise ValueError(f"--dense-init {args.dense_init} is an upcycled model: pass the dense model it came from")
    shape = [key for key in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size") if upcycled[key] != dense[key]]
    if shape:
        raise ValueError(f"--dense-init {args.dense_init} has {shape[0]} {dense[shape[0]]} but --init {args.init} has "
                         f"{upcycled[shape[0]]}: pass the dense model that --init was upcycled from")
    return build_config(name, {**overrides, "init": args.init})


def train(args, out: Path, method: str, extra: list[str], init: str | None = None) -> dict:
    """One `smoe train` of the benchmark (read back when it finished before; continued from its
    checkpoint when it stopped early); ``extra`` overrides win; ``init`` starts the run from a model."""
    from smoe.launcher.checkpoints.schema import latest_tag

    steps = args.warmup + args.steps
    if not scalars(out, "train/step_time_s").get(steps):
        start = ["--init", init] if init and latest_tag(out / "checkpoints") is None else []
        command = [sys.executable, "-m", "smoe.launcher.cli", "train", "--preset", preset(args), "--method", method,
                   *start, *data_arguments(args), "--out", str(out), *RUN, *args.overrides, *extra,
                   "--stop-at", str(steps), "--auto-resume"]
        log.info("$ " + " ".join(command[1:]))
        if subprocess.run(command).returncode:
            raise SystemExit(f"smoe: error: the run in {out} failed; the same command continues the benchmark")
    times = scalars(out, "train/step_time_s")
    return {"s_per_step": statistics.median(times[s] for s in range(args.warmup + 1, steps + 1)),
            "peak_mb": scalars(out, "train/peak_memory_mb")[steps]}


def dense_mlp(config):
    """A dense layer's MLP as the runs train it: a decoder LM's own kind (read from its config
    through the upcycling's reader, on the meta device), else the preset's."""
    from smoe.model import MLP

    if config.model != "causal-lm":
        return MLP(config.d_model, config.d_ff, "gelu" if config.masked_lm else "relu", config.dropout)
    from transformers import AutoConfig, AutoModelForCausalLM

    from smoe.model.decoder import architecture_of

    hf_config = AutoConfig.from_pretrained(config.init)
    architecture, activation = architecture_of(hf_config)
    with torch.device("meta"):
        mlp = architecture.read_mlp(architecture.layers(AutoModelForCausalLM.from_config(hf_config))[0].mlp,
                                    activation)
    return MLP(mlp.fc1.in_features, mlp.d_ff, mlp.activation_name, gated=mlp.gated, bias=mlp.has_bias)


def run_device_dtype(config) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision the runs train: the GPU when there is one, the DeepSpeed config's bf16 or fp16."""
    from smoe.launcher.runtime import deepspeed_config

    ds, _ = deepspeed_config.load(config.ds_config)
    dtype = (torch.bfloat16 if ds.get("bf16", {}).get("enabled") else
             torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), dtype


def mlp_share(config, seconds_per_step: float, tokens: int) -> float:
    """The MoE layers' dense MLPs' share of a dense step: their forward and backward on one step's
    tokens, timed here on the runs' device and precision."""
    from smoe.launcher.bench.layer import time_ms
    from smoe.model.feedforward import moe_layers

    device, dtype = run_device_dtype(config)
    mlp = dense_mlp(config).to(device, dtype)
    x = torch.randn(tokens, config.d_model, device=device, dtype=dtype, requires_grad=True)
    ms = statistics.median(time_ms(mlp, mlp, x, torch.randn_like(x), repeats=5))
    return min(len(moe_layers(config.moe_layers, config.n_layer)) * ms / 1e3 / seconds_per_step, 1.0)


def schedule_weights(config) -> dict[int, float]:
    """The share of a linear k_min -> k_max schedule's steps spent at each k."""
    from smoe.routing import TopKSchedule

    schedule = TopKSchedule.linear(config.k_min, config.k_max, 1000)
    ks = [schedule(step) for step in range(1000)]
    return {k: ks.count(k) / len(ks) for k in sorted(set(ks))}


def criterion(rows: list[dict], num_experts: int) -> dict | None:
    """Issue 25's bound at k = N/4 for an upcycled model, or None when N/4 is no whole k."""
    k = num_experts // 4
    if num_experts % 4 or not k:
        return None
    row = next((row for row in rows if row["k"] == k), None)
    if row is None:
        return {"k": k, "measured": False}
    time_bound = row["ideal_ratio"] + TIME_MARGIN
    return {"k": k, "measured": True, "time_ratio": row["time_ratio"], "time_bound": time_bound,
            "memory_ratio": row["memory_ratio"], "memory_bound": MEMORY_BOUND,
            "meets": row["time_ratio"] <= time_bound and row["memory_ratio"] <= MEMORY_BOUND}


def run(args) -> None:
    from smoe.launcher.config import parse_override

    config = bench_config(args, dict(parse_override(text) for text in args.overrides))
    ks = [int(k) for k in args.ks.split(",")] if args.ks else list(range(config.k_min, config.k_max + 1))
    method = config.method if args.init else "smoe-dropout"  # an upcycled model trains the method it was made for
    out = Path(args.out)
    dense = train(args, out / "dense", "dense", [], args.dense_init)
    rows = [{"method": "dense", "k": None, **dense, "time_ratio": 1.0, "memory_ratio": 1.0, "ideal_ratio": 1.0}]
    tokens = config.batch_size * (config.block_size if config.text else config.tgt_len)
    share = mlp_share(config, dense["s_per_step"], tokens)
    for k in ks:
        measured = train(args, out / f"k{k}", method, [f"k_min={k}", f"k_max={k}", f"eval_ks={k}"], args.init)
        rows.append({"method": method, "k": k, **measured,
                     "time_ratio": measured["s_per_step"] / dense["s_per_step"],
                     "memory_ratio": measured["peak_mb"] / dense["peak_mb"],
                     "ideal_ratio": 1 - share + share * k / config.num_experts})
    weights = schedule_weights(config)
    measured_ks = [k for k in weights if k in ks]
    total = sum(weights[k] for k in measured_ks)
    by_k = {row["k"]: row for row in rows[1:]}
    schedule = {key: sum(weights[k] * by_k[k][key] for k in measured_ks) / total
                for key in ("time_ratio", "ideal_ratio", "memory_ratio")} if measured_ks else None
    report = {"preset": preset(args), "overrides": args.overrides, "tokens_per_step": tokens, "mlp_share": share,
              "warmup": args.warmup, "steps": args.steps, "rows": rows, "schedule": schedule,
              "schedule_ks": measured_ks, "paper": PAPER.get(config.model)}
    if args.init:
        report.update(init=args.init, dense_init=args.dense_init, num_experts=config.num_experts,
                      criterion=criterion(rows, config.num_experts))
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
    if "criterion" in report:
        lines.append(format_criterion(report["criterion"], report["num_experts"]))
    return "\n".join(lines)


def format_criterion(result: dict | None, num_experts: int) -> str:
    """Issue 25's bound at k = N/4: "meets" or "misses", with the numbers."""
    if result is None:
        return f"criterion at k = N/4: N = {num_experts} has no whole N/4"
    if not result["measured"]:
        return f"criterion at k = N/4 = {result['k']}: not measured, add {result['k']} to --ks"
    return (f"criterion at k = N/4 = {result['k']} (time <= ideal + {TIME_MARGIN:.2f}, memory <= "
            f"{MEMORY_BOUND:.2f} x dense): {'meets' if result['meets'] else 'misses'}: time "
            f"{result['time_ratio']:.3f} (bound {result['time_bound']:.3f}), memory {result['memory_ratio']:.3f}")
