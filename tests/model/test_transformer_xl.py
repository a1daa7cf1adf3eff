import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from smoe.model.dense import DenseConfig, DenseFFN
from smoe.model.moe import MoEConfig, SMoE
from smoe.model.transformer_xl import (PositionalEmbedding, RelativeAttention, TransformerXL, TransformerXLConfig,
                                      _rel_shift, lm_loss)

CFG = TransformerXLConfig(n_layer=2, d_model=32, n_head=4, d_head=8, d_ff=64, tgt_len=8, mem_len=8)
MOE = MoEConfig(d_model=32, d_ff=64, num_experts=4, k=2, router="hash", vocab_size=256, dropout=0.0)


def dense_ffn(i):
    return DenseFFN(DenseConfig(CFG.d_model, CFG.d_ff, dropout=0.0))


def smoe_ffn(i):
    return SMoE(replace(MOE, seed=i))


FFNS = {"dense": dense_ffn, "smoe": smoe_ffn}


def build(ffn="dense", **overrides):
    torch.manual_seed(0)  # DenseFFN initialises from the global generator
    return TransformerXL(replace(CFG, **overrides), FFNS[ffn]).eval()


def ids(shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ffn", list(FFNS))
def test_shapes_and_memory_grow_to_mem_len_detached(ffn):
    model = build(ffn).train()
    mems = None
    for step, want_mem in enumerate([5, 8, 8]):
        out = model(ids((3, 5), seed=step), mems)
        mems = out.mems
        assert out.logits.shape == (3, 5, 256) and out.logits.dtype == torch.float32
        assert len(mems) == CFG.n_layer + 1
        assert all(m.shape == (3, want_mem, CFG.d_model) and not m.requires_grad for m in mems)
        assert out.aux_loss.shape == ()
        assert len(out.expert_counts) == CFG.n_layer
    if ffn == "dense":
        assert out.expert_counts == [None, None]
    else:
        assert all(c.sum() == 3 * 5 * MOE.k for c in out.expert_counts)


def test_memory_holds_the_last_mem_len_inputs_of_every_layer():
    model = build()
    a, b = ids((2, 6), seed=1), ids((2, 6), seed=2)
    mems = model(b, model(a).mems).mems
    embedded = model.word_emb(torch.cat([a, b], dim=1)) * CFG.d_model ** 0.5  # layer 0's input (eval: no dropout)
    torch.testing.assert_close(mems[0], embedded[:, -CFG.mem_len:])


def test_mem_len_zero_keeps_no_memory():
    model = build(mem_len=0)
    out = model(ids((2, 4)))
    assert all(m.shape == (2, 0, CFG.d_model) for m in out.mems)


def test_changing_a_byte_changes_only_later_logits():
    model = build()
    x = ids((2, 8))
    mems = model(ids((2, 8), seed=3)).mems
    for t in (0, 3, 7):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 256
        before, after = model(x, mems).logits, model(y, mems).logits
        torch.testing.assert_close(before[:, :t], after[:, :t])
        assert not torch.allclose(before[:, t], after[:, t])


def test_rel_shift_lines_scores_up_with_the_distance_to_each_key():
    B, H, T, M = 2, 3, 4, 5
    K = M + T
    x = torch.randn(B, H, T, K)  # column c scores distance K-1-c
    shifted = _rel_shift(x)
    for i in range(T):
        for j in range(M + i + 1):  # keys query i may see
            distance = M + i - j
            torch.testing.assert_close(shifted[:, :, i, j], x[:, :, i, K - 1 - distance])


def test_attention_is_the_papers_score_written_out_per_query_and_key():
    """(q_i + u) . k_j + (q_i + v) . W_r R(i - j) over [memory; segment], causal, then softmax."""
    torch.manual_seed(0)
    attn = RelativeAttention(CFG).eval()
    H, C, B, T, M = CFG.n_head, CFG.d_head, 2, 3, 4
    K = M + T
    u, v = torch.randn(H, C), torch.randn(H, C)
    x, mem = torch.randn(B, T, CFG.d_model), torch.randn(B, M, CFG.d_model)
    pos_emb = PositionalEmbedding(CFG.d_model)
    mask = torch.ones(T, K, dtype=torch.bool).triu(1 + M)
    got = attn(x, mem, pos_emb(torch.arange(K - 1, -1, -1.0)), u, v, mask)

    w_q, w_k, w_v = attn.qkv_net.weight.chunk(3)
    c = torch.cat([mem, x], dim=1)
    q, k, val = (x @ w_q.T).view(B, T, H, C), (c @ w_k.T).view(B, K, H, C), (c @ w_v.T).view(B, K, H, C)
    want = torch.zeros(B, T, H, C)
    for i in range(T):
        keys = range(M + i + 1)
        r = torch.stack([attn.r_net(pos_emb(torch.tensor([float(M + i - j)]))[0]).view(H, C) for j in keys])
        score = ((q[:, i, None] + u) * k[:, :M + i + 1]).sum(-1) + ((q[:, i, None] + v) * r).sum(-1)  # B, j, H
        prob = (score / math.sqrt(C)).softmax(dim=1)
        want[:, i] = (prob[..., None] * val[:, :M + i + 1]).sum(1)
    torch.testing.assert_close(got, attn.o_net(want.reshape(B, T, H * C)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ffn", list(FFNS))
def test_segments_with_memory_equal_one_long_segment(ffn):
    """Each layer's memory is its own earlier inputs, so with mem_len covering the past,
    recurrence over segments computes exactly what one long segment does."""
    model = build(ffn, mem_len=16)
    x = ids((2, 24))
    whole = model(x).logits
    mems = None
    for s in range(3):
        out = model(x[:, 8 * s:8 * (s + 1)], mems)
        mems = out.mems
        torch.testing.assert_close(out.logits, whole[:, 8 * s:8 * (s + 1)], rtol=1e-4, atol=1e-5)


def test_memory_changes_the_prediction():
    model = build()
    a, b = ids((2, 8), seed=1), ids((2, 8), seed=2)
    assert not torch.allclose(model(b, model(a).mems).logits, model(b).logits)


def test_clamp_len_only_matters_below_the_context():
    reference = build()
    x = ids((2, 16))
    logits = {}
    for clamp_len in (-1, 3, 15, 100):
        model = build(clamp_len=clamp_len)
        model.load_state_dict(reference.state_dict())
        logits[clamp_len] = model(x).logits
    torch.testing.assert_close(logits[15], logits[-1])  # 15 is the largest distance in 16 keys
    torch.testing.assert_close(logits[100], logits[-1])
    assert not torch.allclose(logits[3], logits[-1])


def test_same_length_limits_every_query_to_mem_len_keys():
    # 2 layers seeing 3 keys each: position t depends on inputs t-4 .. t only.
    x = ids((2, 8))
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % 256
    for same_length in (True, False):
        model = build(mem_len=3, same_length=same_length)
        changed = (model(x).logits - model(y).logits).abs().amax(dim=(0, 2)) > 1e-6
        assert changed[:5].all()
        assert changed[5:].any() != same_length


def test_same_seed_same_model_and_ffns_left_as_built():
    a, b = build("smoe"), build("smoe", seed=1)
    c = build("smoe")
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pc), name
        if ".ffn." in name:
            assert torch.equal(pa, pb), name  # experts come from their own seeds
        elif "bias" not in name or "r_" in name:
            assert not torch.equal(pa, pb), name
    expert = smoe_ffn(1).local_experts[0]
    torch.testing.assert_close(a.layers[1].ffn.local_experts[0].fc1.weight, expert.fc1.weight)
    ln = a.layers[0].ln_attn.weight
    assert 0.9 < ln.mean() < 1.1 and 0.005 < ln.std() < 0.05  # normal(1, init_std), not ones
    assert 0.01 < a.word_emb.weight.std() < 0.03


class RecordingFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, x, token_ids):
        self.seen = token_ids
        return torch.zeros_like(x), torch.tensor(0.25), torch.tensor([1, 2])


def test_ffn_gets_the_token_ids_and_its_outputs_are_collected():
    ffns = [RecordingFFN() for _ in range(CFG.n_layer)]
    model = TransformerXL(CFG, lambda i: ffns[i])
    x = ids((2, 5))
    out = model(x)
    assert all(torch.equal(f.seen, x) for f in ffns)
    assert out.aux_loss.item() == pytest.approx(0.25 * CFG.n_layer)
    assert [c.tolist() for c in out.expert_counts] == [[1, 2]] * CFG.n_layer


def test_hash_routing_follows_the_token_ids():
    model = build("smoe")
    x = torch.full((2, 6), 7)
    for counts in model(x).expert_counts:
        assert (counts > 0).sum() == MOE.k  # one token id -> the same k experts everywhere


def test_a_tiny_model_learns_a_repeated_string():
    torch.manual_seed(0)
    model = TransformerXL(replace(CFG, dropout=0.0), dense_ffn)
    text = torch.tensor(list(b"hello, world! " * 3))
    x, y = text[None, :-1].repeat(2, 1), text[None, 1:].repeat(2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = lm_loss(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(256)
    assert losses[-1] < 0.5


def test_lm_loss_is_mean_cross_entropy_in_nats():
    assert lm_loss(torch.zeros(2, 3, 256), torch.zeros(2, 3, dtype=torch.long)).item() == pytest.approx(math.log(256))


@pytest.mark.parametrize("field, value", [("d_model", 0), ("d_model", 33), ("n_layer", 0), ("tgt_len", 0),
                                          ("dropout", 1.0), ("dropatt", -0.1), ("mem_len", -1),
                                          ("init_std", 0.0), ("vocab_size", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TransformerXLConfig\.{field} "):
        replace(CFG, **{field: value})


def test_same_length_without_memory_is_refused():
    with pytest.raises(ValueError, match=r"TransformerXLConfig\.mem_len .*same_length"):
        replace(CFG, mem_len=0, same_length=True)


def test_wrong_number_of_memories_is_refused():
    model = build()
    with pytest.raises(ValueError, match="got 2 memories"):
        model(ids((1, 4)), model.init_mems(1)[:2])
