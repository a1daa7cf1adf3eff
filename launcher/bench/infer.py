"""`smoe bench infer MODEL_DIR`: inference latency and tokens/s of an exported model at each k,
and the best k under a latency or FLOPs budget.

MODEL_DIR is a `smoe export` directory, loaded as a deployment loads it (transformers,
``trust_remote_code=True``). Each k runs a forward at batch 1 and at a large batch of
``--length`` tokens per row (Transformer-XL: a segment after a full memory), after a warm-up,
timed ``--repeats`` times (the median; on a GPU after a synchronize). ``--budget-ms X`` picks,
of the ks whose batch-1 latency is at most X ms, the one of best quality (the export's
``slimming.json``; without quality, the largest k); ``--budget-gflops X`` the same among the
ks whose forward FLOPs per token are at most X.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic

SLIMMING_FILE = "slimming.json"  # per k: quality, active parameters, FLOPs and speed, written by `smoe export`
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SpeedRow:
    k: int
    batch: int
    tokens: int  # per forward
    latency_ms: float
    tokens_per_s: float


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="a `smoe export` directory")
    parser.add_argument("--ks", help="comma-separated ks (default: 1, 2, 4, ... up to N)")
    parser.add_argument("--batch", type=int, default=32, help="the large batch (default 32); batch 1 is always run")
    parser.add_argument("--length", type=int, default=128, help="tokens per row (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per setting (default 5; the median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-ms", type=float, help="the best k whose batch-1 latency is at most this")
    budget.add_argument("--budget-gflops", type=float,
                        help="the best k whose forward GFLOPs per token are at most this")
    parser.add_argument("--json", help="write the table (and the choice) here")


def default_ks(num_experts: int) -> list[int]:
    """1, 2, 4, ... and N."""
    ks, k = [], 1
    while k < num_experts:
        ks.append(k)
        k *= 2
    return ks + [num_experts]


def load_exported(model_dir: Path, device: str = "cpu", dtype: str = "fp32"):
    """The exported model through the transformers Auto class its config names, in eval mode."""
    import transformers

    config_file = Path(model_dir) / "config.json"
    auto_map = json.loads(config_file.read_text()).get("auto_map", {}) if config_file.is_file() else {}
    heads = [name for name in auto_map if name.startswith("AutoModel")]
    if not heads:
        raise ValueError(f"{model_dir} is not a `smoe export` directory (no auto_map model in config.json): "
                         "export the model first with `smoe export RUN OUT`")
    auto_class = getattr(transformers, heads[0])
    model = auto_class.from_pretrained(model_dir, trust_remote_code=True, dtype=DTYPES[dtype])
    return model.to(device).eval()


def example_inputs(model, batch: int, length: int, generator: torch.Generator) -> dict:
    """Random token ids of the model's shape: (batch, length), (batch, 2 choices, length) for a
    multiple-choice head, and a full memory before a Transformer-XL segment."""
    config, device = model.config, model.device
    length = min(length, max_tokens(config))
    shape = (batch, 2, length) if type(model).__name__.endswith("ForMultipleChoice") else (batch, length)
    inputs = {"input_ids": torch.randint(config.vocab_size, shape, generator=generator).to(device)}
    if hasattr(config, "mem_len"):
        memory = torch.randint(config.vocab_size, (batch, max(config.mem_len, 1)), generator=generator).to(device)
        inputs["mems"] = model(input_ids=memory).mems if config.mem_len else None
    return inputs


def max_tokens(config) -> int:
    """The longest row a model takes: BERT/RoBERTa's positions (RoBERTa's start after the padding
    id); Transformer-XL takes any length."""
    if not hasattr(config, "max_position_embeddings"):
        return 2**31
    offset = config.pad_token_id + 1 if config.model_type.endswith("roberta") else 0
    return config.max_position_embeddings - offset


@torch.no_grad()
def median_seconds(forward: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``forward()`` (after a warm-up). On a GPU the model's own ``device`` is
    synchronized: a bare ``torch.cuda.synchronize()`` waits for the current device, which need not
    be the model's (``--device cuda:1``), and would time the kernel launches only."""
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    forward()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        forward()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model, ks: list[int], batches: list[int], length: int, repeats: int = 5) -> list[SpeedRow]:
    """Latency and tokens/s of one forward at each k and batch size (``ks`` [None]: a dense model);
    the model's k is restored after."""
    original = model.top_k
    rows = []
    try:
        for batch in batches:
            inputs = example_inputs(model, batch, length, torch.Generator().manual_seed(0))
            tokens = inputs["input_ids"].numel()
            for k in ks:
                if k is not None:
                    model.set_top_k(k)
                seconds = median_seconds(lambda: model(**inputs), model.device, repeats)
                rows.append(SpeedRow(k, batch, tokens, seconds * 1e3, tokens / seconds))
                log.info(f"k {k or '-':>3} | batch {batch:>4} | {seconds * 1e3:9.2f} ms | "
                         f"{tokens / seconds:12,.0f} tokens/s")
    finally:
        if ks != [None]:
            model.set_top_k(original)
    return rows


