import pytest
import torch

from smoe.routing import ROUTERS, RouterOptions, assignment_counts, balance_loss, build_router

D, N, VOCAB = 24, 16, 100


def make(name, k=4, rank=0, **options):
    return build_router(name, RouterOptions(**options), d_model=D, num_experts=N, k=k, seed=11, vocab_size=VOCAB,
                        rank=rank)


def tokens(t=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, D, generator=g), torch.randint(0, VOCAB, (t,), generator=g)


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_every_router_picks_k_distinct_experts_with_weights_summing_to_one(name, k):
    router = make(name, k)
    x, ids = tokens()
    routes = router(x, ids)
    assert routes.expert_ids_TK.shape == (64, k)
    assert all(len(set(row.tolist())) == k for row in routes.expert_ids_TK)
    assert routes.expert_ids_TK.min() >= 0 and routes.expert_ids_TK.max() < N
    assert torch.allclose(routes.weights_TK.sum(-1), torch.ones(64))
    assert routes.weights_TK.dtype == torch.float32


@pytest.mark.parametrize("name", ["random-frozen", "learned", "hash"])
def test_evaluation_routing_is_deterministic(name):
    router = make(name).eval()
    x, ids = tokens()
    first, second = router(x, ids), router(x, ids)
    assert torch.equal(first.expert_ids_TK, second.expert_ids_TK)
    assert torch.equal(first.weights_TK, second.weights_TK)


@pytest.mark.parametrize("name", ["random", "thor"])
def test_random_routers_draw_anew_each_forward_but_reproducibly(name):
    x, ids = tokens()
    router = make(name)
    first, second = router(x, ids).expert_ids_TK, router(x, ids).expert_ids_TK
    assert not torch.equal(first, second)
    again = make(name)
    assert torch.equal(again(x, ids).expert_ids_TK, first)
    assert not torch.equal(make(name, rank=1)(x, ids).expert_ids_TK, first)


def test_random_frozen_router_is_frozen_seeded_and_initialised_as_the_paper():
    router = make("random-frozen")
    assert not any(p.requires_grad for p in router.parameters())
    assert torch.equal(router.proj.bias, torch.zeros(N))
    assert abs(router.proj.weight.std().item() - 0.02) < 0.003
    assert torch.equal(make("random-frozen").proj.weight, router.proj.weight)  # same seed, same router
    other = build_router("random-frozen", d_model=D, num_experts=N, k=4, seed=12)
    assert not torch.equal(other.proj.weight, router.proj.weight)
    # in the state dict, so checkpoints carry it
    assert set(router.state_dict()) == {"proj.weight", "proj.bias"}


def test_random_frozen_weights_are_softmax_over_the_top_k_logits():
    router = make("random-frozen", k=3)
    x, _ = tokens()
    logits = x @ router.proj.weight.T + router.proj.bias
    routes = router(x)
    top, idx = logits.topk(3, dim=-1)
    assert torch.equal(routes.expert_ids_TK, idx)
    assert torch.allclose(routes.weights_TK, top.softmax(-1))
    router.set_top_k(1)
    assert torch.equal(router(x).weights_TK, torch.ones(64, 1))  # k = 1 is weight 1, not a raw probability


def test_top_k_changes_without_rebuilding_and_grows_the_expert_set():
    router = make("random-frozen", k=1)
    x, _ = tokens()
    before = router(x).expert_ids_TK
    router.set_top_k(4)
    after = router(x).expert_ids_TK
    assert after.shape[1] == 4
    assert torch.equal(after[:, :1], before)  # the top expert stays, more are added


@pytest.mark.parametrize("k", [0, 17])
def test_k_out_of_range_is_a_clear_error(k):
    router = make("random-frozen")
    with pytest.raises(ValueError, match=rf"top-k \({k}\) must be between 1 and the number of experts \(16\)"):
        router.set_top_k(k)


def test_unknown_router_and_missing_hash_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="router 'switch' is unknown"):
        build_router("switch", d_model=D, num_experts=N, k=1, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        build_router("hash", d_model=D, num_experts=N, k=1, seed=0)
    with pytest.raises(ValueError, match="needs the input token ids"):
        make("hash")(tokens()[0])


def test_hash_router_maps_the_same_token_id_to_the_same_experts():
    router = make("hash", k=2)
    x, _ = tokens(6)
    ids = torch.tensor([5, 9, 5, 9, 5, 1])
    routes = router(x, ids)
    assert torch.equal(routes.expert_ids_TK[0], routes.expert_ids_TK[2])
    assert torch.equal(routes.expert_ids_TK[1], routes.expert_ids_TK[3])
    assert torch.equal(routes.weights_TK, torch.full((6, 2), 0.5))


def test_balance_loss_on_a_hand_computed_case():
    # 4 tokens, 2 experts, k = 1: tokens 0-2 go to expert 0, token 3 to expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    ids = torch.tensor([[0], [0], [0], [1]])
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert balance_loss(probs, assignment_counts(ids, 2)).item() == pytest.approx(1.15)
    # perfectly balanced routing with uniform probabilities gives exactly 1
    balanced = assignment_counts(torch.tensor([[0], [1], [0], [1]]), 2)
    assert balance_loss(torch.full((4, 2), 0.5), balanced).item() == pytest.approx(1.0)


def test_learned_router_aux_loss_uses_its_coefficients_and_trains():
    router = make("learned", k=2, balance_coef=0.5, z_loss_coef=0.1)
    x, _ = tokens()
    routes = router(x)
    logits = x @ router.proj.weight.T
    expected = 0.5 * balance_loss(logits.softmax(-1), routes.counts_N) + 0.1 * logits.logsumexp(-1).square().mean()
    assert routes.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    routes.aux_loss.backward()
    assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0
