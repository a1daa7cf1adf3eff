"""`smoe bench infer MODEL_DIR`: inference latency and tokens/s of an exported model at each k and
named slice, and the best of them under a latency or FLOPs budget.

MODEL_DIR is a `smoe export` directory, loaded as a deployment loads it (transformers: its remote
code, or its own Mixtral / Qwen3-MoE class). Each k (and each slice of ``--slice``: one k per MoE
layer, from the export's ``slices.json``) runs a forward at batch 1 and at a large batch of
``--length`` tokens per row (Transformer-XL: a segment after a full memory), after a warm-up,
timed ``--repeats`` times (the median; on a GPU after a synchronize). ``--budget-ms X`` picks,
of the settings whose batch-1 latency is at most X ms, the one of best quality; ``--budget-gflops X``
the same among those whose forward FLOPs per token are at most X. A budget considers every slice of
the export beside the uniform ks. Quality and FLOPs come from the export's ``slices.json`` where
`smoe slice` wrote one (its calibration bits: every setting measured alike), else from
``slimming.json`` (validation bits by k); without quality, the largest k that fits.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from smoe.launcher.checkpoints.run_dir import SLICES_FILE
from smoe.launcher.evaluation.sweep import k_label
from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic

SLIMMING_FILE = "slimming.json"  # per k: quality, active parameters, FLOPs and speed, written by `smoe export`
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SpeedRow:
    k: int | list[int] | None  # one for every layer, one per MoE layer (a slice), None: a dense model
    batch: int
    tokens: int  # per forward
    latency_ms: float
    tokens_per_s: float


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="a `smoe export` directory")
    parser.add_argument("--ks", help="comma-separated ks (default: 1, 2, 4, ... up to N)")
    parser.add_argument("--slice", nargs="+", default=[], metavar="NAME",
                        help="time these slices of the export's slices.json too (a budget considers all of them)")
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


NATIVE_MODEL_TYPES = ("mixtral", "qwen3_moe")  # what `smoe export` writes as transformers' own class


def load_exported(model_dir: Path, device: str = "cpu", dtype: str = "fp32"):
    """The exported model through the transformers Auto class its config names (a native Mixtral or
    Qwen3-MoE: ``AutoModelForCausalLM``), in eval mode."""
    import transformers

    config_file = Path(model_dir) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    heads = [name for name in config.get("auto_map", {}) if name.startswith("AutoModel")]
    native = config.get("model_type") in NATIVE_MODEL_TYPES
    if not heads and not native:
        raise ValueError(f"{model_dir} is not a `smoe export` directory (no auto_map model in config.json, nor a "
                         f"{' or '.join(NATIVE_MODEL_TYPES)} model): export the model first with `smoe export RUN OUT`")
    auto_class = getattr(transformers, heads[0] if heads else "AutoModelForCausalLM")
    model = auto_class.from_pretrained(model_dir, trust_remote_code=not native, dtype=DTYPES[dtype])
    return model.to(device).eval()


def num_experts_of(config) -> int:
    """N of an exported config: ours and Qwen3-MoE say ``num_experts``, Mixtral ``num_local_experts``."""
    return getattr(config, "num_local_experts", None) or config.num_experts


def exported_top_k(model) -> int | list[int]:
    return model.top_k if hasattr(model, "set_top_k") else model.config.num_experts_per_tok


def set_exported_top_k(model, k: int | list[int]) -> None:
    """One k for every MoE layer or one per MoE layer, on a remote-code or a native export."""
    if hasattr(model, "set_top_k"):
        model.set_top_k(k)
    else:
        from smoe.launcher.export.native import set_native_top_k

        set_native_top_k(model, k)


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
def measure(model, ks: list[int | list[int] | None], batches: list[int], length: int, repeats: int = 5
            ) -> list[SpeedRow]:
    """Latency and tokens/s of one forward at each k (or slice) and batch size (``ks`` [None]: a dense
    model); the model's k is restored after."""
    original = exported_top_k(model)
    rows = []
    try:
        for batch in batches:
            inputs = example_inputs(model, batch, length, torch.Generator().manual_seed(0))
            tokens = inputs["input_ids"].numel()
            for k in ks:
                if k is not None:
                    set_exported_top_k(model, k)
                seconds = median_seconds(lambda: model(**inputs), model.device, repeats)
                rows.append(SpeedRow(k, batch, tokens, seconds * 1e3, tokens / seconds))
                log.info(f"k {k_label(k):>9} | batch {batch:>4} | {seconds * 1e3:9.2f} ms | "
                         f"{tokens / seconds:12,.0f} tokens/s")
    finally:
        if ks != [None]:
            set_exported_top_k(model, original)
    return rows


