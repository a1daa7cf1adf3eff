"""dispatch=auto: the fastest path at each k, timed on the layer itself, without touching the run."""

from dataclasses import replace
from itertools import permutations

import pytest
import torch

from smoe.model import MoEConfig, SMoE, autotune
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
    with pytest.raises(ValueError, match=r"dispatch 'grouped' needs fp32 or bf16 on the CPU, or bf16 on a CUDA GPU of "
                                         r"compute capability 9.x or 10.x .* expert widths \(d_model 6, d_ff / num_experts 6\)"):
        narrow(torch.randn(4, 6))


@pytest.mark.parametrize("capability, grouped", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True),
                                                 ((12, 0), False)], ids=["sm80", "sm89", "sm90", "sm100", "sm120"])
def test_grouped_is_a_cuda_candidate_only_where_grouped_mm_runs_one_kernel(monkeypatch, capability, grouped):
    """torch's grouped_mm runs its kernel in bf16 on compute capability 9.x and 10.x only; elsewhere (A100,
    L40, RTX 50xx at 12.0) it copies the offsets to the host and runs one matmul per expert."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    layer = SMoE(CFG)
    assert ("grouped" in candidates(layer, torch.bfloat16, "cuda")) == grouped
    assert "grouped" not in candidates(layer, torch.float32, "cuda")
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm reports MI300 as 9.4 and takes the fallback
    assert "grouped" not in candidates(layer, torch.bfloat16, "cuda")

def test_gated_and_bias_free_experts_of_the_same_width_are_timed_apart():
    layers = [SMoE(CFG), SMoE(replace(CFG, gated=True)), SMoE(replace(CFG, gated=True, bias=False)),
              SMoE(replace(CFG, output_bias=False))]
    assert len({autotune._key(layer, next(layer.parameters()), 64, 1) for layer in layers}) == 4


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


def test_auto_runs_the_path_timed_fastest_at_each_k_and_follows_the_times(monkeypatch):
    """The timer replaced by a table of times: the choice at each k is the table's minimum there,
    whichever path holds it; each shape is timed once per process."""
    table, timed = {}, set()

    def seconds(layer, path, x_TD, routes, repeats):
        k = routes.expert_ids_TK.shape[1]
        timed.add((path, k))
        return table[path, k]

    monkeypatch.setattr(autotune, "_seconds", seconds)
    layer = SMoE(CFG)
    paths = candidates(layer, torch.float32)
    assert paths == ["sorted", "grouped", "masked-dense"]
    for times in permutations([1.0, 2.0, 3.0]):
        monkeypatch.setattr(autotune, "_FASTEST", {})  # a fresh process
        timed.clear()
        table.update({(path, 1): time for path, time in zip(paths, times)})
        table.update({(path, 16): time for path, time in zip(paths, reversed(times))})  # another winner at k = 16
        choices = autotune_dispatch(layer, 64, [1, 16])
        assert timed == set(table)
        for k in (1, 16):
            assert choices[k] == min(paths, key=lambda path: table[path, k])
            layer.set_top_k(k)
            assert layer.deepspeed_moe.path() == choices[k]
    table.update({key: 1.0 / value for key, value in table.items()})  # the slowest is now the fastest...
    timed.clear()
    assert autotune_dispatch(layer, 64, [1, 16]) == choices and not timed  # ...but this shape was timed already
