"""`smoe bench layer`: forward+backward time and peak memory of one MoE layer against the dense MLP.

Methods at each k: ``dense`` (the MLP being replaced, re-timed at the start of every
k group because this machine is noisy), ``deepspeed`` (stock
``deepspeed.moe.layer.MoE``, dropless, same k) and ``smoe`` (ours, frozen random
router, automatic dispatch). Every time is a ratio to the dense time of its group.
``--device``/``--dtype`` pick where and in what precision the layers run (both routers
compute in fp32 whatever the dtype); a GPU is timed with CUDA events.
Memory: one forward+backward per configuration; on the CPU in a fresh process, peak
resident memory above that process's resident memory just before it; on a GPU, after a
warm-up pass, the allocator's peak above what was allocated just before it. ``--ep`` adds the cost of
expert parallelism on the CPU: two gloo ranks with ep_size=2 against the same two ranks
with ep_size=1 (pure data parallel).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch

from smoe.launcher.runtime import log
from smoe.launcher.runtime.files import write_atomic
from smoe.model.moe import DISPATCHES

SIZES = {  # name: (d_model, d_ff); tiny is for smoke tests
    "transformer-xl": (256, 8192),
    "bert": (768, 6144),
    "tiny": (32, 256),
}
METHODS = ("dense", "deepspeed", "smoe")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Setup:
    size: str = "transformer-xl"
    tokens: int = 4096
    num_experts: int = 16
    dropout: float = 0.1
    threads: int = 2
    seed: int = 0
    dispatch: str = "auto"  # our dispatch path; auto: the fastest timed at each k
    device: str = "cpu"
    dtype: str = "fp32"  # a key of DTYPES


@dataclass
class Record:
    size: str
    device: str
    dtype: str
    method: str
    k: int
    median_ms: float
    min_ms: float
    max_ms: float
    ratio_to_dense: float
    peak_mb: float | None = None
    path: str | None = None  # our dispatch path at this k


def build_layer(setup: Setup, method: str, k: int, ep_size: int = 1, ep_rank: int = 0, rank: int = 0):
    """The module for ``method`` on the setup's device and dtype, and a callable doing one forward returning the
    output tensor. Both MoE gates stay fp32 inside: DeepSpeed's TopKGate casts its input and weight, ours keeps
    its weight fp32 through casts."""
    from deepspeed.moe.layer import MoE

    from smoe.model import MLP, MoEConfig, SMoE

    d_model, d_ff = SIZES[setup.size]
    torch.manual_seed(setup.seed)
    if method == "dense":
        layer = MLP(d_model, d_ff, "relu", setup.dropout)
    elif method == "deepspeed":
        expert = MLP(d_model, d_ff // setup.num_experts, "relu", setup.dropout)
        layer = MoE(d_model, expert, num_experts=setup.num_experts, k=k, drop_tokens=False, use_rts=False)
    else:
        config = MoEConfig(d_model, d_ff, setup.num_experts, k, ep_size=ep_size, dropout=setup.dropout,
                           seed=setup.seed, dispatch=setup.dispatch)
        layer = SMoE(config, ep_rank=ep_rank, rank=rank)
    layer.to(setup.device, DTYPES[setup.dtype])
    if method == "smoe":
        from smoe.model.autotune import autotune_dispatch

        autotune_dispatch(layer, setup.tokens, [k])  # dispatch=auto: the path timed fastest here
    return layer, (layer if method == "dense" else lambda x: layer(x)[0])


def forward_backward(layer, forward, x, grad) -> None:
    layer.zero_grad(set_to_none=True)
    forward(x).backward(grad)


def moment(device: torch.device):
    """A point in time: on a GPU a CUDA event recorded on the current stream of ``device``, the one the layer's
    kernels run on (kernels run asynchronously, so a host clock would time their launch; the current device's
    stream need not be the layer's), on the CPU perf_counter."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def ms_between(start, end) -> float:
    if isinstance(start, float):
        return (end - start) * 1e3
    end.synchronize()  # the end event has completed, on whichever device it was recorded
    return start.elapsed_time(end)


def time_ms(layer, forward, x, grad, repeats: int, barrier=None) -> list[float]:
    forward_backward(layer, forward, x, grad)  # warm-up
    times = []
    for _ in range(repeats):
        if barrier:
            barrier()
        start = moment(x.device)
        forward_backward(layer, forward, x, grad)
        times.append(ms_between(start, moment(x.device)))
    return times


def inputs(setup: Setup, rank: int = 0):
    """The input and output gradient, drawn on the CPU so that every device and dtype gets the same values."""
    generator = torch.Generator().manual_seed(setup.seed + rank)
    d_model = SIZES[setup.size][0]
    x, grad = (torch.randn(setup.tokens, d_model, generator=generator).to(setup.device, DTYPES[setup.dtype])
               for _ in range(2))
    return x.requires_grad_(), grad


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def probe_memory(setup: Setup, method: str, k: int) -> float:
    """MB of peak memory one forward+backward adds: on a GPU the allocator's peak above what is allocated before
    it; on the CPU peak resident memory, run in a fresh process so that nothing else has grown it."""
    torch.set_num_threads(setup.threads)
    layer, forward = build_layer(setup, method, k)
    x, grad = inputs(setup)
    if x.is_cuda:
        forward_backward(layer, forward, x, grad)  # the first matmuls allocate cuBLAS's workspace: not the layer's
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        forward_backward(layer, forward, x, grad)
        return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _rss_kb("VmRSS:")
    forward_backward(layer, forward, x, grad)
    return (_rss_kb("VmHWM:") - before) / 1024


def memory_mb(setup: Setup, method: str, k: int) -> float:
    """probe_memory in this process on a GPU (the allocator counts only tensors), in a fresh one on the CPU."""
    return probe_memory(setup, method, k) if setup.device == "cuda" else memory_in_fresh_process(setup, method, k)


def memory_in_fresh_process(setup: Setup, method: str, k: int) -> float:
    command = [sys.executable, "-m", "smoe.launcher.bench.layer", json.dumps(asdict(setup)), method, str(k)]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def _record(setup, method, k, times, dense_median, peak_mb=None, path=None) -> Record:
    median = statistics.median(times)
    return Record(setup.size, setup.device, setup.dtype, method, k, round(median, 2), round(min(times), 2),
                  round(max(times), 2), round(median / dense_median, 3),
                  peak_mb if peak_mb is None else round(peak_mb, 1), path)


def bench_size(setup: Setup, ks, repeats: int, memory: bool) -> list[Record]:
    torch.set_num_threads(setup.threads)
    x, grad = inputs(setup)
    records = []
    dense_peak = memory_mb(setup, "dense", 1) if memory else None
    for k in ks:
        dense_times = time_ms(*build_layer(setup, "dense", k), x, grad, repeats)
        dense_median = statistics.median(dense_times)
        records.append(_record(setup, "dense", k, dense_times, dense_median, dense_peak))
        for method in ("deepspeed", "smoe"):
            layer, forward = build_layer(setup, method, k)
            times = time_ms(layer, forward, x, grad, repeats)
            path = layer.deepspeed_moe.path() if method == "smoe" else None
            # The probe runs the path timed here (timing it again there would warm the process up first).
            peak = memory_mb(replace(setup, dispatch=path) if path else setup, method, k) if memory else None
            records.append(_record(setup, method, k, times, dense_median, peak, path))
        log.info(format_rows(records[-3:]))
    return records


def _ep_worker(rank: int, world_size: int, setup: Setup, ks, repeats: int, out_path: str) -> None:
    import deepspeed.comm as dist

    from smoe.model import init_expert_parallel

    torch.set_num_threads(1)
    ep_rank = init_expert_parallel(2)
    x, grad = inputs(setup, rank)
    rows = []
    for k in ks:
        for ep_size in (1, 2):
            layer, forward = build_layer(setup, "smoe", k, ep_size, ep_rank if ep_size == 2 else 0, rank)
            if ep_size == 2:
                layer.set_deepspeed_parallelism()
            times = time_ms(layer, forward, x, grad, repeats, barrier=dist.barrier)
            rows.append({"k": k, "ep_size": ep_size, "times": times})
    if rank == 0:
        write_atomic(out_path, json.dumps(rows))


def bench_expert_parallel(setup: Setup, ks, repeats: int) -> list[Record]:
    """ep_size=2 over two ranks against ep_size=1 on the same two ranks (1 thread each)."""
    from smoe.launcher.runtime.distributed import spawn

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "ep.json")
        spawn(_ep_worker, 2, setup, list(ks), repeats, out_path)
        with open(out_path) as f:
            rows = json.load(f)
    records = []
    for k in ks:
        ep1, ep2 = (next(r["times"] for r in rows if r["k"] == k and r["ep_size"] == e) for e in (1, 2))
        base = statistics.median(ep1)
        records += [_record(setup, "smoe-2ranks-ep1", k, ep1, base), _record(setup, "smoe-2ranks-ep2", k, ep2, base)]
        log.info(f"  k={k:2d}  ep_size=2 costs {statistics.median(ep2) / base:.2f}x ep_size=1 on 2 ranks")
    return records


