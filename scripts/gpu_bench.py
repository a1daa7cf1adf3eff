#!/usr/bin/env python
"""Training-step time and peak memory of the paper's Transformer-XL, dense vs SMoE-Dropout (the
`step-bench` part of scripts/gpu-check.sh).

    python scripts/gpu_bench.py                        # on the GPU: batch 22 x 512 bytes, memory 512
    python scripts/gpu_bench.py --device cpu --tiny    # smoke check of this script on CPU (seconds)

The model is the `paper` preset (4 layers, d_model 256, 8 heads x 64, d_ff 8192, 16 experts
of 512) built as `smoe train` builds it, at the paper's batch (22 segments of 512 bytes, each
with the 512 hidden states of the previous segment as memory), in train mode (dropout 0.1).
Parameters are cast to bf16 the way DeepSpeed's bf16 engine casts them (parameters only: the
frozen router and the positional frequencies are buffers and stay fp32); fp16 on GPUs without
bf16 (V100). Timed: forward + backward (cross-entropy + aux loss) of one segment, with CUDA
events, mean of 10 steps after 3 warm-up steps (the first fills the memory). The optimizer step
is not timed: DeepSpeed's AdamW over the same number of parameters costs the same for both
(SMoE adds only 15 fc2 biases per layer and an untrained router). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps: weights, gradients and activations.
SMoE-Dropout runs at k = 8 and k = 16 with ``dispatch=auto`` (sorted at k = 8, masked-dense at
k = 16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PAPER = {"batch_size": 22}
TINY = {"n_layer": 2, "d_model": 64, "n_head": 2, "d_head": 32, "d_ff": 512, "tgt_len": 32, "mem_len": 32,
        "batch_size": 2}


def build(method: str, k: int | None, shape: dict, device, dtype):
    import torch

    from smoe.launcher.config import build_config
    from smoe.model import moe_layers_of, set_top_k
    from smoe.model.feedforward import feedforward_factory
    from smoe.model.transformer_xl import TransformerXL

    config = build_config("paper", {"method": method, **shape})
    model = TransformerXL(config.model_config(), feedforward_factory(config.feedforward_spec()))
    if k is not None:
        set_top_k(model, k)
    model.to(device).train()
    if dtype != torch.float32:  # DeepSpeed 0.19's engine: `p.data = p.data.to(dtype)`, buffers untouched
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    paths = sorted({layer.deepspeed_moe.path() for layer in moe_layers_of(model)})
    return model, config, "/".join(paths) or "-"


def time_steps(model, config, device, steps: int, warmup: int) -> tuple[float, float | None]:
    """Mean seconds per forward + backward, and the peak memory (GiB) of the timed steps (None on CPU).
    Timed on the model's device (CUDA events on its stream), whichever device is current."""
    import torch

    from smoe.launcher.bench.layer import moment, ms_between
    from smoe.model.transformer_xl import lm_loss

    cuda = device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    shape = (config.batch_size, config.tgt_len)
    segments = [(torch.randint(256, shape, generator=generator).to(device),
                 torch.randint(256, shape, generator=generator).to(device)) for _ in range(2)]
    mems = None

    def step(i):
        nonlocal mems
        inputs, targets = segments[i % 2]
        model.zero_grad(set_to_none=True)
        out = model(inputs, mems)
        (lm_loss(out.logits, targets) + out.aux_loss).backward()
        mems = out.mems

    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    milliseconds = []
    for i in range(steps):
        start = moment(device)
        step(i)
        milliseconds.append(ms_between(start, moment(device)))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return sum(milliseconds) / 1000 / steps, peak


def bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch: a smoke check of the script")
    parser.add_argument("--batch", type=int, help="segments per step (default: the paper's 22; --tiny: 2)")
    parser.add_argument("--ks", default="8,16", help="k of SMoE-Dropout (default 8,16)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; --tiny: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; --tiny: 1)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    parser.add_argument("--json", help="write the rows here (read by `summary`)")
    args = parser.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")  # before smoe imports deepspeed
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_bench: CUDA is not available (install a CUDA build of torch), or run with --device cpu --tiny",
                  file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    if dtype is None:
        if device.type == "cpu":
            dtype = torch.float32
        else:
            dtype = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    shape = dict(TINY if args.tiny else PAPER)
    if args.batch:
        shape["batch_size"] = args.batch
    steps = args.steps or (2 if args.tiny else 10)
    warmup = args.warmup or (1 if args.tiny else 3)
    ks = [int(k) for k in args.ks.split(",") if k]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dtype_name = str(dtype).removeprefix("torch.")
    title = (f"Transformer-XL {'tiny' if args.tiny else 'paper'} ({shape.get('n_layer', 4)} layers, d "
             f"{shape.get('d_model', 256)}, d_ff {shape.get('d_ff', 8192)}, 16 experts), batch "
             f"{shape['batch_size']} x {shape.get('tgt_len', 512)}, mem {shape.get('mem_len', 512)}, {dtype_name}, "
             f"forward+backward, mean of {steps} steps after {warmup}, on {name}")
    print(title, flush=True)
    rows = []
    for method, k in [("dense", None), *(("smoe-dropout", k) for k in ks)]:
        model, config, path = build(method, k, shape, device, dtype)
        seconds, peak = time_steps(model, config, device, steps, warmup)
        rows.append({"method": method, "k": k, "dispatch": path, "s_per_step": seconds, "peak_gib": peak})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dense = rows[0]["s_per_step"]
    for row in rows:
        row["vs_dense"] = row["s_per_step"] / dense
    print(format_bench(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "device": name, "dtype": dtype_name,
                                               "shape": shape, "rows": rows}, indent=2))
    return 0


def format_bench(rows: list[dict]) -> str:
    lines = ["| method | k | dispatch | s/step | vs dense | peak GiB |", "|---|---|---|---|---|---|"]
    for row in rows:
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        lines.append(f"| {row['method']} | {row['k'] if row['k'] is not None else '-'} | {row['dispatch']} | "
                     f"{row['s_per_step']:.4f} | {row['vs_dense']:.2f} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
