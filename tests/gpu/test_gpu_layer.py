"""The SMoE layer on CUDA in bf16 and fp16: every dispatch path against the reference loop
(tests/model/test_moe.py's CPU test, at training precision), the host syncs of one training step,
and the routers' precision and device after the module is cast and moved."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from smoe.model import MoEConfig, SMoE
from smoe.model.dispatch import groupable

D, D_FF, N, VOCAB = 64, 1024, 16, 40
TOKENS = (4, 128)
# Unit roundoff: bf16 keeps 8 significant bits, fp16 11.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Every path rounds at other points than the reference loop (the gate weight multiplies the hidden
# units or the output, k partial sums are added in another order, and CUDA's index_add_ adds them
# with atomics): each output element carries a few roundings of the partial sums, ~2u RMS
# relative. A path is held to 8u in norm (bf16 3.1e-2, fp16 3.9e-3) and to 16u per element,
# relative to the element plus the tensor's RMS (an element that cancels to ~0 keeps the rounding
# of its terms). A wrong route, weight or scale is off by 1/N (6 %) or more.
NORM_UNITS, ELEMENT_UNITS = 8, 16
# The learned router's gradient goes through the softmax over the selected logits, a difference of
# nearly equal terms: twice as loose.
ROUTER_GRAD_UNITS = 16


def make_layer(router: str, k: int, dtype: torch.dtype, **changes) -> SMoE:
    config = MoEConfig(d_model=D, d_ff=D_FF, num_experts=N, k=k, router=router, dropout=0.0, vocab_size=VOCAB, seed=5,
                       **changes)
    return SMoE(config).to("cuda", dtype)


def batch(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*TOKENS, D, generator=generator)
    ids = torch.randint(0, VOCAB, TOKENS, generator=generator)
    grad_y = torch.randn(*TOKENS, D, generator=generator)
    return x.to("cuda", dtype), ids.cuda(), grad_y.cuda()


def run_path(layer: SMoE, dispatch: str, x, ids, grad_y) -> SimpleNamespace:
    """One forward (routes recorded) and backward of ``sum(y * grad_y) + aux`` on ``dispatch``."""
    layer.deepspeed_moe.dispatch = dispatch
    layer.zero_grad(set_to_none=True)
    seen = []
    hook = layer.router.register_forward_hook(lambda module, args, routes: seen.append(routes))
    try:
        x = x.clone().requires_grad_()
        y, aux, counts = layer(x, ids)
        ((y.float() * grad_y).sum() + aux).backward()
    finally:
        hook.remove()
    grads = {name: p.grad.float() for name, p in layer.named_parameters() if p.grad is not None}
    return SimpleNamespace(y=y.detach().float(), grad_x=x.grad.float(), grads=grads, routes=seen[0], counts=counts,
                           path=layer.deepspeed_moe.path())


def assert_close(actual, expected, dtype, what: str, units: int = NORM_UNITS) -> None:
    u = UNIT_ROUNDOFF[dtype]
    reference = expected.norm()
    error = (actual - expected).norm()
    assert error <= units * u * reference + 1e-6, \
        f"{what}: relative error {(error / reference.clamp_min(1e-30)).item():.2e} > {units * u:.1e}"
    rms = expected.square().mean().sqrt()
    torch.testing.assert_close(actual, expected, rtol=ELEMENT_UNITS * u, atol=ELEMENT_UNITS * u * rms.item() + 1e-6,
                               msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("router", ["random-frozen", "learned", "hash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_dispatch_path_matches_the_reference_loop(dtype, router, k, smoe_gpu):
    if dtype is torch.bfloat16 and not smoe_gpu.bf16:
        pytest.skip(smoe_gpu.no_bf16)
    layer = make_layer(router, k, dtype)
    x, ids, grad_y = batch(dtype, seed=k)
    reference = run_path(layer, "reference", x, ids, grad_y)
    # The router computes in fp32 whatever the input dtype: the routes of the fp32 input.
    fp32_routes = layer.router(x.float().reshape(-1, D), ids.reshape(-1))
    assert reference.routes.weights_TK.dtype == torch.float32
    assert torch.equal(reference.routes.expert_ids_TK, fp32_routes.expert_ids_TK)
    assert torch.equal(reference.routes.weights_TK, fp32_routes.weights_TK)
    if router == "random-frozen":
        assert layer.router.proj.weight.dtype == torch.float32

    for dispatch in ("sorted", "grouped", "masked-dense", "auto"):
        if dispatch == "grouped" and not groupable(layer.local_experts, dtype, "cuda"):
            continue  # grouped only where grouped_mm is one kernel: bf16 at compute capability 9.x/10.x
        fast = run_path(layer, dispatch, x, ids, grad_y)
        what = f"{dispatch} ({fast.path})"
        assert torch.equal(fast.routes.expert_ids_TK, reference.routes.expert_ids_TK), f"{what}: other routes"
        assert torch.equal(fast.routes.weights_TK, reference.routes.weights_TK), f"{what}: other gate weights"
        assert torch.equal(fast.counts, reference.counts), f"{what}: other expert counts"
        assert_close(fast.y, reference.y, dtype, f"{what}: output")
        assert_close(fast.grad_x, reference.grad_x, dtype, f"{what}: input gradient")
        assert fast.grads.keys() == reference.grads.keys(), what
        for name, grad in reference.grads.items():
            units = ROUTER_GRAD_UNITS if "gate" in name else NORM_UNITS
            error, size = (fast.grads[name] - grad).norm(), grad.norm()
            assert error <= units * UNIT_ROUNDOFF[dtype] * size + 1e-6, \
                f"{what}: gradient of {name}: relative error {(error / size.clamp_min(1e-30)).item():.2e}"


# Host syncs in one forward + backward: the sorted path reads the split sizes back once
# (`counts.tolist()` in model/dispatch.py sorted_combine); grouped and masked-dense never wait
# for the GPU. The reference loop's nonzero() syncs once per expert: not bounded, not tested.
SYNC_BOUND = {"sorted": 1, "grouped": 0, "masked-dense": 0}


def count_syncs(step) -> list[warnings.WarningMessage]:
    """The synchronizing CUDA calls ``step()`` makes, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [w for w in caught if "synchronizing CUDA operation" in str(w.message)]


