"""Upcycling decoder LMs (Llama, Mistral, Qwen2, Qwen3, GPT-2) into SMoE-Dropout models: exact at
k = N, slimmable below it, trainable, and the refusals. Tiny random-weight models built from configs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from smoe.model.bert import ROUTER_LOGIT_STD, load_dense_mlp
from smoe.model.decoder import ARCHITECTURES, UpcycledMLP, Upcycling, load_upcycled, save_upcycled, upcycle
from smoe.model.moe import SMoE, moe_layers_of, set_top_k, top_k_of
from smoe.routing import build_router

from runs import DECODER_HIDDEN, DECODER_INTERMEDIATE, DECODER_VOCAB, DECODERS, decoder_config

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = DECODER_VOCAB, DECODER_HIDDEN, DECODER_INTERMEDIATE, 3
CONFIGS = {architecture: (lambda a=architecture: decoder_config(a, LAYERS)) for architecture in DECODERS}


def dense_model(architecture: str) -> torch.nn.Module:
    """A tiny random model, its biases random too (transformers zeroes them): a bias lost or counted
    twice by the upcycling shows."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[architecture]()).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(std=0.1)
    return model


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("architecture", CONFIGS)
@pytest.mark.parametrize("combine_scale", [None, 1.0])
def test_exact_at_k_equal_n_and_slimmable_below(architecture, combine_scale):
    dense = dense_model(architecture)
    model = upcycle(dense, num_experts=4, combine_scale=combine_scale).eval()
    assert len(moe_layers_of(model)) == LAYERS and top_k_of(model) == 4
    ids = token_ids()
    with torch.no_grad():
        reference = dense(ids).logits
        assert relative_error(model(ids).logits, reference) < 1e-4
        set_top_k(model, 2)
        assert top_k_of(model) == 2
        assert relative_error(model(ids).logits, reference) > 1e-3  # half the experts: another model


def test_selected_layers_only_and_the_dense_model_untouched():
    dense = dense_model("llama")
    model = upcycle(dense, num_experts=4, top_k=1, moe_layers="every-2").eval()
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["LlamaMLP", "UpcycledMLP", "LlamaMLP"]
    assert not any(isinstance(module, UpcycledMLP) for module in dense.modules())
    assert top_k_of(model) == 1
    with torch.no_grad():
        set_top_k(model, 4)
        assert relative_error(model(token_ids()).logits, dense(token_ids()).logits) < 1e-4


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["smoe-dropout", "smoe-learned"])
def test_parameter_count_is_dense_plus_routers(architecture, method):
    """The random-frozen router is fp32 buffers (N x (d + 1): weight and zero bias), outside the
    parameters; the learned router's N x d weight is a parameter. GPT-2's output bias stays one per
    layer (UpcycledMLP's), its experts have none."""
    dense = dense_model(architecture)
    model = upcycle(dense, num_experts=4, method=method)
    parameters = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    buffers = lambda m: sum(b.numel() for b in m.buffers())  # noqa: E731
    frozen = method == "smoe-dropout"
    assert parameters(model) == parameters(dense) + (0 if frozen else LAYERS * 4 * HIDDEN)
    assert buffers(model) == buffers(dense) + (LAYERS * 4 * (HIDDEN + 1) if frozen else 0)


def test_gpt2s_output_bias_is_the_layers_once_its_experts_have_fc1s_only_and_it_is_saved(tmp_path):
    dense = dense_model("gpt2")
    model = upcycle(dense, num_experts=4, top_k=2).eval()
    for dense_layer, layer in zip(dense.transformer.h, model.transformer.h):
        assert torch.equal(layer.mlp.output_bias, dense_layer.mlp.c_proj.bias)
        assert all(e.has_bias and not e.has_output_bias for e in layer.mlp.moe.local_experts)
    assert all(layer.mlp.output_bias is None for layer in upcycle(dense_model("llama"), num_experts=4).model.layers)
    save_upcycled(model, Upcycling(4, top_k=2), tmp_path)
    loaded = load_upcycled(tmp_path)
    for layer, saved in zip(loaded.transformer.h, model.transformer.h):
        assert torch.equal(layer.mlp.output_bias, saved.mlp.output_bias)


