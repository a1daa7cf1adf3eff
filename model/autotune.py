"""Which dispatch ``auto`` runs at each k: timed on the layer's own shape, device and dtype.

Where the paths cross depends on the machine (a 2-core CPU's crossover is not a GPU's) and
moves with k in ways a fixed threshold misses, so each candidate (``sorted``,
``grouped`` where grouped_mm takes the shapes, ``masked-dense``) runs a forward and
backward at each k on random tokens routed uniformly at random, and the fastest is kept.
Timing draws no number from the run: routes come from a private generator, dropout's draws
are undone (:func:`torch.random.fork_rng`), the routers are not called and no gradient is
accumulated, so a run that measures trains exactly like one that does not. Each shape,
device, dtype, token count and k is timed once per process.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from smoe.model.dispatch import COMBINES, groupable
from smoe.model.moe import SMoE, moe_layers_of
from smoe.routing import Routes, assignment_counts


def candidates(layer: SMoE, dtype: torch.dtype, device: torch.device | str = "cpu") -> list[str]:
    return [path for path in ("sorted", "grouped", "masked-dense")
            if path != "grouped" or groupable(layer.local_experts, dtype, device)]


def _uniform_routes(num_tokens: int, num_experts: int, k: int, device, generator: torch.Generator) -> Routes:
    scores = torch.rand(num_tokens, num_experts, generator=generator).to(device)
    expert_ids = scores.topk(k, dim=1).indices
    weights = torch.full((num_tokens, k), 1.0 / k, device=device)
    return Routes(expert_ids, weights, torch.zeros((), device=device), assignment_counts(expert_ids, num_experts))


def _seconds(layer: SMoE, path: str, x_TD: torch.Tensor, routes: Routes, repeats: int) -> float:
    """The shortest of ``repeats`` forward + backward passes of one path."""
    experts = layer.local_experts
    params = [p for expert in experts for p in expert.parameters() if p.requires_grad]
    best = float("inf")
    for _ in range(repeats):
        if x_TD.is_cuda:
            torch.cuda.synchronize(x_TD.device)
        started = time.perf_counter()
        y_TD = COMBINES[path](experts, x_TD, routes)
        torch.autograd.grad(y_TD, [x_TD, *params], torch.ones_like(y_TD))  # returned, never accumulated
        if x_TD.is_cuda:
            torch.cuda.synchronize(x_TD.device)
        best = min(best, time.perf_counter() - started)
    return best


# (shape, device, dtype, tokens, k) -> the fastest path: each is timed once per process.
_FASTEST: dict[tuple, str] = {}


def _key(layer: SMoE, param: torch.Tensor, num_tokens: int, k: int) -> tuple:
    config = layer.config
    return (config.d_model, config.d_ff // config.num_experts, config.num_experts, config.activation, config.gated,
            config.bias, config.has_output_bias, layer.training, str(param.device), param.dtype, num_tokens, k)


def fastest_paths(layer: SMoE, num_tokens: int, ks, repeats: int = 1, seed: int = 0) -> dict[int, str]:
    """The fastest single-rank path of ``layer`` (forward + backward) at each k: each path warmed up
    once, then timed ``repeats`` times per k; what this process has timed already is not timed again."""
    param = next(layer.parameters())
    todo = [k for k in sorted(set(ks)) if _key(layer, param, num_tokens, k) not in _FASTEST]
    if todo:
        generator = torch.Generator().manual_seed(seed)
        x_TD = torch.randn(num_tokens, layer.config.d_model, generator=generator).to(param.device, param.dtype)
        x_TD.requires_grad_()
        paths = candidates(layer, param.dtype, param.device)
        devices = [param.device] if param.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            for index, k in enumerate(todo):
                routes = _uniform_routes(num_tokens, layer.num_experts, k, param.device, generator)
                if index == 0:
                    for path in paths:
                        _seconds(layer, path, x_TD, routes, 1)
                times = {path: _seconds(layer, path, x_TD, routes, repeats) for path in paths}
                _FASTEST[_key(layer, param, num_tokens, k)] = min(times, key=times.get)
    return {k: _FASTEST[_key(layer, param, num_tokens, k)] for k in sorted(set(ks))}


def set_auto_paths(model: nn.Module, choices: dict[int, str]) -> None:
    """What ``dispatch=auto`` runs at each k, on every MoE layer of the model."""
    for layer in moe_layers_of(model):
        layer.deepspeed_moe.auto_paths = {int(k): path for k, path in choices.items()}


def autotune_dispatch(model: nn.Module, num_tokens: int, ks, repeats: int = 1) -> dict[int, str]:
    """Time the paths on the first MoE layer that runs ``auto`` on one rank (the layers of a model
    share one shape) and make every layer run the fastest at each k. Empty when none does."""
    layers = [layer for layer in moe_layers_of(model) if layer.config.dispatch == "auto" and layer.ep_size == 1]
    if not layers or num_tokens < 1:
        return {}
    choices = fastest_paths(layers[0], num_tokens, ks, repeats)
    set_auto_paths(model, choices)
    return choices
