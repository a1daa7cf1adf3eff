"""Moving routed tokens to their experts and back: y = sum_k w_TK * E_{ids_TK}(x_T).

Four ways to compute the same thing:

* :func:`reference_combine`: a loop over experts with boolean masks. Slow and obvious;
  kept so that tests can hold the fast paths to it.
* :func:`sorted_combine`: sort the T*K (token, expert) assignments by expert and run
  every expert once on its contiguous rows. Work is exactly T*K rows, so the cost
  scales with k, with no capacity padding and no dropped token.
* :func:`masked_dense_combine`: near k = N nearly every expert sees every token, so
  run every expert on every token and multiply its hidden units by its gate weight
  (zero where it is not selected): no gather, no scatter, no (T*K, D) copies, and the
  memory of the dense MLP. Costs what the dense MLP costs.
* :func:`expert_parallel_combine`: the sorted path across ranks. Assignments are
  padded to one capacity C (the largest per-expert load on any rank, so dropless and
  the same on every rank), exchanged with DeepSpeed's all-to-all, and each local
  expert runs on its real rows only, never on the padding.

Shapes: T tokens, D model width, K top-k, N experts, L local experts, R expert-parallel
ranks, A = T*K assignments, C capacity, H hidden units of one expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import _AllToAll

from smoe.routing import Routes


def reference_combine(experts, x_TD: torch.Tensor, routes: Routes) -> torch.Tensor:
    y_TD = torch.zeros_like(x_TD)
    for e, expert in enumerate(experts):
        token_idx, slot_idx = (routes.expert_ids_TK == e).nonzero(as_tuple=True)
        weight = routes.weights_TK[token_idx, slot_idx].to(x_TD.dtype)[:, None]
        y_TD = y_TD.index_add(0, token_idx, weight * expert(x_TD[token_idx]))
    return y_TD


@dataclass
class Assignments:
    """The T*K (token, expert) pairs, sorted by expert."""

    token_A: torch.Tensor  # source token of each assignment
    weight_A: torch.Tensor  # its gate weight
    counts_N: torch.Tensor  # assignments per expert

    @classmethod
    def sort(cls, routes: Routes) -> "Assignments":
        top_k = routes.expert_ids_TK.shape[1]
        order_A = routes.expert_ids_TK.reshape(-1).argsort(stable=True)
        return cls(order_A // top_k, routes.weights_TK.reshape(-1)[order_A], routes.counts_N)

    def combine(self, y_AD: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Weight each expert output and sum it into its token."""
        y_AD = y_AD * self.weight_A.to(y_AD.dtype)[:, None]
        return y_AD.new_zeros(num_tokens, y_AD.shape[1]).index_add(0, self.token_A, y_AD)


