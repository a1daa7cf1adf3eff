"""dispatch=auto: the fastest path at each k, timed on the layer itself, without touching the run."""

from dataclasses import replace

import pytest
import torch

from smoe.model import MoEConfig, SMoE
from smoe.model.autotune import autotune_dispatch, candidates, fastest_paths

CFG = MoEConfig(d_model=16, d_ff=128, num_experts=16, k=1, dropout=0.1, seed=3)


def test_every_k_gets_one_of_the_candidates():
    layer = SMoE(CFG)
    choices = fastest_paths(layer, 64, [1, 8, 16])
    assert sorted(choices) == [1, 8, 16] and set(choices.values()) <= {"sorted", "grouped", "masked-dense"}


def test_grouped_is_a_candidate_only_where_grouped_mm_takes_the_shapes():
    assert "grouped" in candidates(SMoE(CFG), torch.float32)
    narrow = SMoE(replace(CFG, d_model=6, d_ff=96))  # rows of 24 bytes
    assert candidates(narrow, torch.float32) == ["sorted", "masked-dense"]
    narrow.deepspeed_moe.dispatch = "grouped"
    with pytest.raises(ValueError, match=r"dispatch 'grouped' needs .* expert widths \(d_model 6, d_ff / num_experts 6\)"):
        narrow(torch.randn(4, 6))


def test_timing_draws_nothing_from_the_run_and_the_layer_follows_the_choices():
    layer = SMoE(replace(CFG, router="random"))  # a router with its own generator
    torch.manual_seed(0)
    global_rng, router_rng = torch.get_rng_state(), layer.router.generator.get_state()
    choices = autotune_dispatch(layer, 64, range(1, 17))
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert torch.equal(layer.router.generator.get_state(), router_rng)
    assert all(p.grad is None for p in layer.parameters())
    for k in range(1, 17):
        layer.set_top_k(k)
        assert layer.deepspeed_moe.path() == choices[k]
    layer.deepspeed_moe.auto_paths = {}  # nothing measured: the fixed rule
    assert layer.deepspeed_moe.path() == "masked-dense"
    layer.set_top_k(1)
    assert layer.deepspeed_moe.path() == "sorted"


def test_only_auto_layers_on_one_rank_are_timed():
    fixed = SMoE(replace(CFG, dispatch="sorted"))
    assert autotune_dispatch(fixed, 64, [1, 2]) == {} and fixed.deepspeed_moe.auto_paths == {}
