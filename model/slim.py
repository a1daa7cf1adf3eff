"""Self-slimming: keep B of a layer's N experts (the most used on the downstream data).

The kept experts keep their weights, and the router keeps their rows (or, for hash
routing, their order in each token's list), so for every token the slim layer ranks its
experts exactly as the full layer ranked them. With B = N the layer is unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from smoe.model.moe import SMoE


def most_used(counts: torch.Tensor, budget: int) -> list[int]:
    """The ``budget`` experts with the most tokens, in expert-id order (ties: lower id first)."""
    order = sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))
    return sorted(order[:budget])


def keep_experts(layer: SMoE, keep: list[int]) -> SMoE:
    """A new layer holding only the experts ``keep`` of ``layer`` (which must hold all N, ep_size 1)."""
    if layer.num_local_experts != layer.num_experts:
        raise ValueError("slimming needs every expert on this process: load the model with ep_size=1")
    if not keep or len(set(keep)) != len(keep) or not all(0 <= e < layer.num_experts for e in keep):
        raise ValueError(f"experts to keep {keep} must be distinct ids in [0, {layer.num_experts})")
    config = layer.config
    width = config.d_ff // config.num_experts
    slim = SMoE(replace(config, num_experts=len(keep), d_ff=width * len(keep), k=min(layer.top_k, len(keep)),
                        ep_size=1))
    for new, old in enumerate(keep):
        slim.local_experts[new].load_state_dict(layer.local_experts[old].state_dict())
    router, slim_router = layer.router, slim.router
    with torch.no_grad():
        if hasattr(router, "proj"):  # random-frozen and learned routers: one row per expert
            slim_router.proj.weight.copy_(router.proj.weight[keep])
            if router.proj.bias is not None:
                slim_router.proj.bias.copy_(router.proj.bias[keep])
        if hasattr(router, "table"):  # hash: each token's expert ranking, the dropped experts taken out
            new_id = torch.full((layer.num_experts,), -1, dtype=router.table.dtype)
            new_id[keep] = torch.arange(len(keep), dtype=router.table.dtype)
            mapped = new_id[router.table]
            slim_router.table.copy_(mapped[mapped >= 0].view(router.table.shape[0], len(keep)))
    return slim