@pytest.mark.parametrize("combine_scale", [None, 1.0])
def test_one_output_bias_after_the_mixture_is_the_per_expert_output_biases_at_every_k(combine_scale):
    """The router's weights sum to 1 over the chosen experts and the layer multiplies them by
    combine_scale: experts each with b / combine_scale (how GPT-2 was upcycled before) add b at every k."""
    dense = dense_model("gpt2")
    upcycled = upcycle(dense, num_experts=4, combine_scale=combine_scale).eval().transformer.h[1].mlp
    per_expert = SMoE(replace(upcycled.moe.config, output_bias=True))  # the same seed: router and neuron order
    load_dense_mlp(per_expert, ARCHITECTURES["gpt2"].read_mlp(dense.transformer.h[1].mlp, "gelu_tanh"), "random")
    x = torch.randn(2, 12, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for k in range(1, 5):
            upcycled.moe.set_top_k(k)
            per_expert.set_top_k(k)
            torch.testing.assert_close(upcycled(x), per_expert(x)[0], rtol=1e-5, atol=1e-6, msg=f"k={k}")


def test_the_flattened_router_keeps_the_seeded_choice_with_uniform_weights():
    """Shrinking the projection keeps each token's order of experts (the seeded random choice of the
    router smoe builds from that seed) and makes the weights equal to ~ROUTER_LOGIT_STD."""
    model = upcycle(dense_model("qwen3"), num_experts=4, top_k=2, seed=5)
    layer = moe_layers_of(model)[1]
    seeded = build_router("random-frozen", d_model=HIDDEN, num_experts=4, k=2, seed=5 + 101 * 1)
    x_TD = torch.randn(64, HIDDEN)
    ours, reference = layer.router(x_TD), seeded(x_TD)
    same = (ours.expert_ids_TK.sort(-1).values == reference.expert_ids_TK.sort(-1).values).all(-1)
    assert same.float().mean() > 0.9  # all but ~3%: logits within ~6e-8 tie in fp32 probabilities (top_k_softmax)
    assert (reference.weights_TK - 0.5).abs().max() > 1e-2  # the unflattened router is far from uniform
    assert (ours.weights_TK - 0.5).abs().max() < 10 * ROUTER_LOGIT_STD


@pytest.mark.parametrize("architecture", ["mistral", "gpt2"])
def test_backward_gives_finite_expert_gradients(architecture):
    model = upcycle(dense_model(architecture), num_experts=4, top_k=2).train()
    ids = token_ids()
    model(ids, labels=ids).loss.backward()
    for layer in moe_layers_of(model):
        for expert in layer.local_experts:
            grads = [p.grad for p in expert.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for expert in layer.local_experts for g in
                   (p.grad for p in expert.parameters()))


def test_refuses_an_unknown_architecture():
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE,
                                                     num_hidden_layers=1, num_attention_heads=4,
                                                     word_embed_proj_dim=HIDDEN))
    with pytest.raises(ValueError, match=r"'opt'.*llama, mistral, qwen2, qwen3, gpt2"):
        upcycle(opt, num_experts=4)


def test_refuses_num_experts_not_dividing_the_intermediate_size():
    with pytest.raises(ValueError, match=r"intermediate size \(64\) is not divisible by num_experts \(6\)"):
        upcycle(dense_model("llama"), num_experts=6)


@pytest.mark.parametrize("architecture", CONFIGS)
def test_an_upcycled_directory_loads_back_the_same_model(architecture, tmp_path):
    model = upcycle(dense_model(architecture), num_experts=4, top_k=2, seed=3).eval()
    save_upcycled(model, Upcycling(4, top_k=2, seed=3), tmp_path)
    loaded = load_upcycled(tmp_path).eval()
    assert Upcycling.read(tmp_path) == Upcycling(4, combine_scale=4.0, seed=3, top_k=2)
    assert top_k_of(loaded) == 2
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, model(token_ids()).logits)


def test_each_expert_parallel_rank_loads_its_own_experts(tmp_path):
    model = upcycle(dense_model("llama"), num_experts=4)
    save_upcycled(model, Upcycling(4), tmp_path)
    whole = moe_layers_of(model)
    for ep_rank in (0, 1):
        share = moe_layers_of(load_upcycled(tmp_path, ep_size=2, ep_rank=ep_rank))
        for layer, full in zip(share, whole):
            for local, expert in enumerate(layer.local_experts):
                assert torch.equal(expert.fc1.weight, full.local_experts[2 * ep_rank + local].fc1.weight)
            assert torch.equal(layer.router.proj.weight, full.router.proj.weight)


def test_a_bad_upcycled_directory_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json.*smoe upcycle"):
        load_upcycled(tmp_path)
    save_upcycled(upcycle(dense_model("llama"), num_experts=4), Upcycling(4), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot be read.*damaged"):
        load_upcycled(tmp_path)
    save_upcycled(upcycle(dense_model("llama"), num_experts=4), Upcycling(4), tmp_path)
    Upcycling(2).save(tmp_path)  # the weights of 4 experts, the record of 2
    with pytest.raises(ValueError, match="does not belong"):
        load_upcycled(tmp_path)


def test_each_moe_layer_takes_its_own_k():
    """A per-layer slice: equal entries are uniform k; mixed ones set each layer; bad ones are refused."""
    from smoe.model.moe import top_ks_of

    model = upcycle(dense_model("llama"), num_experts=4).eval()
    with torch.no_grad():
        set_top_k(model, 2)
        uniform = model(token_ids()).logits
        set_top_k(model, [2, 2, 2])
        assert torch.equal(model(token_ids()).logits, uniform)
        set_top_k(model, [1, 4, 2])
        assert top_ks_of(model) == [1, 4, 2]
        model(token_ids())
        counts = [layer.deepspeed_moe.exp_counts.sum().item() for layer in moe_layers_of(model)]
        assert counts == [24 * 1, 24 * 4, 24 * 2]  # 2 x 12 tokens, each at its layer's k
    with pytest.raises(ValueError, match="2 per-layer ks for a model with 3 MoE layers"):
        set_top_k(model, [1, 2])
    with pytest.raises(ValueError, match=r"top-k \(5\) must be between 1 and the number of experts \(4\)"):
        set_top_k(model, [1, 5, 2])
