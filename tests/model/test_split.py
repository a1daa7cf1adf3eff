"""Splitting a dense MLP's hidden neurons into experts: contiguous, seeded random, balanced k-means."""

import pytest
import torch

from smoe.model import MLP, modularize
from smoe.model.split import SPLITS, neuron_order, permute_neurons

KINDS = [dict(activation="silu", gated=True, bias=False), dict(activation="gelu_tanh", gated=True, bias=True),
         dict(activation="relu", gated=False, bias=True), dict(activation="gelu", gated=False, bias=False)]


def random_mlp(d_model=16, d_ff=64, activation="relu", gated=False, bias=True, seed=0):
    torch.manual_seed(seed)
    mlp = MLP(d_model, d_ff, activation, gated=gated, bias=bias)
    if bias:
        torch.nn.init.normal_(mlp.fc1.bias)
        torch.nn.init.normal_(mlp.fc2.bias)
    return mlp


def planted_mlp(num_clusters=8, width=16, d_model=32, gated=True, noise=0.05):
    """Neurons in ``num_clusters`` groups, shuffled: a key row is its group's centre plus noise, times a
    norm between 0.05 and 20; when gated, the up rows hold another grouping, 10 times larger. Returns
    the MLP and each neuron's group."""
    generator = torch.Generator().manual_seed(1)
    d_ff = num_clusters * width

    def rows_of(group):
        centres = torch.randn(num_clusters, d_model, generator=generator)
        return centres[group] + noise * torch.randn(d_ff, d_model, generator=generator)

    group, up_group = (torch.arange(num_clusters).repeat_interleave(width)[torch.randperm(d_ff, generator=generator)]
                       for _ in range(2))
    norms = torch.empty(d_ff, 1).uniform_(-3, 3, generator=generator).exp()
    mlp = MLP(d_model, d_ff, "silu", gated=gated, bias=False)
    with torch.no_grad():
        mlp.fc1.weight[:d_ff] = rows_of(group) * norms
        if gated:
            mlp.fc1.weight[d_ff:] = 10 * rows_of(up_group)
    return mlp, group


def experts_groups(order, group, num_experts):
    """The set of planted groups each expert's neurons come from."""
    return [set(group[chunk].tolist()) for chunk in order.chunk(num_experts)]


@pytest.mark.parametrize("split", SPLITS)
def test_every_split_is_a_permutation_of_the_neurons(split):
    order = neuron_order(random_mlp(d_ff=96, gated=True, activation="silu"), 8, split)
    assert order.dtype == torch.long and torch.equal(order.sort().values, torch.arange(96))


def test_contiguous_is_the_neurons_as_they_are():
    assert torch.equal(neuron_order(random_mlp(), 4, "contiguous"), torch.arange(64))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k['activation']}-gated{k['gated']}-bias{k['bias']}")
def test_a_permuted_mlp_computes_the_same_function(kind):
    mlp = random_mlp(**kind)
    order = neuron_order(mlp, 4, "random", seed=3)
    permuted = permute_neurons(mlp, order)
    assert not torch.equal(permuted.fc1.weight, mlp.fc1.weight)
    x = torch.randn(20, 16)
    torch.testing.assert_close(permuted(x), mlp(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(permuted.fc2.weight[:, 0], mlp.fc2.weight[:, order[0]])
    if kind["gated"]:  # the up row travels with its gate row
        assert torch.equal(permuted.fc1.weight[64], mlp.fc1.weight[64 + order[0]])


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind", KINDS[:3], ids=lambda k: f"{k['activation']}-gated{k['gated']}-bias{k['bias']}")
def test_the_experts_of_a_split_sum_to_the_dense_output(kind, split):
    mlp = random_mlp(**kind)
    order = neuron_order(mlp, 8, split)
    experts = modularize(permute_neurons(mlp, order), 8)
    torch.testing.assert_close(experts[2].fc2.weight, mlp.fc2.weight[:, order[16:24]])
    x = torch.randn(20, 16)
    torch.testing.assert_close(sum(e(x) for e in experts), mlp(x), rtol=1e-5, atol=1e-5)


def test_the_random_split_is_seeded():
    mlp = random_mlp()
    assert torch.equal(neuron_order(mlp, 4, "random", seed=5), neuron_order(mlp, 4, "random", seed=5))
    assert not torch.equal(neuron_order(mlp, 4, "random", seed=5), neuron_order(mlp, 4, "random", seed=6))


def test_kmeans_is_balanced_deterministic_and_sorted_within_each_expert():
    mlp = random_mlp(d_ff=128, gated=True, activation="silu", bias=False)
    order = neuron_order(mlp, 8, "kmeans", seed=2)
    assert torch.equal(order, neuron_order(mlp, 8, "kmeans", seed=2))
    assert torch.equal(order.sort().values, torch.arange(128))  # 8 experts of exactly 16 neurons
    assert all(torch.equal(chunk, chunk.sort().values) for chunk in order.chunk(8))
    assert not torch.equal(order, torch.arange(128))


@pytest.mark.parametrize("gated", [True, False])
def test_kmeans_recovers_planted_clusters_of_gate_row_directions_and_random_does_not(gated):
    mlp, group = planted_mlp(gated=gated)
    for seed in range(3):
        kmeans = experts_groups(neuron_order(mlp, 8, "kmeans", seed=seed), group, 8)
        assert all(len(groups) == 1 for groups in kmeans) and set().union(*kmeans) == set(range(8))
    random = experts_groups(neuron_order(mlp, 8, "random"), group, 8)
    assert all(len(groups) > 1 for groups in random)


def test_an_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="split 'cluster' is unknown: use one of random, kmeans, contiguous"):
        neuron_order(random_mlp(), 4, "cluster")


@pytest.mark.parametrize("split", SPLITS)
def test_num_experts_not_dividing_the_hidden_size_is_a_clear_error(split):
    with pytest.raises(ValueError, match=r"hidden size \(64\) is not divisible by num_experts \(6\): "
                                         r"choose num_experts dividing 64"):
        neuron_order(random_mlp(), 6, split)


def test_an_order_that_is_not_a_permutation_is_a_clear_error():
    with pytest.raises(ValueError, match="order is not a permutation of the MLP's 64 hidden neurons: use neuron_order"):
        permute_neurons(random_mlp(), torch.arange(64) // 2)
