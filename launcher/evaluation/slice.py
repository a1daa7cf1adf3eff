"""`smoe slice RUN --budget-gflops X | --budget-ms X | --params P`: the per-layer ks of best quality under
a budget, searched on held-out data, written as named slices to RUN/slices.json.

An SMoE-Dropout model is trained at every k, so each MoE layer can run its own. The search is a
greedy walk on marginal quality per cost: it starts with the smallest k (of ``--ks``, default
the run's eval_ks) in every MoE layer and, step after step, raises by one step of ``--ks`` the one
layer whose raise lowers the calibration loss most per added cost (forward FLOPs per token,
measured on the machine at hand, or active parameters), among the raises that still fit the
largest budget; it stops when none fits. Every point it passes is kept (the frontier in
slices.json); a budget's slice is the point of lowest calibration loss whose cost is within it, of
the frontier and the uniform ks (so a slice is never worse on calibration than a uniform k it could
afford). A latency budget (``--budget-ms``, batch-1 forward of one evaluation block or segment, the
median of ``--repeats`` after a warm-up, on the machine at hand) walks on FLOPs to the end (every layer
at the largest k), then times every frontier point and uniform k and picks among those within it:
the walk itself does not run on latency, whose noise (a few percent between two timings of the same
setting on a CPU) is as large as one layer's raise and would misorder them.
Greedy because an exhaustive search evaluates steps ** layers settings (5 ** 12 for 12 layers at
1, 2, 4, 8, 16) and the walk at most layers x (layers x steps); its weakness is the one of every
greedy walk: one raise judged at a time, it misses two layers that help only together, and a
raise that costs much at once loses to a cheaper one of smaller total gain.

The calibration loss is the validation split, ``--max-batches`` of it (default the run's
eval_segments; 0: all of it), never the test split. The test split is measured once at the end,
for each slice and for each uniform k of ``--ks`` beside them, for the card only; so are the
batch-1 latencies of each, on the device the run loads on (recorded in slices.json).
`smoe export RUN OUT` carries slices.json into the exported directory.
`smoe eval RUN --k NAME` evaluates a slice by its name. Each call writes slices.json anew: give
every budget in one call.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import deepspeed.comm as dist
import torch

from smoe.launcher.bench.infer import device_name, median_seconds
from smoe.launcher.checkpoints.run_dir import RunDir
from smoe.launcher.checkpoints.schema import latest_tag
from smoe.launcher.config import parse_ks
from smoe.launcher.downstream.slim import parameter_count
from smoe.launcher.evaluation.metrics import LN2, active_parameters
from smoe.launcher.evaluation.run import LoadedRun, load_run
from smoe.launcher.evaluation.sweep import SweepRow, format_header, k_label, sweep
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic
from smoe.model.feedforward import get_method
from smoe.model.moe import moe_layers_of, set_top_k, top_ks_of

COSTS = {"gflops": "GFLOPs per token", "params": "active parameters", "ms": "ms per batch-1 forward"}
WALKED_ON = {"gflops": "gflops", "params": "params", "ms": "gflops"}  # latency is too noisy to walk on


@dataclass(frozen=True)
class Budget:
    cost: str  # a key of COSTS
    limit: float
    name: str  # the slice's name: gflops-0.12, params-600k, ms-20, or --name


@dataclass(frozen=True)
class Point:
    """A per-layer setting the walk passed: its calibration loss (nats per token) and its cost."""

    ks: tuple[int, ...]
    loss: float
    cost: float


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="the --out directory of a `smoe train` run of an expert method")
    parser.add_argument("--budget-gflops", type=float, nargs="+", default=[], metavar="X",
                        help="one slice per budget: the best per-layer ks of at most X forward GFLOPs per token")
    parser.add_argument("--params", nargs="+", default=[], metavar="P",
                        help="one slice per budget: the best per-layer ks of at most P active parameters "
                             "(600000, 600k, 1.5M)")
    parser.add_argument("--budget-ms", type=float, nargs="+", default=[], metavar="X",
                        help="one slice per budget: the best per-layer ks whose batch-1 forward (one evaluation block "
                             "or segment) takes at most X ms here")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per setting (default 5; the median)")
    parser.add_argument("--ks", help="the ks each layer steps through, comma-separated (default: the run's eval_ks)")
    parser.add_argument("--name", help="the slice's name (one budget only; default e.g. gflops-0.12)")
    parser.add_argument("--max-batches", type=int, help="calibration batches of the validation split (default: the "
                                                        "run's eval_segments; 0: the whole split)")


def budgets_of(args) -> list[Budget]:
    """The budgets asked for, each with its slice's name; refused: none, a non-positive one, a
    --name for several, a name that reads as ks."""
    budgets = [Budget("gflops", limit, f"gflops-{limit:g}") for limit in args.budget_gflops]
    budgets += [Budget("ms", limit, f"ms-{limit:g}") for limit in args.budget_ms]
    budgets += [Budget("params", parameter_count(text), f"params-{text.strip().lower()}") for text in args.params]
    if not budgets:
        raise ValueError("smoe slice needs a budget: --budget-gflops X, --budget-ms X or --params P (several "
                         "allowed)")
    bad = [b.name for b in budgets if b.limit <= 0]
    if bad:
        raise ValueError(f"budgets must be positive: {', '.join(bad)}")
    if args.name is not None:
        if len(budgets) != 1:
            raise ValueError(f"--name {args.name} names one slice, but {len(budgets)} budgets were given: drop --name "
                             "(each slice is then named by its budget) or give one budget")
        if not args.name or set(args.name) <= set("0123456789/ ") or "," in args.name:
            raise ValueError(f"--name '{args.name}' would read as ks in `smoe eval --k`: use a name with a letter "
                             "and no comma, e.g. --name small")
        budgets = [Budget(budgets[0].cost, budgets[0].limit, args.name)]
    return list({b.name: b for b in budgets}.values())


def greedy_walk(steps: list[int], layers: int, loss: Callable[[tuple[int, ...]], float],
                cost: Callable[[tuple[int, ...]], float], limit: float) -> list[Point]:
    """The frontier from ``steps[0]`` in every layer: each step raises the one layer (to its next k in
    ``steps``) whose raise lowers ``loss`` most per added ``cost``, among the raises of cost at most
    ``limit``; it ends when none fits. ``loss`` is called only for raises that fit."""
    start = (steps[0],) * layers
    frontier = [Point(start, loss(start), cost(start))]
    while True:
        here, best = frontier[-1], None
        for layer, k in enumerate(here.ks):
            if k == steps[-1]:
                continue
            ks = here.ks[:layer] + (steps[steps.index(k) + 1],) + here.ks[layer + 1:]
            added = cost(ks)
            if added > limit:
                continue
            point = Point(ks, loss(ks), added)
            gain = (here.loss - point.loss) / max(point.cost - here.cost, 1e-30)
            if best is None or gain > best[0]:
                best = (gain, point)
        if best is None:
            return frontier
        frontier.append(best[1])
        log.info(f"  {k_label(list(best[1].ks)):>12}  {best[1].loss / LN2:.4f}  {best[1].cost:.6g}")


def best_under(candidates: list[Point], budget: Budget) -> Point:
    """The candidate of lowest calibration loss within the budget; refused below the cheapest."""
    fitting = [p for p in candidates if p.cost <= budget.limit]
    if not fitting:
        cheapest = min(candidates, key=lambda p: p.cost)
        raise ValueError(f"{budget.name}: the budget ({budget.limit:g} {COSTS[budget.cost]}) is below the cheapest "
                         f"slice, k={k_label(list(cheapest.ks))}, which costs {cheapest.cost:.6g} "
                         f"{COSTS[budget.cost]}: give at least that")
    return min(fitting, key=lambda p: p.loss)


def rank_mean(value: float, device) -> float:
    """The mean over ranks: with experts spread over ranks each counts the FLOPs of the tokens its experts
    received, and the walk must take the same decisions on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    total = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def cost_function(cost: str, loaded: LoadedRun, repeats: int) -> Callable[[tuple[int, ...]], float]:
    """The cost of a setting, measured on the loaded model: active parameters, forward GFLOPs per token or
    the batch-1 latency in ms (the same on every rank: their mean)."""
    model, device = loaded.model, loaded.device

    def measured(ks: tuple[int, ...]) -> float:
        if cost == "params":
            return float(active_parameters(model, list(ks)))
        set_top_k(model, list(ks))
        if cost == "gflops":
            return rank_mean(loaded.family.flops_per_token(model, device), device) / 1e9
        was_training = model.training
        model.eval()
        try:
            seconds = median_seconds(loaded.family.example_forward(model, device), device, repeats)
        finally:
            model.train(was_training)
        return rank_mean(seconds * 1e3, device)

    return measured


