"""The two expert kinds of smoe.model.mlp: the plain MLP and the gated one of the decoder LMs."""

import pytest
import torch
import torch.nn.functional as F

from smoe.model import MLP, modularize


def test_a_gated_mlp_is_down_of_act_gate_times_up_with_gate_and_up_in_one_fc1():
    torch.manual_seed(0)
    mlp = MLP(16, 32, "silu", gated=True, bias=False)
    assert mlp.fc1.weight.shape == (64, 16) and mlp.fc2.weight.shape == (16, 32)
    gate, up = mlp.fc1.weight[:32], mlp.fc1.weight[32:]
    x = torch.randn(5, 16)
    torch.testing.assert_close(mlp(x), F.silu(x @ gate.T) * (x @ up.T) @ mlp.fc2.weight.T)


def test_gelu_tanh_is_gpt2s_gelu_new():
    mlp = MLP(16, 32, "gelu_tanh")
    h = torch.linspace(-6, 6, 101)
    gelu_new = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(mlp.act(h), gelu_new)
    assert not torch.allclose(mlp.act(h), F.gelu(h), rtol=0, atol=1e-4)  # not the erf GELU


def test_a_bias_free_mlp_has_no_bias_parameters():
    mlp = MLP(16, 32, "silu", gated=True, bias=False)
    assert [name for name, _ in mlp.named_parameters()] == ["fc1.weight", "fc2.weight"]
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 16 * 32  # gate, up and down
    mlp.reset_parameters(0.02)  # no bias to zero


@pytest.mark.parametrize("activation, bias", [("silu", False), ("gelu_tanh", True)])
def test_modularize_splits_a_gated_mlp_exactly(activation, bias):
    torch.manual_seed(0)
    dense = MLP(16, 128, activation, gated=True, bias=bias)
    if bias:
        torch.nn.init.normal_(dense.fc1.bias)
        torch.nn.init.normal_(dense.fc2.bias)
    experts = modularize(dense, 16)
    assert all(e.gated and e.has_bias == bias and e.fc1.weight.shape == (16, 16) for e in experts)
    torch.testing.assert_close(experts[3].fc1.weight, dense.fc1.weight[[*range(24, 32), *range(152, 160)]])
    extra = 15 * 16 if bias else 0  # fc2's bias lives in every expert
    assert sum(p.numel() for e in experts for p in e.parameters()) == sum(p.numel() for p in dense.parameters()) + extra
    x = torch.randn(20, 16)
    torch.testing.assert_close(sum(e(x) for e in experts), dense(x), rtol=1e-5, atol=1e-6)


def test_an_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="activation 'gelu_new' is unknown: use one of relu, gelu, gelu_tanh, silu"):
        MLP(16, 32, "gelu_new")


def test_an_mlp_without_output_bias_keeps_fc1s_and_modularize_cuts_it_into_experts_like_it():
    """An upcycled GPT-2's expert kind: its experts hold exactly the dense parameters, fc1's bias rows
    included, and sum to the dense MLP without its output bias."""
    torch.manual_seed(0)
    dense = MLP(16, 128, "gelu_tanh", output_bias=False)
    assert [name for name, _ in dense.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight"]
    torch.nn.init.normal_(dense.fc1.bias)
    experts = modularize(dense, 16)
    assert all(e.has_bias and not e.has_output_bias for e in experts)
    assert sum(p.numel() for e in experts for p in e.parameters()) == sum(p.numel() for p in dense.parameters())
    x = torch.randn(20, 16)
    torch.testing.assert_close(sum(e(x) for e in experts), dense(x), rtol=1e-5, atol=1e-6)