def format_rows(records: list[Record]) -> str:
    lines = []
    for r in records:
        peak = "" if r.peak_mb is None else f"  peak {r.peak_mb:8.1f} MB"
        path = f"  [{r.path}]" if r.path else ""
        lines.append(f"{r.size:>14} k={r.k:2d} {r.method:>16}: median {r.median_ms:9.1f} ms "
                     f"(min {r.min_ms:.1f}, max {r.max_ms:.1f})  {r.ratio_to_dense:5.2f}x dense{peak}{path}")
    return "\n".join(lines)


def check_device(args) -> None:
    """Refuse up front what would fail or mislead halfway through a run."""
    if args.device == "cpu" and args.dtype == "fp16":
        # It runs, but CPU fp16 matmuls take a slow generic kernel (65x fp32 on an EPYC): it would time that.
        raise ValueError("--dtype fp16 needs --device cuda; use bf16 or fp32 on CPU")
    if args.device == "cuda" and args.ep:
        raise ValueError("--ep measures two gloo ranks on the CPU only (expert parallelism on GPUs needs NCCL on "
                         ">=2 GPUs, which this benchmark does not run); drop --ep or use --device cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device; use --device cpu")


def run(args) -> None:
    check_device(args)
    ks = [int(k) for k in args.ks.split(",")]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    records = []
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise ValueError(f"--sizes: '{size}' is unknown, use any of {', '.join(SIZES)}")
        setup = Setup(size, args.tokens, args.experts, args.dropout, args.threads, dispatch=args.dispatch,
                      device=args.device, dtype=args.dtype)
        log.info(f"== {size}: d_model={SIZES[size][0]} d_ff={SIZES[size][1]} N={args.experts} "
                 f"tokens={args.tokens} dropout={args.dropout} threads={args.threads} {device_name} {args.dtype}")
        records += bench_size(setup, ks, args.repeats, memory=not args.no_memory)
        if args.ep:
            log.info(f"== {size}: expert parallelism, 2 gloo ranks x 1 thread, {args.tokens} tokens per rank")
            records += bench_expert_parallel(setup, ks, args.repeats)
    if args.json:
        write_atomic(args.json, json.dumps([asdict(r) for r in records], indent=1))
        log.info(f"wrote {args.json}")


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", default="transformer-xl,bert", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--ks", default="1,2,4,8,16", help="top-k values (default 1,2,4,8,16)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per forward (default 4096)")
    parser.add_argument("--experts", type=int, default=16, help="number of experts N (default 16)")
    parser.add_argument("--dropout", type=float, default=0.1, help="expert/dense dropout, train mode (default 0.1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--dispatch", default="auto", choices=DISPATCHES,
                        help="force one of our dispatch paths (default: auto, the fastest timed at each k)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the layers run (default: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="parameters, inputs and gradients (default fp32; fp16 needs --device cuda)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--ep", action="store_true",
                        help="also time ep_size=2 against ep_size=1 on two gloo ranks (--device cpu only)")
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list")


if __name__ == "__main__":  # the fresh process of memory_in_fresh_process
    setup_args, method_arg, k_arg = sys.argv[1:4]
    print(probe_memory(Setup(**json.loads(setup_args)), method_arg, int(k_arg)))  # read back by memory_in_fresh_process