def named_slices(run: RunDir) -> dict[str, list[int]]:
    """The run's slices by name (none before `smoe slice`)."""
    if not run.slices.is_file():
        return {}
    return {entry["name"]: entry["ks"] for entry in json.loads(run.slices.read_text())["slices"]}


def check_run(run: RunDir) -> None:
    """Refused before any process group: an exported model (no data to calibrate on), not a run, a dense
    run, no checkpoint."""
    if (run.root / "config.json").is_file() and not (run.root / "checkpoints").is_dir():
        raise ValueError(f"{run.root} is an exported or upcycled model, not a run: the search needs the run's "
                         "validation split; slice the run it came from (`smoe slice RUN ...`) and export it again "
                         "(`smoe export RUN OUT` carries slices.json into OUT)")
    config = run.load_config()
    if get_method(config.method).dense:
        raise ValueError(f"{run.root} is a dense run (method {config.method}): it has no experts to slice; slice a "
                         "run of an expert method such as smoe-dropout")
    if latest_tag(run.checkpoints) is None:
        raise ValueError(f"{run.checkpoints} holds no complete checkpoint: train (or resume) the run first")


def row_json(row: SweepRow, latency_ms: float) -> dict:
    return {"calibration_bits": row.valid_bpc, "test_bits": row.test_bpc, "flops_per_token": row.flops_per_token,
            "active_params": row.active_params, "batch1_latency_ms": latency_ms}