def best_k(costs: dict[int, float], budget: float, quality: dict[int, float] | None = None) -> int:
    """Of the ks whose cost is at most ``budget``, the one with the lowest bits (``quality``,
    when known for all of them), else the largest. Raises when no k fits."""
    fitting = [k for k, cost in costs.items() if cost <= budget]
    if not fitting:
        cheapest = min(costs, key=costs.get)
        raise ValueError(f"no k fits the budget {budget:g}: the cheapest, k={cheapest}, costs {costs[cheapest]:.4g}; "
                         "raise the budget")
    if quality and all(k in quality for k in fitting):
        return min(fitting, key=lambda k: (quality[k], -k))
    return max(fitting)


def slimming_table(model_dir: Path) -> dict:
    path = Path(model_dir) / SLIMMING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run(args) -> None:
    """``args.ks``: a list of ints, or None for :func:`default_ks`."""
    for name in ("batch", "length", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} ({getattr(args, name)}) must be at least 1")
    model = load_exported(Path(args.model_dir), args.device, args.dtype)
    ks = args.ks or default_ks(model.config.num_experts)
    for k in ks:
        model.set_top_k(k)  # refuses a k outside 1..N, before anything is timed
    log.info(f"{args.model_dir} on {device_name(model.device)}, {args.dtype}, {args.length} tokens per row")
    rows = measure(model, ks, sorted({1, args.batch}), args.length, args.repeats)
    table = slimming_table(Path(args.model_dir))
    by_k = {row["k"]: row for row in table.get("rows", [])}
    report = {"model": str(args.model_dir), "device": device_name(model.device), "dtype": args.dtype,
              "length": args.length, "rows": [asdict(row) for row in rows]}
    if args.budget_ms is not None or args.budget_gflops is not None:
        quality = {k: row["valid"] for k, row in by_k.items() if row.get("valid") is not None}
        if args.budget_ms is not None:
            costs, what, budget = {r.k: r.latency_ms for r in rows if r.batch == 1}, "ms at batch 1", args.budget_ms
        else:
            missing = [k for k in ks if by_k.get(k, {}).get("flops_per_token") is None]
            if missing:
                raise ValueError(f"{args.model_dir}/{SLIMMING_FILE} has no FLOPs for k={missing}: export the model "
                                 "again with `smoe export`, or use --budget-ms")
            costs = {k: by_k[k]["flops_per_token"] / 1e9 for k in ks}
            what, budget = "GFLOPs per token", args.budget_gflops
        k = best_k(costs, budget, quality)
        report["choice"] = {"k": k, "budget": budget, "cost": costs[k], "unit": what}
        log.info(f"best k under {budget:g} {what}: k={k} ({costs[k]:.4g} {what}"
                 + (f", valid {quality[k]:.4f} {table.get('unit', '')}" if k in quality else "") + ")")
    if args.json:
        write_atomic(Path(args.json), json.dumps(report, indent=2))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"CPU ({name}, {torch.get_num_threads()} threads)"
