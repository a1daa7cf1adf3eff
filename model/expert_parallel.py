"""Expert parallelism: each rank holds N/R experts and the tokens travel to them by all-to-all.

Deduplicated: a token goes once to each rank that holds any of its k experts (with its gate
weights for them), that rank runs its experts on it and returns one row, their weighted sum:
min(k, R) rows per token each way instead of k. Blocks are padded to one capacity C (the most tokens any rank
sends any rank, agreed by an all-gather, so dropless and never hanging), exchanged with
DeepSpeed's all-to-all, and experts run on the real rows only, never on the padding
(masked-dense on them where nearly every row chose every local expert).

Shapes: T tokens, D model width, N experts, L local experts, R expert-parallel ranks, C capacity,
P (token, rank) pairs, M rows received, A assignments.
"""

from __future__ import annotations

import deepspeed.comm as dist
import torch
from deepspeed.moe.sharded_moe import _AllToAll

from smoe.model.dispatch import MASKED_DENSE_FROM, gated_dense, routed_experts
from smoe.routing import Routes


def expert_parallel_combine(local_experts, x_TD: torch.Tensor, routes: Routes, num_experts: int, ep_group,
                            ep_rank: int) -> torch.Tensor:
    """Each token travels once to each rank holding at least one of its k experts, with its gate
    weights for that rank's experts; the rank runs them and sends back one row, their weighted
    sum. Per token and direction: at most min(k, R) rows, not k."""
    num_tokens, d_model = x_TD.shape
    ranks = dist.get_world_size(group=ep_group)
    local = num_experts // ranks
    device = x_TD.device
    weight_TN = torch.zeros(num_tokens, num_experts, device=device, dtype=routes.weights_TK.dtype)
    weight_TN = weight_TN.scatter(1, routes.expert_ids_TK, routes.weights_TK)
    chosen_TN = torch.zeros(num_tokens, num_experts, device=device, dtype=torch.bool)
    chosen_TN[torch.arange(num_tokens, device=device)[:, None], routes.expert_ids_TK] = True
    to_RT = chosen_TN.view(num_tokens, ranks, local).any(-1).T  # which ranks each token goes to

    # One all-gather of what every rank sends: tokens per destination rank and assignments per expert.
    # Its one read-back: the capacity (the most tokens any rank sends any rank, so that every block
    # has one size and dropless all-to-all never hangs), and what arrives here.
    sent_R = to_RT.sum(1)
    gathered = [torch.empty(ranks + num_experts, dtype=torch.long, device=device) for _ in range(ranks)]
    dist.all_gather(gathered, torch.cat([sent_R, routes.counts_N]), group=ep_group)
    sent_RR, counts_RN = torch.stack(gathered).split([ranks, num_experts], dim=1)
    known = torch.cat([sent_RR.max().reshape(1), sent_R.sum().reshape(1), sent_RR[:, ep_rank],
                       counts_RN[:, ep_rank * local:(ep_rank + 1) * local].sum(0)]).tolist()
    capacity, pairs = known[:2]
    rows_B, assigned_L = known[2:2 + ranks], known[2 + ranks:]  # rows from each rank; assignments per local expert

    # Pair p (token, destination rank), in destination order, fills slot p of the (R, C) send buffer,
    # with the token's row, its weights for the destination's experts and which of them it chose.
    flat_P = torch.argsort(~to_RT.reshape(-1), stable=True)[:pairs]
    rank_P, token_P = flat_P // num_tokens, flat_P % num_tokens
    first_R = sent_R.cumsum(0) - sent_R
    slot_P = rank_P * capacity + torch.arange(pairs, device=device) - first_R[rank_P]
    weight_PL = weight_TN.view(num_tokens, ranks, local)[token_P, rank_P]
    chosen_PL = chosen_TN.view(num_tokens, ranks, local)[token_P, rank_P]
    rows_P = torch.cat([x_TD[token_P], weight_PL.to(x_TD.dtype), chosen_PL.to(x_TD.dtype)], dim=1)
    send = rows_P.new_zeros(ranks * capacity, d_model + 2 * local).index_copy(0, slot_P, rows_P)
    received = _AllToAll.apply(ep_group, send)

    # The real rows of each source's block (never the padding), then this rank's experts on the
    # (row, expert) pairs sorted by expert, weighted and summed per row.
    block_M = torch.repeat_interleave(torch.arange(ranks, device=device), torch.tensor(rows_B, device=device),
                                      output_size=sum(rows_B))
    first_B = torch.tensor([0, *rows_B[:-1]], device=device).cumsum(0)
    row_M = block_M * capacity + torch.arange(block_M.numel(), device=device) - first_B[block_M]
    x_MD, weight_ML, chosen_ML = received[row_M].split([d_model, local, local], dim=1)
    if sum(assigned_L) >= MASKED_DENSE_FROM * row_M.numel() * local:  # nearly every row visits every expert here
        y_MD = gated_dense(local_experts, x_MD, weight_ML)
    else:
        flat_A = torch.argsort(~(chosen_ML.T > 0).reshape(-1), stable=True)[:sum(assigned_L)]
        expert_A, row_A = flat_A // row_M.numel(), flat_A % row_M.numel()
        y_MD = routed_experts(local_experts, x_MD, row_A, weight_ML[row_A, expert_A], assigned_L)
    returned = _AllToAll.apply(ep_group, y_MD.new_zeros(ranks * capacity, d_model).index_copy(0, row_M, y_MD))
    return returned.new_zeros(num_tokens, d_model).index_add(0, token_P, returned[slot_P])