def run(args) -> None:
    budgets = budgets_of(args)
    run_dir = RunDir(Path(args.run_dir))
    check_run(run_dir)
    config = run_dir.load_config()
    steps = sorted(set(parse_ks(args.ks, "--ks") if args.ks else config.eval_ks))
    if not 1 <= steps[0] <= steps[-1] <= config.num_experts:
        raise ValueError(f"--ks {args.ks}: every k must be between 1 and num_experts ({config.num_experts})")
    max_batches = config.eval_segments if args.max_batches is None else args.max_batches
    if max_batches < 0:
        raise ValueError(f"--max-batches ({max_batches}) must not be negative (0: the whole validation split)")
    if args.repeats < 1:
        raise ValueError(f"--repeats ({args.repeats}) must be at least 1")

    loaded = load_run(run_dir.root)
    model, family, device = loaded.model, loaded.family, loaded.device
    original_ks, layers = top_ks_of(model), len(moe_layers_of(model))
    losses: dict[tuple[int, ...], float] = {}  # each setting's calibration loss, measured once

    def calibration(ks: tuple[int, ...]) -> float:
        if ks not in losses:
            set_top_k(model, list(ks))
            losses[ks] = family.eval_loss(model, "valid", loaded.rank, loaded.world, device, max_batches)
        return losses[ks]

    measure = {cost: functools.cache(cost_function(cost, loaded, args.repeats)) for cost in COSTS}  # timed once
    uniform_ks = [(k,) * layers for k in steps]
    for budget in budgets:  # refused before any walk
        best_under([Point(uniform_ks[0], float("nan"), measure[budget.cost](uniform_ks[0]))], budget)
    chosen, frontiers = {}, {}
    for cost in COSTS:
        mine = [b for b in budgets if b.cost == cost]
        if not mine:
            continue
        walked = WALKED_ON[cost]
        limit = max(b.limit for b in mine) if walked == cost else float("inf")
        log.info(f"walk on {COSTS[walked]} up to {limit:g} (ks, calibration {family.unit}, cost):")
        frontier = greedy_walk(steps, layers, calibration, measure[walked], limit)
        if walked != cost:
            log.info(f"timing the {len(frontier)} points of the frontier and the uniform ks")
            frontier = [Point(p.ks, p.loss, measure[cost](p.ks)) for p in frontier]
        frontiers[cost] = frontier
        candidates = frontier + [Point(ks, calibration(ks), measure[cost](ks)) for ks in uniform_ks]
        chosen |= {b.name: best_under(candidates, b) for b in mine}

    log.info(f"the test split, once per uniform k and slice (valid: the calibration batches):\n"
             f"{format_header(family.unit)}")
    searched = list(dict.fromkeys(point.ks for point in chosen.values()  # two budgets may choose the same
                                  if point.ks not in uniform_ks))  # a uniform k is swept anyway
    rows = sweep(model, list(steps) + [list(ks) for ks in searched],
                 lambda: calibration(tuple(top_ks_of(model))),
                 lambda: family.eval_loss(model, "test", loaded.rank, loaded.world, device),
                 lambda: rank_mean(family.flops_per_token(model, device), device))
    uniform = rows[:len(steps)]
    row_of = dict(zip(uniform_ks, uniform)) | dict(zip(searched, rows[len(steps):]))
    latency = {ks: measure["ms"](ks) for ks in row_of}
    set_top_k(model, original_ks)
    by_name = {b.name: b for b in budgets}
    slices = [{"name": name, "ks": list(point.ks), **row_json(row_of[point.ks], latency[point.ks]),
               "budget": {by_name[name].cost: by_name[name].limit}} for name, point in chosen.items()]
    for entry in slices:
        log.info(f"{entry['name']}: k={k_label(entry['ks'])}, test {entry['test_bits']:.4f} {family.unit}, "
                 f"{entry['flops_per_token'] / 1e9:.4g} GFLOPs per token, {entry['active_params']:,} active params, "
                 f"{entry['batch1_latency_ms']:.2f} ms at batch 1")
    if loaded.rank == 0:
        report = {"run": str(run_dir.root), "checkpoint": loaded.tag, "source": family.source, "unit": family.unit,
                  "device": device_name(device), "calibration": {"split": "valid", "max_batches": max_batches},
                  "steps": steps, "slices": slices,
                  "uniform": [{"k": row.k, **row_json(row, latency[(row.k,) * layers])} for row in uniform],
                  "frontier": {cost: [{"ks": list(p.ks), "calibration_bits": p.loss / LN2, cost: p.cost}
                                      for p in points] for cost, points in frontiers.items()}}
        write_atomic(run_dir.slices, json.dumps(report, indent=2))
        log.info(f"wrote {run_dir.slices}")