def best_setting(costs: dict[str, float], budget: float, quality: dict[str, float]) -> str:
    """Of the settings (by label, smallest k first) whose cost is at most ``budget``, the one with the
    lowest bits (``quality``); where none that fits has a quality, the last (the largest k). Raises when
    none fits."""
    fitting = [label for label, cost in costs.items() if cost <= budget]
    if not fitting:
        cheapest = min(costs, key=costs.get)
        raise ValueError(f"nothing fits the budget {budget:g}: the cheapest, {cheapest}, costs {costs[cheapest]:.4g}; "
                         "raise the budget")
    known = [label for label in fitting if label in quality]
    if known:
        return min(known, key=lambda label: (quality[label], -costs[label]))
    return fitting[-1]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def settings_of(args, model, slices: dict) -> dict[str, int | list[int]]:
    """Label ("k=4", or a slice's name) -> k or per-layer ks: the ``--ks`` (default 1, 2, 4, ... N), the
    ``--slice`` names, and with a budget every slice of the export; refused: an unknown name."""
    named = {entry["name"]: entry["ks"] for entry in slices.get("slices", [])}
    unknown = [name for name in args.slice if name not in named]
    if unknown:
        raise ValueError(f"no slice {', '.join(unknown)} in {args.model_dir}/{SLICES_FILE}: it has "
                         f"{', '.join(named) or 'none (`smoe slice RUN`, then `smoe export RUN OUT`, writes them)'}")
    budget = args.budget_ms is not None or args.budget_gflops is not None
    ks = args.ks or default_ks(num_experts_of(model.config))
    return {f"k={k}": k for k in ks} | {name: named[name] for name in (named if budget else args.slice)}


def run(args) -> None:
    """``args.ks``: a list of ints, or None for :func:`default_ks`."""
    for name in ("batch", "length", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} ({getattr(args, name)}) must be at least 1")
    model_dir = Path(args.model_dir)
    slices = read_json(model_dir / SLICES_FILE)
    model = load_exported(model_dir, args.device, args.dtype)
    settings = settings_of(args, model, slices)
    for k in settings.values():
        set_exported_top_k(model, k)  # refuses a k outside 1..N, or a slice of the wrong length, before anything is timed
    log.info(f"{args.model_dir} on {device_name(model.device)}, {args.dtype}, {args.length} tokens per row")
    labels = list(settings)
    rows = measure(model, list(settings.values()), sorted({1, args.batch}), args.length, args.repeats)
    report = {"model": str(args.model_dir), "device": device_name(model.device), "dtype": args.dtype,
              "length": args.length, "rows": [{"setting": labels[i % len(labels)], **asdict(row)}
                                              for i, row in enumerate(rows)]}
    if args.budget_ms is not None or args.budget_gflops is not None:
        quality, flops = setting_facts(model_dir, slices, settings)
        if args.budget_ms is not None:
            costs = {label: row.latency_ms for label, row in zip(labels, rows) if row.batch == 1}
            what, budget = "ms at batch 1", args.budget_ms
        else:
            missing = [label for label in labels if label not in flops]
            if missing:
                raise ValueError(f"{args.model_dir} has no FLOPs for {', '.join(missing)} (in {SLIMMING_FILE} or "
                                 f"{SLICES_FILE}): export the model again with `smoe export`, or use --budget-ms")
            costs, what, budget = flops, "GFLOPs per token", args.budget_gflops
        label = best_setting(costs, budget, quality)
        report["choice"] = {"setting": label, "k": settings[label], "budget": budget, "cost": costs[label],
                            "unit": what}
        unit = slices.get("unit") or read_json(model_dir / SLIMMING_FILE).get("unit", "")
        named = "" if label == f"k={settings[label]}" else f" (k={k_label(settings[label])})"
        log.info(f"best under {budget:g} {what}: {label}{named}, {costs[label]:.4g} {what}"
                 + (f", {quality[label]:.4f} {unit}" if label in quality else ""))
    if args.json:
        write_atomic(Path(args.json), json.dumps(report, indent=2))


def setting_facts(model_dir: Path, slices: dict, settings: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Each setting's quality (bits, lower is better) and GFLOPs per token: from slices.json where it has
    them (calibration bits, every setting on the same batches), else slimming.json's validation bits by k."""
    by_ks = {tuple(entry["ks"]): entry for entry in slices.get("slices", [])}
    uniform = {row["k"]: row for row in slices.get("uniform", [])}
    slimming = {row["k"]: row for row in read_json(model_dir / SLIMMING_FILE).get("rows", [])}
    quality, flops = {}, {}
    for label, k in settings.items():
        if slices:
            entry = uniform.get(k) if isinstance(k, int) else by_ks.get(tuple(k))
            value = None if entry is None else entry.get("calibration_bits")
        else:
            entry = slimming.get(k)
            value = None if entry is None else entry.get("valid")
        if value is not None:
            quality[label] = value
        if isinstance(k, int) and entry is None:
            entry = slimming.get(k)
        if entry is not None and entry.get("flops_per_token") is not None:
            flops[label] = entry["flops_per_token"] / 1e9
    return quality, flops


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
