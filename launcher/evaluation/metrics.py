"""What a model is worth at a k: bits per character, inference FLOPs and active parameters.

FLOPs per token are torch's FlopCounterMode over one input (Transformer-XL: a segment with
full memory) on the sparse dispatch, so that they follow k as the paper reports."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import deepspeed.comm as dist
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from smoe.data import OrderedStream
from smoe.model.moe import moe_layers_of
from smoe.model.transformer_xl import lm_loss
from smoe.routing.routers import FrozenProjection

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


def active_parameters(model: nn.Module, k: int | Sequence[int] | None) -> int:
    """Parameters one token uses: all but the N - k experts it skips in each MoE layer, ``k`` one for
    every layer or one per MoE layer (counted for the whole model, also when this rank holds only
    some experts)."""
    total = model_size(model)
    layers = moe_layers_of(model)
    for layer, layer_k in zip(layers, [k] * len(layers) if k is None or isinstance(k, int) else k):
        per_expert = sum(p.numel() for p in layer.local_experts[0].parameters())
        total += per_expert * (layer_k - layer.num_local_experts)
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
def segment_forward(model: nn.Module, seq_len: int, mem_len: int, vocab_size: int) -> Callable[[], object]:
    """A Transformer-XL forward of one random segment after a full memory (made now, in eval mode)."""
    train_mem_len, was_training = model.mem_len, model.training
    device = next(model.parameters()).device
    model.mem_len = mem_len
    model.eval()
    try:
        mems = model(torch.randint(vocab_size, (1, max(mem_len, 1)), device=device)).mems if mem_len else None
    finally:
        model.mem_len = train_mem_len
        model.train(was_training)
    inputs = torch.randint(vocab_size, (1, seq_len), device=device)
    return lambda: model(inputs, mems)


def flops_per_token(model: nn.Module, seq_len: int, mem_len: int, vocab_size: int) -> float:
    """Transformer-XL's forward FLOPs per token for one segment with full memory."""
    return sparse_flops(model, segment_forward(model, seq_len, mem_len, vocab_size)) / seq_len
