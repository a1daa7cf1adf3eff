"""Two real processes joined by gloo: ep_size=2 against ep_size=1, and the DeepSpeed engine."""

from dataclasses import replace

import pytest
import torch
from deepspeed.moe.sharded_moe import _AllToAll

from smoe.launcher.runtime import deepspeed_config
from smoe.launcher.runtime.distributed import spawn
from smoe.model import MoEConfig, SMoE, init_expert_parallel, optimizer_param_groups
from smoe.routing import ROUTERS, Routes, assignment_counts

CFG = MoEConfig(d_model=16, d_ff=128, num_experts=16, k=1, dropout=0.0, vocab_size=40, seed=4)
TOKENS = (30, 30)  # per rank


def _forward_backward(layer, x, ids):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, aux, counts = layer(x, ids)
    (y.square().sum() + aux).backward()
    return y.detach(), x.grad, counts


def _compare_ep2_with_ep1(rank, world_size, router, combine_scale=1.0, tokens=TOKENS, experts=None):
    import deepspeed.comm as dist

    ep_rank = init_expert_parallel(2)
    assert ep_rank == rank
    config = replace(CFG, router=router, combine_scale=combine_scale, **(experts or {}))
    single = SMoE(config, rank=rank)  # every expert on this rank
    sharded = SMoE(replace(config, ep_size=2), ep_rank=ep_rank, rank=rank)
    sharded.set_deepspeed_parallelism()
    local = slice(ep_rank * 8, ep_rank * 8 + 8)

    for name, param in sharded.router.named_parameters():  # the router is the same on every rank
        copies = [torch.empty_like(param) for _ in range(world_size)]
        dist.all_gather(copies, param.detach().contiguous())
        assert all(torch.equal(c, copies[0]) for c in copies), name

    g = torch.Generator().manual_seed(100 + rank)  # each rank has its own tokens
    x, ids = torch.randn(tokens[rank], 16, generator=g), torch.randint(0, 40, (tokens[rank],), generator=g)
    for k in (1, 8, 16):
        single.set_top_k(k)
        sharded.set_top_k(k)
        y1, gx1, counts1 = _forward_backward(single, x, ids)
        y2, gx2, counts2 = _forward_backward(sharded, x, ids)
        torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6, msg=f"{router} k={k}: outputs")
        torch.testing.assert_close(gx2, gx1, rtol=1e-5, atol=1e-6, msg=f"{router} k={k}: input grads")
        # A sharded expert sees the tokens of both ranks: its gradient is the sum of the
        # single-rank gradients of the same expert over ranks (what data parallelism all-reduces).
        for expert in single.local_experts:
            for p in expert.parameters():
                dist.all_reduce(p.grad)
        for e1, e2 in zip(single.local_experts[local], sharded.local_experts):
            for (n, p1), p2 in zip(e1.named_parameters(), e2.parameters()):
                torch.testing.assert_close(p2, p1)
                torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=f"{router} k={k}: {n} grad")
        for p1, p2 in zip(single.router.parameters(), sharded.router.parameters()):
            if p1.requires_grad:
                torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(counts1, counts2)
        if k == 16:  # every token reaches every expert, on both ranks
            assert counts2.tolist() == [tokens[rank]] * 16

    if router not in ("random", "thor"):
        sharded.eval()
        outputs = []
        for k in (1, 8, 16):  # every rank takes part in the exchange, with or without tokens
            sharded.set_top_k(k)
            outputs.append(sharded(x, ids)[0])
        if tokens[rank]:
            assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


@pytest.mark.parametrize("router", ROUTERS)
def test_ep2_gives_the_outputs_and_gradients_of_ep1(router):
    spawn(_compare_ep2_with_ep1, 2, router)


def test_ep2_gives_the_outputs_and_gradients_of_ep1_for_gated_bias_free_experts():
    spawn(_compare_ep2_with_ep1, 2, "learned", 16.0, TOKENS, dict(activation="silu", gated=True, bias=False))


def test_ep2_gives_the_outputs_and_gradients_of_ep1_for_experts_without_an_output_bias():
    """An upcycled GPT-2's experts: fc1's bias, none on fc2."""
    spawn(_compare_ep2_with_ep1, 2, "random-frozen", 4.0, TOKENS, dict(activation="gelu_tanh", output_bias=False))


def test_ep2_honours_the_combine_scale():
    spawn(_compare_ep2_with_ep1, 2, "random-frozen", 16.0)


@pytest.mark.parametrize("router, tokens", [("random-frozen", (37, 5)), ("learned", (0, 37))])
def test_ep2_matches_ep1_with_uneven_tokens_per_rank(router, tokens):
    """Evaluation gives ranks uneven blocks of streams, and a rank beyond the streams none
    (docs/training.md): the exchange pads every block to one agreed capacity, so no rank waits
    on a block of another size, and a rank with no token still takes part."""
    spawn(_compare_ep2_with_ep1, 2, router, 1.0, tokens)


EXCHANGE_TOKENS = (30, 21)  # per rank


def _fixed_routes(tokens: int, k: int, seed: int) -> Routes:
    """A fixed router: k distinct experts per token and random weights, drawn from ``seed``, so
    that every rank can rebuild every rank's routes."""
    g = torch.Generator().manual_seed(seed)
    expert_ids_TK = torch.rand(tokens, 16, generator=g).argsort(1)[:, :k]
    weights_TK = torch.rand(tokens, k, generator=g).softmax(1)
    return Routes(expert_ids_TK, weights_TK, torch.zeros(()), assignment_counts(expert_ids_TK, 16))


