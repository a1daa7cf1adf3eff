"""Which of a dense MLP's hidden neurons go to which expert when it is split into N experts.

:func:`~smoe.model.mlp.modularize` gives expert i the contiguous neurons ``i*H/N:(i+1)*H/N``.
Upcycling first reorders the neurons, :func:`permute_neurons` with the order from
:func:`neuron_order`, so that contiguous slices are the split wanted:

- ``contiguous``: the neurons as they are (what ``smoe convert`` always did for BERT);
- ``random``: a seeded shuffle, SMoE-Dropout's split;
- ``kmeans``: balanced k-means over the neurons' key vectors, so that an expert holds neurons
  that respond to the same inputs (MoEfication's and LLaMA-MoE's clustering split).

Shapes: H hidden neurons, D model width, N experts (clusters).
"""

from __future__ import annotations

import copy

import torch

from smoe.model.mlp import MLP, expert_width

SPLITS = ("random", "kmeans", "contiguous")
KMEANS_ITERATIONS = 20


def neuron_order(mlp: MLP, num_experts: int, split: str, seed: int = 0) -> torch.LongTensor:
    """A permutation of the H hidden neurons: expert i gets ``order[i*H/N:(i+1)*H/N]``.

    Computed on the CPU, so one seed gives one order wherever the MLP lives. For ``kmeans``
    each expert's neurons are ascending, expert 0's first.
    """
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is unknown: use one of {', '.join(SPLITS)}")
    d_ff = mlp.d_ff
    expert_width(d_ff, num_experts)
    generator = torch.Generator().manual_seed(seed)
    if split == "contiguous":
        return torch.arange(d_ff)
    if split == "random":
        return torch.randperm(d_ff, generator=generator)
    keys_HD = mlp.fc1.weight.detach()[:d_ff].to("cpu", torch.float32)
    clusters_H = balanced_kmeans(keys_HD, num_experts, generator)
    return torch.argsort(clusters_H, stable=True)


def balanced_kmeans(keys_HD: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.LongTensor:
    """Each row's cluster, every cluster exactly H/N rows: k-means on the L2-normalised rows.

    The key vector of a neuron is its fc1 row, the gate row in a gated MLP: the gate is what
    passes through the activation, so it decides which tokens the neuron answers (the
    co-activation that clustering stands in for); the up row only scales that answer.
    LLaMA-MoE clusters one projection's rows the same way. Normalised, because a row's norm
    says how strongly a neuron answers, not to what.

    The starting centroids are N rows drawn with ``generator``; then at most
    ``KMEANS_ITERATIONS`` rounds of balanced assignment and centroid update, stopping early
    once the assignment stops changing. The balanced assignment is greedy: all (row, cluster)
    pairs in increasing distance, each row to the first cluster that still has room. Llama-7B's
    MLP (H = 11008, D = 4096) into N = 16 takes 1.5 to 5 s on a 2-core CPU (docs/design.md).
    """
    keys_HD = torch.nn.functional.normalize(keys_HD, dim=1)
    centroids_ND = keys_HD[torch.randperm(keys_HD.shape[0], generator=generator)[:num_clusters]]
    keys_squared_H1 = keys_HD.pow(2).sum(1, keepdim=True)  # 1, or 0 for a zero row
    clusters_H = None
    for _ in range(KMEANS_ITERATIONS):
        distances_HN = keys_squared_H1 - 2 * (keys_HD @ centroids_ND.T) + centroids_ND.pow(2).sum(1)  # squared L2
        assigned_H = balanced_assignment(distances_HN, keys_HD.shape[0] // num_clusters)
        if clusters_H is not None and torch.equal(assigned_H, clusters_H):
            break
        clusters_H = assigned_H
        centroids_ND = torch.zeros_like(centroids_ND).index_add_(0, clusters_H, keys_HD)
        centroids_ND /= keys_HD.shape[0] // num_clusters
    return clusters_H


def balanced_assignment(distances_HN: torch.Tensor, room: int) -> torch.LongTensor:
    """Greedy: (row, cluster) pairs from nearest to farthest, a row to the first cluster with room left."""
    num_rows, num_clusters = distances_HN.shape
    pairs = torch.argsort(distances_HN.flatten(), stable=True).tolist()
    cluster_of = [-1] * num_rows
    room_left = [room] * num_clusters
    unassigned = num_rows
    for pair in pairs:
        row, cluster = divmod(pair, num_clusters)
        if cluster_of[row] >= 0 or not room_left[cluster]:
            continue
        cluster_of[row] = cluster
        room_left[cluster] -= 1
        unassigned -= 1
        if not unassigned:
            break
    return torch.tensor(cluster_of)


def permute_neurons(mlp: MLP, order: torch.Tensor) -> MLP:
    """A copy of ``mlp`` with its hidden neurons in ``order``: the same function, since a
    neuron is its fc1 row (its gate and its up row when gated), fc1 bias and fc2 column."""
    order = torch.as_tensor(order, dtype=torch.long, device="cpu")
    d_ff = mlp.d_ff
    if not torch.equal(order.sort().values, torch.arange(d_ff)):
        raise ValueError(f"order is not a permutation of the MLP's {d_ff} hidden neurons: "
                         f"use neuron_order(mlp, num_experts, split)")
    fc1_rows = torch.cat([order, order + d_ff]) if mlp.gated else order
    permuted = copy.deepcopy(mlp)
    device = mlp.fc1.weight.device
    fc1_rows, order = fc1_rows.to(device), order.to(device)
    with torch.no_grad():
        permuted.fc1.weight.copy_(mlp.fc1.weight[fc1_rows])
        permuted.fc2.weight.copy_(mlp.fc2.weight[:, order])
        if mlp.has_bias:
            permuted.fc1.bias.copy_(mlp.fc1.bias[fc1_rows])
    return permuted
