"""Evaluation: bits per character at any k, inference FLOPs and active parameters.

The self-slimmable claim is a table: for each k, validation and test BPC, the
parameters a token touches, and the FLOPs per token (torch's FlopCounterMode over one
segment with full memory). The plot is the paper's Figure 1: BPC against active
parameters, one point per k.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import deepspeed.comm as dist
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from smoe.data import OrderedStream
from smoe.model.moe import moe_layers_of, set_top_k
from smoe.model.transformer_xl import lm_loss
from smoe.routing.routers import FrozenProjection

from .files import atomic_output

LN2 = math.log(2.0)


@torch.no_grad()
def evaluate(model: nn.Module, stream: OrderedStream, mem_len: int, max_segments: int = 0) -> float:
    """Mean cross-entropy (nats per token) over the stream, summed over data-parallel ranks.

    Memory starts empty and is carried from segment to segment, ``mem_len`` long
    (Transformer-XL evaluates shorter segments with a longer memory). A rank whose share of
    the streams is empty still runs every segment, on no rows, so that expert-parallel
    all-to-alls stay in step; it adds nothing to the sums."""
    was_training, train_mem_len = model.training, model.mem_len
    model.eval()
    model.mem_len = mem_len
    device = next(model.parameters()).device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    mems = None
    for segment in stream:
        if max_segments and segment.index >= max_segments:
            break
        out = model(segment.inputs.to(device), mems)
        mems = out.mems
        nats += lm_loss(out.logits, segment.targets.to(device), reduction="sum").double()
        tokens += segment.targets.numel()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(nats)
        dist.all_reduce(tokens)
    model.train(was_training)
    model.mem_len = train_mem_len
    return (nats / tokens).item()


def model_size(model: nn.Module) -> int:
    """The model's weights: its parameters and the frozen routers' projections (fp32 buffers)."""
    frozen = sum(b.numel() for m in model.modules() if isinstance(m, FrozenProjection) for b in m.buffers())
    return sum(p.numel() for p in model.parameters()) + frozen


def active_parameters(model: nn.Module, k: int | None) -> int:
    """Parameters one token uses: all but the N - k experts it skips in each MoE layer
    (counted for the whole model, also when this rank holds only some experts)."""
    total = model_size(model)
    for layer in moe_layers_of(model):
        per_expert = sum(p.numel() for p in layer.local_experts[0].parameters())
        total += per_expert * (k - layer.num_local_experts)
    return total


@torch.no_grad()
def sparse_flops(model: nn.Module, forward) -> float:
    """FLOPs of ``forward()`` in eval mode, counted on the sparse (sorted) dispatch so that
    the count follows k, as the paper reports."""
    was_training = model.training
    model.eval()
    dispatchers = [layer.deepspeed_moe for layer in moe_layers_of(model)]
    saved = [d.dispatch for d in dispatchers]
    for d in dispatchers:
        d.dispatch = "sorted"
    try:
        with FlopCounterMode(display=False) as counter:
            forward()
    finally:
        for d, dispatch in zip(dispatchers, saved):
            d.dispatch = dispatch
        model.train(was_training)
    return counter.get_total_flops()


@torch.no_grad()
def flops_per_token(model: nn.Module, seq_len: int, mem_len: int, vocab_size: int) -> float:
    """Transformer-XL's forward FLOPs per token for one segment with full memory."""
    train_mem_len = model.mem_len
    model.mem_len = mem_len
    device = next(model.parameters()).device
    try:
        was_training = model.training
        model.eval()
        mems = model(torch.randint(vocab_size, (1, max(mem_len, 1)), device=device)).mems if mem_len else None
        model.train(was_training)
        inputs = torch.randint(vocab_size, (1, seq_len), device=device)
        return sparse_flops(model, lambda: model(inputs, mems)) / seq_len
    finally:
        model.mem_len = train_mem_len


@dataclass
class SweepRow:
    k: int | None  # None for dense models
    valid_bpc: float
    test_bpc: float | None
    active_params: int
    flops_per_token: float


def sweep(model: nn.Module, ks: list[int], valid_loss, test_loss, flops, log=print) -> list[SweepRow]:
    """Evaluate at every k (one row for a dense model) and restore the model's k after.

    ``valid_loss()`` and ``test_loss()`` (or None) give nats per token, ``flops()`` forward
    FLOPs per token, each at the k currently set."""
    layers = moe_layers_of(model)
    original_k = layers[0].top_k if layers else None
    rows = []
    for k in (ks if layers else [None]):
        if k is not None:
            set_top_k(model, k)
        rows.append(SweepRow(k, valid_loss() / LN2, test_loss() / LN2 if test_loss else None,
                             active_parameters(model, k), flops()))
        log(format_row(rows[-1]))
    if original_k is not None:
        set_top_k(model, original_k)
    return rows


def lm_sweep(model: nn.Module, ks: list[int], valid: OrderedStream, test: OrderedStream | None, *, seq_len: int,
             mem_len: int, vocab_size: int, log=print) -> list[SweepRow]:
    """:func:`sweep` for Transformer-XL: BPC on ordered streams, FLOPs of one segment with memory."""
    return sweep(model, ks, lambda: evaluate(model, valid, mem_len),
                 (lambda: evaluate(model, test, mem_len)) if test is not None else None,
                 lambda: flops_per_token(model, seq_len, mem_len, vocab_size), log)


def format_header(unit: str = "BPC") -> str:
    valid, test = ("valid BPC", "test BPC") if unit == "BPC" else ("valid", "test")  # other units: in the title
    return f"{'k':>4}  {valid:>9}  {test:>8}  {'active params':>13}  {'GFLOPs/token':>12}"


def format_row(row: SweepRow) -> str:
    k = "-" if row.k is None else str(row.k)
    test = "-" if row.test_bpc is None else f"{row.test_bpc:.4f}"
    return (f"{k:>4}  {row.valid_bpc:>9.4f}  {test:>8}  {row.active_params / 1e6:>12.2f}M  "
            f"{row.flops_per_token / 1e9:>12.4f}")


def rows_to_json(rows: list[SweepRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def plot(rows: list[SweepRow], path, title: str, unit: str = "BPC") -> None:
    """BPC (or bits per token) against active parameters, one point per k (the paper's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r.active_params / 1e6 for r in rows]
    ax.plot(x, [r.valid_bpc for r in rows], "o-", label="valid")
    if all(r.test_bpc is not None for r in rows):
        ax.plot(x, [r.test_bpc for r in rows], "s--", label="test")
    for r, xi in zip(rows, x):
        if r.k is not None:
            ax.annotate(f"k={r.k}", (xi, r.valid_bpc), textcoords="offset points", xytext=(3, 4), fontsize=8)
    ax.set_xlabel("active parameters (M)")
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