def _count_exchanged_rows(rank, world_size):
    import smoe.model.expert_parallel as exchange

    sent = []  # what this rank hands the exchange's all-to-alls: tokens out, then results back

    class RecordingAllToAll:
        @staticmethod
        def apply(group, send):
            sent.append(send.detach().clone())
            return _AllToAll.apply(group, send)

    exchange._AllToAll = RecordingAllToAll  # this process only
    ep_rank = init_expert_parallel(2)
    layer = SMoE(replace(CFG, ep_size=2), ep_rank=ep_rank)
    layer.set_deepspeed_parallelism()
    x_TD = torch.randn(EXCHANGE_TOKENS[rank], 16, generator=torch.Generator().manual_seed(rank))
    for k in (1, 2, 16):
        routes_of = [_fixed_routes(tokens, k, seed=10 * k + src) for src, tokens in enumerate(EXCHANGE_TOKENS)]
        # tokens_to[src][dst]: tokens of rank src with at least one of their k experts on rank dst
        # (experts 0-7 on rank 0, 8-15 on rank 1)
        tokens_to = [[int((routes.expert_ids_TK // 8 == dst).any(1).sum()) for dst in range(2)] for routes in routes_of]
        sent.clear()
        y_TD = exchange.expert_parallel_combine(layer.local_experts, x_TD, routes_of[rank], 16,
                                                layer.deepspeed_moe.ep_group, ep_rank)
        assert y_TD.shape == x_TD.shape and len(sent) == 2
        # Each all-to-all sends R blocks of one capacity C, the most tokens any rank sends any rank;
        # a block's real rows carry data, its padding is zeros.
        capacity = max(max(row) for row in tokens_to)
        for buffer in sent:
            assert buffer.shape[0] == 2 * capacity, f"k={k}: {buffer.shape[0]} rows for capacity {capacity}"
        rows_out, rows_back = ([int(block.ne(0).any(1).sum()) for block in buffer.split(capacity)] for buffer in sent)
        other = 1 - rank
        assert rows_out == tokens_to[rank], f"k={k}: rows sent {rows_out}, tokens {tokens_to[rank]}"
        assert rows_back == [tokens_to[src][rank] for src in range(2)], f"k={k}: rows returned {rows_back}"
        # min(k, R) rows per token at most; each token crosses to the other rank once, whatever
        # number of its experts live there (k=16: once, not 8 times).
        assert sum(rows_out) <= min(k, 2) * EXCHANGE_TOKENS[rank]
        if k == 16:
            assert rows_out[other] == EXCHANGE_TOKENS[rank] and rows_back[other] == EXCHANGE_TOKENS[other]


def test_the_exchange_sends_each_token_once_to_each_rank_holding_its_experts():
    """docs/design.md: min(k, R) rows per token each way instead of k, counted in the buffers the
    all-to-all sends (real rows apart from the padding, to each rank, both directions), k = 1, 2, N."""
    spawn(_count_exchanged_rows, 2)


CPU_CONFIG = {**deepspeed_config.load("cpu")[0], "train_micro_batch_size_per_gpu": 4}


class _TinyLM(torch.nn.Module):
    def __init__(self, ep_rank):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 16)
        self.moe = SMoE(replace(CFG, ep_size=2, k=2), ep_rank=ep_rank)
        self.head = torch.nn.Linear(16, 40)

    def forward(self, ids):
        y, aux, _ = self.moe(self.embed(ids), ids)
        return torch.nn.functional.cross_entropy(self.head(y).flatten(0, 1), ids.roll(1, dims=1).flatten()) + aux


def _engine_keeps_the_router_frozen(rank, world_size, checkpoint_dir):
    import deepspeed

    torch.manual_seed(0)  # the same embeddings and head on both ranks, run after run
    ep_rank = init_expert_parallel(2)
    model = _TinyLM(ep_rank)
    optimizer = torch.optim.Adam(optimizer_param_groups(model), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=CPU_CONFIG)
    router = model.moe.router.proj
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(router.weight) not in in_optimizer and id(router.bias) not in in_optimizer
    router_before = router.weight.detach().clone()
    experts_before = [expert.fc1.weight.detach().clone() for expert in model.moe.local_experts]
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        loss = engine(torch.randint(0, 40, (4, 12), generator=g))
        engine.backward(loss)
        engine.step()
    assert router.weight.grad is None
    assert torch.equal(router.weight, router_before)
    # an expert that got no token in 3 steps has no gradient; one that did has moved
    assert any(not torch.equal(expert.fc1.weight, before) for expert, before in zip(model.moe.local_experts,
                                                                                   experts_before))
    engine.save_checkpoint(checkpoint_dir, tag="step3")

    fresh = _TinyLM(ep_rank)
    with torch.no_grad():
        fresh.moe.router.proj.weight.zero_()
    fresh_engine, *_ = deepspeed.initialize(model=fresh, optimizer=torch.optim.Adam(optimizer_param_groups(fresh)),
                                            config=CPU_CONFIG)
    fresh_engine.load_checkpoint(checkpoint_dir, tag="step3")
    assert torch.equal(fresh.moe.router.proj.weight, router_before)
    for mine, loaded in zip(model.moe.local_experts, fresh.moe.local_experts):
        assert torch.equal(mine.fc2.weight, loaded.fc2.weight)


def test_deepspeed_engine_trains_experts_and_never_the_router(tmp_path):
    spawn(_engine_keeps_the_router_frozen, 2, str(tmp_path))
    assert len(list(tmp_path.glob("step3/*expert_*"))) == 16  # one file per expert, from both ranks