def run_experts(experts, x_AD: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Expert i runs on the i-th run of ``counts[i]`` rows (rows sorted by expert).

    The split sizes are read back to the host: the one sync of the sorted path."""
    chunks = x_AD.split(counts.tolist())
    return torch.cat([expert(chunk) for expert, chunk in zip(experts, chunks)])


def sorted_combine(experts, x_TD: torch.Tensor, routes: Routes) -> torch.Tensor:
    assignments = Assignments.sort(routes)
    y_AD = run_experts(experts, x_TD[assignments.token_A], assignments.counts_N)
    return assignments.combine(y_AD, x_TD.shape[0])


def expert_parallel_combine(local_experts, x_TD: torch.Tensor, routes: Routes, num_experts: int, ep_group,
                            ep_rank: int) -> torch.Tensor:
    num_tokens, d_model = x_TD.shape
    ranks = dist.get_world_size(group=ep_group)
    local = num_experts // ranks
    assignments = Assignments.sort(routes)
    counts_N = assignments.counts_N

    gathered = [torch.empty_like(counts_N) for _ in range(ranks)]
    dist.all_gather(gathered, counts_N, group=ep_group)
    counts_RN = torch.stack(gathered)
    counts_RL = counts_RN.view(ranks, ranks, local)[:, ep_rank]  # what each rank sends our experts
    # The one read-back of this path: the capacity and the rows of each block we receive.
    capacity, *rows_B = torch.cat([counts_RN.max().reshape(1), counts_RL.reshape(-1)]).tolist()

    # Slot s of the (N, C) send buffer holds token token_S[s]; padding slots read a zero row (index T).
    expert_A = torch.repeat_interleave(torch.arange(num_experts, device=x_TD.device), counts_N,
                                       output_size=assignments.token_A.numel())
    first_N = counts_N.cumsum(0) - counts_N
    slot_A = expert_A * capacity + torch.arange(expert_A.numel(), device=x_TD.device) - first_N[expert_A]
    token_S = torch.full((num_experts * capacity,), num_tokens, device=x_TD.device).index_copy(
        0, slot_A, assignments.token_A)
    send = torch.cat([x_TD, x_TD.new_zeros(1, d_model)])[token_S]
    received = _AllToAll.apply(ep_group, send)

    # Each local expert runs on the real rows of each rank's block, never on the padding. One
    # split (not a slice per block, whose backward would each build a full-size gradient).
    pieces = received.split([n for rows in rows_B for n in (rows, capacity - rows)])
    blocks = []
    for b, rows in enumerate(rows_B):
        expert = local_experts[b % local]
        blocks += [expert(pieces[2 * b]), received.new_zeros(capacity - rows, d_model)]
    returned = _AllToAll.apply(ep_group, torch.cat(blocks))

    weight_S = torch.zeros(num_experts * capacity, device=x_TD.device).index_copy(0, slot_A, assignments.weight_A)
    y_SD = returned * weight_S.to(returned.dtype)[:, None]
    return y_SD.new_zeros(num_tokens + 1, d_model).index_add(0, token_S, y_SD)[:num_tokens]


def masked_dense_combine(experts, x_TD: torch.Tensor, routes: Routes) -> torch.Tensor:
    gate_TN = torch.zeros(x_TD.shape[0], len(experts), device=x_TD.device, dtype=torch.float32)
    gate_TN = gate_TN.scatter(1, routes.expert_ids_TK, routes.weights_TK).to(x_TD.dtype)
    y_TD = torch.zeros_like(x_TD)
    for e, expert in enumerate(experts):
        gate_T1 = gate_TN[:, e:e + 1]
        h_TH = expert.fc1(x_TD)
        keep_TH = None
        if expert.dropout.training and expert.dropout.p > 0:
            keep_TH = torch.rand_like(h_TH) >= expert.dropout.p
        z_TH = GatedActivation.apply(h_TH, gate_T1, keep_TH, 1.0 / (1.0 - expert.dropout.p), expert.activation_name)
        y_TD = y_TD + F.linear(z_TH, expert.fc2.weight) + gate_T1 * expert.fc2.bias
    return y_TD


def _gate_hidden_(v_TH, gate_T1, keep_TH, scale):
    """In place: multiply the hidden units by the expert's gate weight (and the dropout mask)."""
    v_TH.mul_(gate_T1)
    if keep_TH is not None:
        v_TH.mul_(keep_TH).mul_(scale)
    return v_TH


def _activation(h_TH, name):
    return F.relu(h_TH) if name == "relu" else F.gelu(h_TH)


def _activation_grad_(grad_TH, h_TH, name):
    """In place: grad * act'(h) for the activations of :data:`smoe.model.mlp.ACTIVATIONS`."""
    if name == "relu":
        return grad_TH.mul_(h_TH > 0)
    # gelu(h) = h * Phi(h), so gelu'(h) = Phi(h) + h * phi(h)
    slope_TH = h_TH.square().mul_(-0.5).exp_().mul_(h_TH).mul_((2 * math.pi) ** -0.5)
    slope_TH += torch.special.ndtr(h_TH)
    return grad_TH.mul_(slope_TH)


class GatedActivation(torch.autograd.Function):
    """z = dropout(act(h)) * gate for one expert's hidden units h and its gate weights.

    Keeps only h, the gate and the boolean dropout mask for backward, recomputes the
    activation there and works in place, so the masked-dense path holds no more
    hidden-size tensors than the dense MLP does.
    """

    @staticmethod
    def forward(ctx, h_TH, gate_T1, keep_TH, scale, activation):
        ctx.scale, ctx.activation = scale, activation
        ctx.save_for_backward(h_TH, gate_T1, keep_TH)
        return _gate_hidden_(_activation(h_TH, activation), gate_T1, keep_TH, scale)

    @staticmethod
    def backward(ctx, grad_z_TH):
        h_TH, gate_T1, keep_TH = ctx.saved_tensors
        grad_TH = grad_z_TH * keep_TH * ctx.scale if keep_TH is not None else grad_z_TH.clone()
        grad_gate_T1 = torch.einsum("th,th->t", grad_TH, _activation(h_TH, ctx.activation))[:, None]
        grad_TH.mul_(gate_T1)
        return _activation_grad_(grad_TH, h_TH, ctx.activation), grad_gate_T1, None, None, None
