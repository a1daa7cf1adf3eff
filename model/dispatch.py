"""Moving routed tokens to their experts and back: y = sum_k w_TK * E_{ids_TK}(x_T), on one process.

Four ways to compute the same thing:

* :func:`reference_combine`: a loop over experts with boolean masks. Slow and obvious;
  kept so that tests can hold the fast paths to it.
* :func:`sorted_combine`: sort the T*K (token, expert) assignments by expert and run
  every expert once on its contiguous rows. Work is exactly T*K rows, so the cost
  scales with k, with no capacity padding and no dropped token.
* :func:`grouped_combine`: the sorted path with all experts as one grouped GEMM per
  projection (``torch.nn.functional.grouped_mm``): no per-expert loop and no host sync where
  grouped_mm runs as one kernel (:func:`groupable`), and each expert's bias gradient summed in fp32.
* :func:`masked_dense_combine`: near k = N nearly every expert sees every token, so
  run every expert on every token and multiply its hidden units by its gate weight
  (zero where it is not selected): no gather, no scatter, no (T*K, D) copies, and the
  memory of the dense MLP. Costs what the dense MLP costs.

Across ranks, :mod:`smoe.model.expert_parallel` runs these experts on the tokens it receives.
Only torch is imported here: `smoe export` copies this module into the exported model.

Every path runs both expert kinds of :class:`smoe.model.mlp.MLP`, plain and gated (fc1's 2H outputs
[gate | up]), with or without biases, fc1's and fc2's each its own (an upcycled GPT-2's experts have
fc1's only).

Shapes: T tokens, D model width, K top-k, N experts, A = T*K assignments, H hidden units of one expert
(fc1 has F outputs: H, or 2H when gated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from smoe.model.mlp import activate
from smoe.routing import Routes

# From which share of (token, expert) pairs chosen running every expert on every token (the
# masked-dense path) is faster than gathering the chosen pairs: without a timing, `auto`'s rule.
MASKED_DENSE_FROM = 0.875


def default_path(k: int, num_experts: int) -> str:
    """The single-rank path without a timing: masked-dense from k >= 0.875 N, else sorted."""
    return "masked-dense" if k >= MASKED_DENSE_FROM * num_experts else "sorted"


def scaled(routes: Routes, combine_scale: float) -> Routes:
    """The routes with every gate weight times ``combine_scale`` (``MoEConfig.combine_scale``):
    done once, before any path combines with the weights."""
    return routes if combine_scale == 1.0 else replace(routes, weights_TK=routes.weights_TK * combine_scale)


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


def sorted_combine(experts, x_TD: torch.Tensor, routes: Routes) -> torch.Tensor:
    """Each expert on exactly its rows (:class:`RoutedExperts`). The split sizes are read back
    to the host: the one sync of the sorted path."""
    assignments = Assignments.sort(routes)
    return routed_experts(experts, x_TD, assignments.token_A, assignments.weight_A, assignments.counts_N.tolist())


# Compute capability majors where torch's grouped_mm runs its CUTLASS kernel on CUDA (bf16 only;
# torch's _grouped_mm_cuda, from _scaled_mm_allowed_device(sm90_only, sm100_only)). Elsewhere, sm80-sm89
# and sm120 included, it takes _grouped_mm_fallback: the offsets copied to the host and one matmul per
# expert, a host sync in every layer.
GROUPED_MM_CUDA_MAJORS = (9, 10)


def groupable(experts, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether grouped_mm runs these experts as one kernel per projection with no host sync: on
    the CPU in fp32 or bf16, on CUDA in bf16 at a compute capability of :data:`GROUPED_MM_CUDA_MAJORS`
    (not ROCm); every row (of fc1 and fc2) a multiple of 16 bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        supported = (dtype == torch.bfloat16 and torch.version.hip is None
                     and torch.cuda.get_device_capability(device)[0] in GROUPED_MM_CUDA_MAJORS)
    else:
        supported = dtype in (torch.float32, torch.bfloat16)
    return supported and all(n * dtype.itemsize % 16 == 0 for n in experts[0].fc2.weight.shape)


class ExpertBias(torch.autograd.Function):
    """Each row plus its expert's bias: y_AH + bias_NH[expert_A]. Autograd's own way back through
    the indexing adds the rows into the bias gradient one at a time in the bias's dtype, which in
    bf16 loses nearly everything once an expert has thousands of rows; here each expert's rows are
    summed in fp32 on the device (no host sync; a transient fp32 copy of the rows' gradient) and cast
    once, as ``.sum(0)`` does on the other paths."""

    @staticmethod
    def forward(ctx, y_AH, bias_NH, expert_A):
        ctx.save_for_backward(expert_A)
        ctx.bias_shape, ctx.bias_dtype = bias_NH.shape, bias_NH.dtype
        return y_AH + bias_NH[expert_A]

    @staticmethod
    def backward(ctx, grad_AH):
        (expert_A,) = ctx.saved_tensors
        grad_NH = grad_AH.new_zeros(ctx.bias_shape, dtype=torch.float32).index_add_(0, expert_A, grad_AH.float())
        return grad_AH, grad_NH.to(ctx.bias_dtype), None


def run_experts_grouped(experts, x_AD: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Expert i on the i-th run of ``counts[i]`` rows (rows sorted by expert), all as one grouped
    GEMM per projection over the stacked experts' weights: no loop over experts and no read-back
    of the split sizes. The experts stay DeepSpeed's modules
    (one checkpoint file each); their weights are stacked for the call."""
    first = experts[0]
    ends = counts.cumsum(0).to(torch.int32)
    expert_A = torch.repeat_interleave(torch.arange(len(experts), device=x_AD.device), counts,
                                       output_size=x_AD.shape[0]) if first.has_bias or first.has_output_bias else None

    def project(rows_AI, linears):
        """The rows through each expert's linear, one grouped GEMM, plus its bias where it has one."""
        out_AO = F.grouped_mm(rows_AI, torch.stack([linear.weight for linear in linears]).transpose(-2, -1),
                              offs=ends)
        if linears[0].bias is None:
            return out_AO
        return ExpertBias.apply(out_AO, torch.stack([linear.bias for linear in linears]), expert_A)

    h_AF = project(x_AD, [e.fc1 for e in experts])
    a_AH = first.dropout(activate(h_AF, first.activation_name, first.gated))
    return project(a_AH, [e.fc2 for e in experts])


def grouped_combine(experts, x_TD: torch.Tensor, routes: Routes) -> torch.Tensor:
    """:func:`sorted_combine` with the experts as grouped GEMMs."""
    assignments = Assignments.sort(routes)
    y_AD = run_experts_grouped(experts, x_TD[assignments.token_A], assignments.counts_N)
    return assignments.combine(y_AD, x_TD.shape[0])


def masked_dense_combine(experts, x_TD: torch.Tensor, routes: Routes) -> torch.Tensor:
    gate_TN = torch.zeros(x_TD.shape[0], len(experts), device=x_TD.device, dtype=torch.float32)
    return gated_dense(experts, x_TD, gate_TN.scatter(1, routes.expert_ids_TK, routes.weights_TK))


def gated_dense(experts, x_TD: torch.Tensor, gate_TN: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, its hidden units times the token's gate weight for it (0
    where not chosen): sum_e MLP_e(x) * gate_e, at the dense MLP's work and memory."""
    gate_TN = gate_TN.to(x_TD.dtype)
    y_TD = torch.zeros_like(x_TD)
    for e, expert in enumerate(experts):
        y_TD = y_TD + GatedExpert.apply(x_TD, expert.fc1.weight, expert.fc1.bias, expert.fc2.weight, expert.fc2.bias,
                                        gate_TN[:, e:e + 1], _dropout_mask(expert, x_TD.shape[0], x_TD),
                                        1.0 / (1.0 - expert.dropout.p), expert.activation_name, expert.gated)
    return y_TD


def _gate_hidden_(v_TH, gate_T1, keep_TH, scale):
    """In place: multiply the hidden units by the expert's gate weight (and the dropout mask)."""
    v_TH.mul_(gate_T1)
    if keep_TH is not None:
        v_TH.mul_(keep_TH).mul_(scale)
    return v_TH


def _activation_grad_(grad_TH, h_TH, name):
    """In place: grad * act'(h) for the activations of :data:`smoe.model.mlp.ACTIVATIONS`."""
    if name == "relu":
        return grad_TH.mul_(h_TH > 0)
    if name == "silu":  # silu(h) = h s(h), s the sigmoid: silu'(h) = s(h) (1 + h (1 - s(h)))
        s_TH = torch.sigmoid(h_TH)
        return grad_TH.mul_(s_TH).mul_((1 - s_TH).mul_(h_TH).add_(1))
    if name == "gelu_tanh":  # 0.5 h (1 + tanh(u)), u = c (h + 0.044715 h^3): 0.5 (1 + t) + 0.5 h (1 - t^2) u'
        c = math.sqrt(2 / math.pi)
        h2_TH = h_TH.square()
        t_TH = torch.tanh((h2_TH * 0.044715).add_(1).mul_(h_TH).mul_(c))
        du_TH = h2_TH.mul_(3 * 0.044715 * c).add_(c)
        slope_TH = t_TH.square().neg_().add_(1).mul_(du_TH).mul_(h_TH).add_(t_TH).add_(1).mul_(0.5)
        return grad_TH.mul_(slope_TH)
    # gelu(h) = h * Phi(h), so gelu'(h) = Phi(h) + h * phi(h)
    slope_TH = h_TH.square().mul_(-0.5).exp_().mul_(h_TH).mul_((2 * math.pi) ** -0.5)
    slope_TH += torch.special.ndtr(h_TH)
    return grad_TH.mul_(slope_TH)


def _hidden_grad_(grad_a_RH, h_RF, activation, gated):
    """fc1's output gradient from the hidden units' (overwritten): grad * act'(h), or for a gated
    expert, h = [gate | up] and a = act(gate) * up, d gate = grad * up * act'(gate), d up = grad * act(gate)."""
    if not gated:
        return _activation_grad_(grad_a_RH, h_RF, activation)
    gate_RH, up_RH = h_RF.chunk(2, dim=-1)
    grad_up_RH = grad_a_RH * activate(gate_RH, activation, False)
    return torch.cat([_activation_grad_(grad_a_RH.mul_(up_RH), gate_RH, activation), grad_up_RH], dim=-1)


def _expert_forward(x_RD, w1_FD, b1_F, w2_DH, b2_D, gate_R1, keep_RH, scale, activation, gated):
    """y = (dropout(a(x W1^T + b1)) * gate) W2^T + gate * b2, a the activation (times up when gated),
    and fc1's output h. The biases may be None."""
    h_RF = F.linear(x_RD, w1_FD, b1_F)
    z_RH = _gate_hidden_(activate(h_RF, activation, gated), gate_R1, keep_RH, scale)
    y_RD = F.linear(z_RH, w2_DH)
    return (y_RD if b2_D is None else y_RD + gate_R1 * b2_D), h_RF


def _expert_backward(grad_y_RD, x_RD, w1_FD, b1_F, w2_DH, b2_D, h_RF, gate_R1, keep_RH, scale, activation, gated):
    """The gradients of :func:`_expert_forward` for x, W1, b1, W2, b2 and the gate, the hidden units
    recomputed from h; None for a bias the expert does not have (b1 is read only for that)."""
    a_RH = activate(h_RF, activation, gated)  # dropout(a(h)), ungated
    if keep_RH is not None:
        a_RH.mul_(keep_RH).mul_(scale)
    grad_w2_DH = grad_y_RD.T @ (a_RH * gate_R1)
    grad_z_RH = grad_y_RD @ w2_DH
    grad_gate_R1 = torch.einsum("rh,rh->r", grad_z_RH, a_RH)[:, None]
    grad_b2_D = None
    if b2_D is not None:
        grad_b2_D = (grad_y_RD * gate_R1).sum(0)
        grad_gate_R1 += (grad_y_RD @ b2_D)[:, None]
    del a_RH
    if keep_RH is not None:
        grad_z_RH.mul_(keep_RH).mul_(scale)
    grad_h_RF = _hidden_grad_(grad_z_RH.mul_(gate_R1), h_RF, activation, gated)
    grad_b1_F = None if b1_F is None else grad_h_RF.sum(0)
    return grad_h_RF @ w1_FD, grad_h_RF.T @ x_RD, grad_b1_F, grad_w2_DH, grad_b2_D, grad_gate_R1


def _dropout_mask(expert, num_rows: int, like: torch.Tensor) -> torch.Tensor | None:
    if not (expert.dropout.training and expert.dropout.p > 0):
        return None
    return torch.rand(num_rows, expert.d_ff, device=like.device, dtype=like.dtype) >= expert.dropout.p


def _expert_tensors(experts) -> list[torch.Tensor]:
    return [t for e in experts for t in (e.fc1.weight, e.fc1.bias, e.fc2.weight, e.fc2.bias)]


class GatedExpert(torch.autograd.Function):
    """One expert on every token with gated hidden units (the masked-dense path). Keeps for
    backward only fc1's output h, the gate and a boolean dropout mask (x is the layer's
    input, the same tensor for every expert): no more hidden-size tensors than the dense MLP."""

    @staticmethod
    def forward(ctx, x_TD, w1_FD, b1_F, w2_DH, b2_D, gate_T1, keep_TH, scale, activation, gated):
        ctx.scale, ctx.activation, ctx.gated = scale, activation, gated
        y_TD, h_TF = _expert_forward(x_TD, w1_FD, b1_F, w2_DH, b2_D, gate_T1, keep_TH, scale, activation, gated)
        ctx.save_for_backward(x_TD, w1_FD, b1_F, w2_DH, b2_D, h_TF, gate_T1, keep_TH)
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        x_TD, w1_FD, b1_F, w2_DH, b2_D, h_TF, gate_T1, keep_TH = ctx.saved_tensors
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_gate = _expert_backward(
            grad_y_TD, x_TD, w1_FD, b1_F, w2_DH, b2_D, h_TF, gate_T1, keep_TH, ctx.scale, ctx.activation, ctx.gated)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_gate, None, None, None, None


class RoutedExperts(torch.autograd.Function):
    """Every expert on its rows of x, weighted and added into their tokens:
    y[t] = sum over the assignments a of token t of w_a MLP_{e(a)}(x[t]), the assignments sorted
    by expert (``counts`` of each). Keeps for backward x (the layer's input), the row indices, the
    weights and each expert's hidden units and dropout mask: no (T*K x d) copy of the gathered
    inputs or of the outputs, and the input gradient is one (T x d) sum."""

    @staticmethod
    def forward(ctx, x_TD, token_A, weight_A, counts, dropouts, scale, activation, gated, *tensors):
        ctx.counts, ctx.scale, ctx.weight_dtype = counts, scale, weight_A.dtype
        ctx.activation, ctx.gated = activation, gated
        gate_A1 = weight_A.to(x_TD.dtype)[:, None]
        y_TD = torch.zeros_like(x_TD)
        hidden, start = [], 0
        for e, (count, keep_RH) in enumerate(zip(counts, dropouts)):
            rows_R = token_A[start:start + count]
            w1_FD, b1_F, w2_DH, b2_D = tensors[4 * e:4 * e + 4]
            y_RD, h_RF = _expert_forward(x_TD[rows_R], w1_FD, b1_F, w2_DH, b2_D, gate_A1[start:start + count], keep_RH,
                                         scale, activation, gated)
            y_TD.index_add_(0, rows_R, y_RD)
            hidden.append(h_RF)
            start += count
        ctx.save_for_backward(x_TD, token_A, gate_A1, *tensors, *hidden, *dropouts)
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        x_TD, token_A, gate_A1, *rest = ctx.saved_tensors
        experts = len(ctx.counts)
        tensors, hidden, dropouts = rest[:4 * experts], rest[4 * experts:5 * experts], rest[5 * experts:]
        grad_x_TD = torch.zeros_like(x_TD)
        grad_tensors, grad_gates, start = [], [], 0
        for e, count in enumerate(ctx.counts):
            rows_R = token_A[start:start + count]
            w1_FD, b1_F, w2_DH, b2_D = tensors[4 * e:4 * e + 4]
            grad_x_RD, *grads, grad_gate_R1 = _expert_backward(
                grad_y_TD[rows_R], x_TD[rows_R], w1_FD, b1_F, w2_DH, b2_D, hidden[e], gate_A1[start:start + count],
                dropouts[e], ctx.scale, ctx.activation, ctx.gated)
            grad_x_TD.index_add_(0, rows_R, grad_x_RD)
            grad_tensors += grads
            grad_gates.append(grad_gate_R1)
            start += count
        grad_weight_A = torch.cat(grad_gates)[:, 0].to(ctx.weight_dtype) if grad_gates else None
        return (grad_x_TD, None, grad_weight_A, None, None, None, None, None, *grad_tensors)


def routed_experts(experts, x_TD: torch.Tensor, token_A: torch.Tensor, weight_A: torch.Tensor,
                   counts: list[int]) -> torch.Tensor:
    """:class:`RoutedExperts` of our MLPs, with their dropout drawn here (train mode)."""
    first = experts[0]
    dropouts = [_dropout_mask(expert, count, x_TD) for expert, count in zip(experts, counts)]
    return RoutedExperts.apply(x_TD, token_A, weight_A, counts, dropouts, 1.0 / (1.0 - first.dropout.p),
                               first.activation_name, first.gated, *_expert_tensors(experts))


# The single-rank paths by name (`MoEConfig.dispatch`); expert-parallel is chosen by ep_size.
COMBINES = {"reference": reference_combine, "sorted": sorted_combine, "grouped": grouped_combine,
            "masked-dense": masked_dense_combine}