@pytest.mark.parametrize("k", [8, 16])
@pytest.mark.parametrize("dispatch", ["sorted", "grouped", "masked-dense", "auto"])
def test_host_syncs_of_one_training_step(dispatch, k, low_precision):
    """The paper's Transformer-XL layer (d 256, d_ff 8192 as 16 experts, dropout 0.1) on 4096 tokens."""
    layer = SMoE(MoEConfig(d_model=256, d_ff=8192, num_experts=16, k=k, router="random-frozen",
                           dispatch=dispatch)).to("cuda", low_precision).train()
    if dispatch == "grouped" and not groupable(layer.local_experts, low_precision, "cuda"):
        pytest.skip("grouped runs on CUDA only in bf16 at compute capability 9.x or 10.x (groupable)")
    x = torch.randn(4096, 256, device="cuda", dtype=low_precision, requires_grad=True)

    def step():
        y, aux, _ = layer(x)
        (y.float().square().mean() + aux).backward()

    step()  # warm-up: cuBLAS handles, the caching allocator, lazy initialisation
    syncs = count_syncs(step)
    path = layer.deepspeed_moe.path()
    assert len(syncs) <= SYNC_BOUND[path], f"{path} at k={k}: {len(syncs)} host syncs:\n" + \
        "\n".join(f"  {w.filename}:{w.lineno}: {w.message}" for w in syncs)


def test_routers_keep_fp32_weights_and_draw_on_the_gpu(low_precision):
    frozen = SMoE(MoEConfig(d_model=256, d_ff=1024, num_experts=16, k=8, router="random-frozen"))
    weight = frozen.router.proj.weight.clone()
    frozen.to("cuda", low_precision)
    proj = frozen.router.proj
    assert (proj.weight.dtype, proj.bias.dtype) == (torch.float32, torch.float32)
    assert proj.weight.device.type == proj.bias.device.type == "cuda"
    assert torch.equal(proj.weight.cpu(), weight)  # moved, never rounded
    assert frozen.local_experts[0].fc1.weight.dtype == low_precision  # the experts are cast

    for router in ("random", "thor"):
        layer = SMoE(MoEConfig(d_model=256, d_ff=1024, num_experts=16, k=4, router=router)).to("cuda", low_precision)
        assert layer.router.generator.device.type == "cuda", router
        x = torch.randn(64, 256, device="cuda", dtype=low_precision)
        y, _, counts = layer(x)
        assert y.device.type == "cuda" and y.dtype == low_precision
        assert counts.device.type == "cuda" and counts.sum().item() == 64 * 4
        first = layer.router(x.float()).expert_ids_TK
        assert first.device.type == "cuda"
        assert not torch.equal(first, layer.router(x.float()).expert_ids_TK)  # fresh draws every forward
