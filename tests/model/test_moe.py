from dataclasses import replace

import pytest
import torch

from smoe.model import MLP, DenseConfig, DenseFFN, MoEConfig, SMoE, modularize, optimizer_param_groups
from smoe.model.autotune import set_auto_paths
from smoe.model.dense import ConcreteDropout, DropBlock1d
from smoe.model.dispatch import _hidden_grad_
from smoe.model.mlp import ACTIVATIONS, activate
from smoe.routing import ROUTERS

CFG = MoEConfig(d_model=16, d_ff=128, num_experts=16, k=1, dropout=0.0, vocab_size=40, seed=5)
# The expert kinds besides the default (relu or gelu, biased): Llama's SwiGLU, GPT-2's MLP, a biased GLU,
# and an upcycled GPT-2's experts (fc1's bias only: the layer holds the one output bias).
KINDS = {"swiglu": dict(activation="silu", gated=True, bias=False), "gpt2": dict(activation="gelu_tanh"),
         "biased-glu": dict(activation="gelu_tanh", gated=True),
         "gpt2-upcycled": dict(activation="gelu_tanh", output_bias=False)}


def batch(seed=0, shape=(3, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, CFG.d_model, generator=g), torch.randint(0, 40, shape, generator=g)


def test_modularize_reproduces_the_dense_mlp_exactly():
    torch.manual_seed(0)
    dense = MLP(16, 128, "gelu", 0.0)
    x = torch.randn(20, 16)
    experts = modularize(dense, 16)
    assert all(e.fc1.out_features == 8 for e in experts)
    assert sum(p.numel() for e in experts for p in e.parameters()) == \
        sum(p.numel() for p in dense.parameters()) + 15 * 16  # fc2 bias now lives in every expert
    torch.testing.assert_close(sum(e(x) for e in experts), dense(x), rtol=1e-5, atol=1e-6)


def test_modularize_refuses_a_width_not_divisible_by_n():
    with pytest.raises(ValueError, match=r"hidden size \(100\) is not divisible by num_experts \(16\)"):
        modularize(MLP(8, 100), 16)


def test_the_papers_scale_at_k_equals_n_with_equal_weights_is_the_dense_mlp_over_n():
    torch.manual_seed(1)
    dense = MLP(16, 128, "relu", 0.0)
    layer = SMoE(replace(CFG, router="hash", k=16, combine_scale=1.0))
    layer.load_experts(modularize(dense, 16))
    x, ids = batch()
    y, _, counts = layer(x, ids)  # hash routing weights every expert 1/16
    torch.testing.assert_close(y, dense(x) / 16, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [x.shape[0] * x.shape[1]] * 16


def _run(layer, dispatch, x, ids):
    layer.deepspeed_moe.dispatch = dispatch
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, aux, _ = layer(x, ids)
    (y.square().sum() + aux).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("combine_scale", [1.0, 16.0])
@pytest.mark.parametrize("router", ["random-frozen", "learned", "hash"])
@pytest.mark.parametrize("k", list(range(1, 17)))
def test_fast_paths_equal_the_reference_loop(router, k, combine_scale):
    layer = SMoE(replace(CFG, router=router, k=k, combine_scale=combine_scale))
    x, ids = batch(k)
    y_ref, gx_ref, g_ref = _run(layer, "reference", x, ids)
    for dispatch in ("sorted", "grouped", "masked-dense"):
        y, gx, g = _run(layer, dispatch, x, ids)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=f"{dispatch}: {name}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 5, 13, 16])
def test_fast_paths_equal_the_reference_loop_for_every_expert_kind(kind, k):
    layer = SMoE(replace(CFG, router="learned", k=k, **KINDS[kind]))
    for expert in layer.local_experts:  # biases that matter
        for name, p in expert.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    x, ids = batch(k)
    y_ref, gx_ref, g_ref = _run(layer, "reference", x, ids)
    assert any(".experts." in name and "bias" in name for name in g_ref) == layer.config.bias
    for dispatch in ("sorted", "grouped", "masked-dense"):
        y, gx, g = _run(layer, dispatch, x, ids)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
        assert g.keys() == g_ref.keys()
        for name, want in g_ref.items():  # fp32 rounding, on the scale of the whole tensor
            torch.testing.assert_close(g[name], want, rtol=1e-4, atol=1e-6 * want.abs().max().item(),
                                       msg=f"{dispatch}: {name}")


class _Hidden(torch.autograd.Function):
    """The hidden units with the dispatch's hand-written gradient, for gradcheck."""

    @staticmethod
    def forward(ctx, h, activation, gated):
        ctx.save_for_backward(h)
        ctx.kind = activation, gated
        return activate(h, activation, gated)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return _hidden_grad_(grad.clone(), h, *ctx.kind), None, None


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_hand_written_activation_gradients_match_finite_differences(activation, gated):
    h = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    h.requires_grad_()
    assert torch.autograd.gradcheck(lambda h: _Hidden.apply(h, activation, gated), (h,))


def test_a_bias_free_layer_has_no_bias_parameters_and_the_dense_count_plus_the_router():
    layer = SMoE(replace(CFG, router="learned", **KINDS["swiglu"]))
    dense = MLP(16, 128, **KINDS["swiglu"])
    experts = [p for name, p in layer.named_parameters() if ".experts." in name]
    assert not [name for name, _ in layer.named_parameters() if ".experts." in name and "bias" in name]
    assert sum(p.numel() for p in experts) == sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for p in dense.parameters()) + \
        sum(p.numel() for p in layer.router.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_a_modularized_mlp_of_every_kind_at_k_equals_n_is_the_dense_mlp(kind):
    torch.manual_seed(1)
    dense = MLP(16, 128, **KINDS[kind])
    layer = SMoE(replace(CFG, router="hash", k=16, **KINDS[kind]))
    layer.load_experts(modularize(dense, 16))
    x, ids = batch()
    for dispatch in ("reference", "sorted", "grouped", "masked-dense"):
        layer.deepspeed_moe.dispatch = dispatch
        torch.testing.assert_close(layer(x, ids)[0], dense(x), rtol=1e-5, atol=1e-6, msg=dispatch)


@pytest.mark.parametrize("kind", ["default", *KINDS])
def test_bf16_gradients_of_every_path_match_fp32_at_thousands_of_rows_per_expert(kind):
    """A bf16 sum of thousands of rows, one row at a time, keeps little of it (the grouped path's
    bias gradients did: 0.56 to 0.75 relative error here); every path must sum in fp32 and cast once."""
    config = replace(CFG, d_model=64, d_ff=256, num_experts=4, k=1, **KINDS.get(kind, {}))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16384, 64, generator=g).bfloat16()  # about 4096 rows per expert
    grad_y = (torch.randn(16384, 64, generator=g) + 1).bfloat16()  # a mean, as real gradients have

    def gradients(layer, dispatch, x):
        layer.deepspeed_moe.dispatch = dispatch
        x = x.clone().requires_grad_()
        layer(x)[0].backward(grad_y.to(x.dtype))
        return {"x": x.grad, **{name: p.grad for name, p in layer.named_parameters() if p.grad is not None}}

    reference = gradients(SMoE(config).bfloat16().float(), "reference", x.float())  # the same weights, in fp32
    for dispatch in ("sorted", "grouped", "masked-dense"):
        got = gradients(SMoE(config).bfloat16(), dispatch, x)
        assert got.keys() == reference.keys()
        for name, want in reference.items():
            error = ((got[name].float() - want).norm() / want.norm()).item()
            assert error < 0.01, f"{dispatch}: {name}'s bf16 gradient is {error:.3f} off fp32"

@pytest.mark.parametrize("dispatch", ["reference", "sorted", "grouped", "masked-dense"])
@pytest.mark.parametrize("router", ROUTERS)
def test_combine_scale_multiplies_the_output_and_the_expert_gradients(router, dispatch):
    x, ids = batch(3)
    runs = {}
    for scale in (1.0, 16.0):
        layer = SMoE(replace(CFG, router=router, k=4, combine_scale=scale))  # random routers: the same draws
        runs[scale] = _run(layer, dispatch, x, ids)
    (y1, _, g1), (y16, _, g16) = runs[1.0], runs[16.0]
    torch.testing.assert_close(y16, 16 * y1, rtol=1e-5, atol=1e-5)
    # loss = sum(y^2): its gradient at y16 = 16 y1 is 16 times larger, and flows through 16 times the weights
    for name in g1:
        if ".experts." in name:
            torch.testing.assert_close(g16[name], 256 * g1[name], rtol=1e-4, atol=1e-4, msg=name)


def test_the_default_inverted_scale_at_k_equals_n_with_equal_weights_is_the_dense_mlp():
    torch.manual_seed(1)
    dense = MLP(16, 128, "relu", 0.0)
    layer = SMoE(replace(CFG, router="hash", k=16))
    assert layer.deepspeed_moe.combine_scale == 16.0  # None in the config: N
    layer.load_experts(modularize(dense, 16))
    x, ids = batch()
    torch.testing.assert_close(layer(x, ids)[0], dense(x), rtol=1e-5, atol=1e-6)


def test_masked_dense_dropout_matches_the_reference_in_expectation():
    layer = SMoE(replace(CFG, k=16, dropout=0.5, dispatch="masked-dense"))
    x, _ = batch(shape=(64, 32))
    layer.eval()
    clean = layer(x)[0]
    layer.train()
    torch.manual_seed(0)
    noisy = torch.stack([layer(x)[0] for _ in range(200)]).mean(0)
    assert (noisy - clean).abs().mean() < 0.1 * clean.abs().mean()
    assert not torch.equal(layer(x)[0], layer(x)[0])


def test_auto_dispatch_switches_to_masked_dense_near_k_equals_n():
    layer = SMoE(CFG)
    paths = {}
    for k in range(1, 17):
        layer.set_top_k(k)
        paths[k] = layer.deepspeed_moe.path()
    assert paths[1] == "sorted" and paths[16] == "masked-dense"
    assert list(paths.values()) == sorted(paths.values(), key=lambda p: p == "masked-dense")



def test_a_timed_grouped_that_the_dtype_cannot_run_falls_back_to_the_rule_and_only_an_explicit_one_refuses():
    """`auto` is timed in one dtype and read back from RUN/dispatch.json in another (trained in bf16 on
    an H100, evaluated in fp32; here the reverse on the CPU): 4 expert columns are 16 bytes in fp32 and
    8 in bf16, which grouped_mm does not take."""
    layer = SMoE(replace(CFG, d_ff=64))  # 16 experts of 4 columns
    set_auto_paths(layer, {1: "grouped"})
    x, _ = batch()
    assert layer.deepspeed_moe.path() == "grouped"
    fp32 = layer(x)[0]
    layer.to(torch.bfloat16)
    assert layer.deepspeed_moe.path() == "sorted"
    torch.testing.assert_close(layer(x.bfloat16())[0].float(), fp32, rtol=0.02, atol=0.02)
    layer.deepspeed_moe.dispatch = "grouped"
    with pytest.raises(ValueError, match=r"dispatch 'grouped' needs .* this is torch.bfloat16 on cpu: use "
                                         r"dispatch=sorted or dispatch=auto"):
        layer(x.bfloat16())

def test_output_scale_does_not_jump_when_k_goes_from_1_to_2():
    layer = SMoE(replace(CFG, d_model=64, d_ff=1024)).eval()
    x = torch.randn(4096, 64)
    norms = {}
    for k in (1, 2):
        layer.set_top_k(k)
        norms[k] = layer(x)[0].norm(dim=-1).mean().item()
    # top-1 weights are exactly 1 and top-2 weights sum to 1: the same scale. DeepSpeed's own k=1 gate
    # (unrenormalised softmax, ~1/16 here) would make this ratio about 8.
    assert 0.6 < norms[2] / norms[1] < 1.0


def test_changing_k_at_evaluation_changes_the_output():
    layer = SMoE(replace(CFG, k=1)).eval()
    x, _ = batch()
    outputs = []
    for k in (1, 2, 8, 16):
        layer.set_top_k(k)
        outputs.append(layer(x)[0])
    assert all(not torch.allclose(a, b) for a, b in zip(outputs, outputs[1:]))


def test_frozen_router_is_outside_the_optimizer_and_never_changes():
    model = SMoE(replace(CFG, k=2))
    groups = optimizer_param_groups(model, lr=0.1)
    in_optimizer = {id(p) for group in groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in model.router.parameters())
    assert any(group.get("moe") for group in groups)  # experts are in their own MoE group
    optimizer = torch.optim.SGD(groups, lr=0.1)
    router_before = {k: v.clone() for k, v in model.router.state_dict().items()}
    expert_before = model.local_experts[0].fc1.weight.clone()
    model.set_top_k(16)  # every expert gets gradient
    for step in range(3):
        x, _ = batch(step)
        model(x)[0].square().mean().backward()
        assert model.router.proj.weight.grad is None
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, model.router.state_dict()[k]) for k, v in router_before.items())
    assert not torch.equal(expert_before, model.local_experts[0].fc1.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_router_stays_fp32_when_the_model_is_cast(dtype):
    """Engines cast the module to bf16/fp16; the frozen router must keep routing as in fp32."""
    model = SMoE(replace(CFG, k=2))
    x, _ = batch(0)
    fp32_routes = model.router(x)
    weight = model.router.proj.weight.clone()
    model.to(dtype)
    assert model.router.proj.weight.dtype == torch.float32 and torch.equal(model.router.proj.weight, weight)
    assert model.local_experts[0].fc1.weight.dtype == dtype  # the experts are cast
    assert torch.equal(model.router(x.to(dtype).float()).expert_ids_TK,
                       model.router(x.to(dtype)).expert_ids_TK)
    assert torch.equal(model.router(x).expert_ids_TK, fp32_routes.expert_ids_TK)


def test_router_survives_save_and_load():
    model = SMoE(replace(CFG, seed=9))
    fresh = SMoE(replace(CFG, seed=1))
    assert not torch.equal(model.router.proj.weight, fresh.router.proj.weight)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(model.router.proj.weight, fresh.router.proj.weight)
    assert not fresh.router.proj.weight.requires_grad


def test_experts_differ_and_depend_only_on_the_seed():
    a, b = SMoE(CFG), SMoE(CFG)
    w = [e.fc1.weight for e in a.local_experts]
    assert not torch.equal(w[0], w[1])
    assert all(torch.equal(x.fc1.weight, y.fc1.weight) for x, y in zip(a.local_experts, b.local_experts))


@pytest.mark.parametrize("changes, message", [
    ({"combine_scale": 0.0}, r"combine_scale \(0.0\) must be positive: use 1 \(the paper's\) or num_experts \(16"),
    (dict(k=0), r"MoEConfig.k \(0\) must be between 1 and num_experts \(16\)"),
    (dict(k=17), r"MoEConfig.k \(17\) must be between 1 and num_experts \(16\)"),
    (dict(ep_size=3), r"num_experts \(16\) is not divisible by ep_size \(3\)"),
    (dict(d_ff=100), r"d_ff \(100\) is not divisible by num_experts \(16\)"),
    (dict(router="switch"), r"router 'switch' is unknown"),
    (dict(dispatch="fast"), r"dispatch 'fast' is unknown"),
    (dict(activation="swiglu"), r"MoEConfig.activation 'swiglu' is unknown: use one of relu, gelu, gelu_tanh, silu"),
    (dict(router="hash", vocab_size=None), r"vocab_size is needed by the hash router"),
])
def test_bad_config_names_the_field_and_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(CFG, **changes)


def test_every_router_runs_in_the_layer():
    x, ids = batch()
    for router in ROUTERS:
        y, aux, counts = SMoE(replace(CFG, router=router, k=2))(x, ids)
        assert y.shape == x.shape and counts.sum() == 2 * ids.numel()


def test_dense_baselines_share_the_layer_interface():
    x, _ = batch()
    for regularizer in ("dropout", "concrete", "dropblock"):
        ffn = DenseFFN(DenseConfig(16, 128, regularizer=regularizer, block_size=8))
        y, aux, counts = ffn(x)
        assert y.shape == x.shape and counts is None
        ffn.eval()
        torch.testing.assert_close(ffn(x)[0], ffn.mlp.fc2(ffn.mlp.act(ffn.mlp.fc1(x))))  # no dropout at eval


def test_concrete_dropout_learns_p_and_returns_its_regulariser():
    torch.manual_seed(0)
    ffn = DenseFFN(DenseConfig(16, 128, regularizer="concrete", dropout=0.2))
    drop = ffn.mlp.dropout
    assert isinstance(drop, ConcreteDropout) and drop.temperature == 0.1
    assert drop.p.item() == pytest.approx(0.2)
    y, aux, _ = ffn(torch.randn(8, 16))
    p = drop.p
    expected = 1e-6 * ffn.mlp.fc2.weight.square().sum() / (1 - p) + 1e-5 * 128 * (p * p.log() + (1 - p) * (1 - p).log())
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
    (y.sum() + aux).backward()
    assert drop.p_logit.grad is not None and drop.p_logit.grad != 0


def test_dropblock_drops_contiguous_blocks_at_about_the_rate():
    torch.manual_seed(0)
    block = DropBlock1d(p=0.2, block_size=8).train()
    h = torch.ones(512, 256)
    out = block(h)
    dropped = out == 0
    assert 0.13 < dropped.float().mean().item() < 0.27
    runs = [len(r) for row in dropped.int().tolist() for r in "".join(map(str, row)).split("0") if r]
    assert min(runs) >= 8  # no dropped run shorter than a block
    assert out[~dropped].mean().item() == pytest.approx(1 / (1 - dropped.float().mean().item()), rel=1e-4)


def test_dropblock_keeps_the_expectation_in_fp16_at_bert_size():
    # 8 x 128 tokens x 6144 units: far more kept units than fp16 can count (65504).
    torch.manual_seed(0)
    out = DropBlock1d(p=0.1, block_size=64).train()(torch.ones(8, 128, 6144, dtype=torch.float16))
    assert out.dtype == torch.float16
    assert out.float().mean().item() == pytest.approx(1.0, abs=0.01)


def test_bad_dense_config_is_a_clear_error():
    with pytest.raises(ValueError, match="regularizer 'gaussian' is unknown"):
        DenseConfig(16, 128, regularizer="gaussian")
    with pytest.raises(ValueError, match=r"block_size \(500\) must be between 1 and d_ff \(128\)"):
        DenseConfig(16, 128, regularizer="dropblock", block_size=500)


@pytest.mark.parametrize("kind", [dict(activation="relu"), dict(activation="gelu"), *KINDS.values()],
                         ids=["relu", "gelu", *KINDS])
def test_masked_dense_gradients_match_autograd_with_dropout(kind):
    # the router's weights as they are: the reference below combines with them
    layer = SMoE(replace(CFG, k=12, dropout=0.3, combine_scale=1.0, **kind))
    x, _ = batch()
    torch.manual_seed(7)
    y_fast, gx_fast, g_fast = _run(layer, "masked-dense", x, None)
    # the same computation through plain autograd, with the same dropout draws
    torch.manual_seed(7)
    layer.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    x_TD = xr.reshape(-1, 16)
    routes = layer.router(x_TD)
    gate = torch.zeros(x_TD.shape[0], 16).scatter(1, routes.expert_ids_TK, routes.weights_TK)
    y = 0
    for e, expert in enumerate(layer.local_experts):
        a = activate(expert.fc1(x_TD), expert.activation_name, expert.gated)
        keep = torch.rand_like(a) >= 0.3
        y = y + expert.fc2(a * keep / 0.7 * gate[:, e:e + 1])
        if expert.has_output_bias:
            y = y - (1 - gate[:, e:e + 1]) * expert.fc2.bias
    y.square().sum().backward()
    torch.testing.assert_close(y_fast, y.detach().view_as(y_fast))
    torch.testing.assert_close(gx_fast, xr.grad)
    for name, p in layer.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_fast[name], p.grad, rtol=1e-4, atol=1e-6)
