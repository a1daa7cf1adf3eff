"""Routers: which k experts each token visits, and with what weights.

Every router maps tokens ``x_TD`` (and, for hash routing, their ids ``token_ids_T``)
to :class:`Routes`. k is an attribute changed with :meth:`Router.set_top_k` between
steps; nothing is rebuilt. Routers compute in fp32 and never drop a token.

Shapes: T tokens, D model width, N experts, K = current top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("random-frozen", "learned", "hash", "random", "thor")


@dataclass(frozen=True)
class RouterOptions:
    """The routers' own options: one object from the run config (``router.<name>=`` on the
    command line, ``"router"`` in config.json) through the layer to :func:`build_router`. A new
    option is a field here and its use in its router; nothing in between changes."""

    balance_coef: float = 0.01  # learned: weight of the balance loss
    z_loss_coef: float = 0.0  # learned: weight of the router z-loss

    def __post_init__(self):
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"router.{name} ({value}) must not be negative")


@dataclass
class Routes:
    expert_ids_TK: torch.Tensor  # long, distinct experts per token
    weights_TK: torch.Tensor  # fp32, each row sums to 1
    aux_loss: torch.Tensor  # fp32 scalar, already multiplied by its coefficients (0 if the router has none)
    counts_N: torch.Tensor  # long: assignments per expert, counted once for dispatch, logging and balance


def assignment_counts(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(token, expert) assignments per expert, on the tokens' device. A scatter-add rather than
    ``bincount``, which on CUDA reads the largest id back to the host (a sync per call)."""
    ids_A = expert_ids_TK.reshape(-1)
    return ids_A.new_zeros(num_experts).scatter_add_(0, ids_A, torch.ones_like(ids_A))


def _seeded_normal_(tensor: torch.Tensor, std: float, seed: int) -> None:
    """Fill ``tensor`` from its own generator, so every rank builds the same values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


class Router(nn.Module):
    def __init__(self, num_experts: int, k: int):
        super().__init__()
        self.num_experts = num_experts
        self.set_top_k(k)

    @property
    def top_k(self) -> int:
        return self._k

    def set_top_k(self, k: int) -> None:
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"top-k ({k}) must be between 1 and the number of experts ({self.num_experts}): "
                             "change k or the schedule's k_min/k_max")
        self._k = int(k)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routes:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self._k}"

    def _routes(self, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, aux_loss: torch.Tensor | None = None,
                counts_N: torch.Tensor | None = None) -> Routes:
        if aux_loss is None:
            aux_loss = weights_TK.new_zeros(())
        if counts_N is None:
            counts_N = assignment_counts(expert_ids_TK, self.num_experts)
        return Routes(expert_ids_TK, weights_TK, aux_loss, counts_N)


def top_k_softmax(probs_TN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable experts of the fp32 softmax ``probs_TN`` and their probabilities renormalised:
    the softmax over the k largest logits, computed as Mixtral and Qwen3-MoE compute it, so that a
    native transformers export picks the very same experts. The order matters where logits nearly
    tie: exp rounds near 1 in steps of ~6e-8, so logits closer than that (an upcycled router's are
    ~1e-6 apart) tie among the probabilities, and both pick among the tied alike. At k = 1 the
    weight is 1 exactly, with no gradient: p / p would pass back rounding noise instead of 0."""
    top_TK, expert_ids_TK = probs_TN.topk(k, dim=-1)
    if k == 1:
        return expert_ids_TK, torch.ones_like(top_TK)
    return expert_ids_TK, top_TK / top_TK.sum(dim=-1, keepdim=True)


class FrozenProjection(nn.Module):
    """``Linear(D, N)`` whose weight and bias are fp32 buffers: never trained and never cast.

    Buffers, because DeepSpeed's bf16/fp16 engines cast every *parameter* to the training
    dtype; ``_apply`` keeps them fp32 through ``module.half()`` or ``.to(dtype)`` as well.
    Rounded weights would pick other experts than the fp32 model `smoe eval` runs, so the
    routes would depend on the precision the model was trained in.
    """

    def __init__(self, d_in: int, d_out: int, std: float, seed: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(d_out, d_in, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(d_out, dtype=torch.float32))
        _seeded_normal_(self.weight, std, seed)

    def _apply(self, fn, recurse=True):
        """Follow the module's moves between devices, never its dtype casts."""
        fp32 = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, original in fp32.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD.float(), self.weight, self.bias)


class RandomFrozenRouter(Router):
    """SMoE-Dropout's router: a random Linear(D, N) that is never trained.

    Weights are the softmax over the k selected logits only, so they sum to 1 for
    every k (k = 1 gives weight 1): the output scale does not jump when k grows.
    The projection (:class:`FrozenProjection`: saved in checkpoints, outside the
    optimizer, always fp32) is drawn from ``seed``, so it is identical on every rank by
    construction.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, seed: int, std: float = 0.02):
        super().__init__(num_experts, k)
        self.proj = FrozenProjection(d_model, num_experts, std, seed)

    def forward(self, x_TD, token_ids_T=None) -> Routes:
        expert_ids_TK, weights_TK = top_k_softmax(self.proj(x_TD).softmax(dim=-1), self._k)
        return self._routes(expert_ids_TK, weights_TK)


class LearnedRouter(Router):
    """Switch/GShard-style trainable top-k gate with the load-balance loss.

    ``balance_coef * N * sum_i f_i * P_i`` where f_i is the share of the T*K
    assignments sent to expert i and P_i the mean router probability of i (1.0 when
    perfectly balanced), plus ``z_loss_coef * mean(logsumexp(logits)^2)``.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, seed: int, balance_coef: float = 0.01,
                 z_loss_coef: float = 0.0, std: float = 0.02):
        super().__init__(num_experts, k)
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        _seeded_normal_(self.proj.weight, std, seed)
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef

    def forward(self, x_TD, token_ids_T=None) -> Routes:
        logits_TN = F.linear(x_TD.float(), self.proj.weight.float())
        probs_TN = logits_TN.softmax(dim=-1)
        expert_ids_TK, weights_TK = top_k_softmax(probs_TN, self._k)
        counts_N = assignment_counts(expert_ids_TK, self.num_experts)
        aux = self.balance_coef * balance_loss(probs_TN, counts_N)
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * logits_TN.logsumexp(dim=-1).square().mean()
        return self._routes(expert_ids_TK, weights_TK, aux, counts_N)


def balance_loss(probs_TN: torch.Tensor, counts_N: torch.Tensor) -> torch.Tensor:
    """``N * sum_i f_i * P_i`` (Switch Transformer), f_i the share of all T*K assignments
    (``counts_N``, from :func:`assignment_counts`) that went to expert i."""
    f_N = counts_N.float() / counts_N.sum()
    return probs_TN.shape[-1] * (f_N * probs_TN.mean(dim=0)).sum()


class HashRouter(Router):
    """Fixed random token-id -> experts table (Roller et al. 2021), equal weights.

    Each vocabulary entry owns a random permutation of the experts; top-k takes its
    first k, so growing k only adds experts. The table is a buffer drawn from ``seed``.
    """

    def __init__(self, num_experts: int, k: int, vocab_size: int, seed: int):
        super().__init__(num_experts, k)
        generator = torch.Generator().manual_seed(seed)
        table = torch.rand(vocab_size, num_experts, generator=generator).argsort(dim=-1)
        self.register_buffer("table", table)

    def forward(self, x_TD, token_ids_T=None) -> Routes:
        if token_ids_T is None:
            raise ValueError("the hash router needs the input token ids: call the layer as layer(x, token_ids=ids)")
        token_ids_T = token_ids_T.reshape(-1)
        if token_ids_T.numel() != x_TD.shape[0]:
            raise ValueError(f"token_ids has {token_ids_T.numel()} entries for {x_TD.shape[0]} tokens: "
                             "pass one id per token")
        expert_ids_TK = self.table[token_ids_T, :self._k]
        weights_TK = x_TD.new_full(expert_ids_TK.shape, 1.0 / self._k, dtype=torch.float32)
        return self._routes(expert_ids_TK, weights_TK)


class RandomRouter(Router):
    """A fresh uniform choice of k distinct experts per token at every forward, equal weights.

    Draws come from the router's own generator (seeded per rank), so a run is
    reproducible and independent of the global RNG. The generator lives on the
    module's device (re-made from the seed when the module moves), so the draws are
    made where the tokens are, with no copy per forward; its state is checkpointed.
    """

    def __init__(self, num_experts: int, k: int, seed: int):
        super().__init__(num_experts, k)
        self.seed = seed
        self.register_buffer("_device", torch.empty(0), persistent=False)  # where the module lives
        self.generator = torch.Generator().manual_seed(seed)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.generator.device != self._device.device:
            self.generator = torch.Generator(device=self._device.device).manual_seed(self.seed)
        return self

    def forward(self, x_TD, token_ids_T=None) -> Routes:
        scores_TN = torch.rand(x_TD.shape[0], self.num_experts, generator=self.generator,
                               device=self.generator.device)
        expert_ids_TK = scores_TN.topk(self._k, dim=-1).indices
        weights_TK = x_TD.new_full(expert_ids_TK.shape, 1.0 / self._k, dtype=torch.float32)
        return self._routes(expert_ids_TK, weights_TK)


class ThorRouter(RandomRouter):
    """THOR (Zuo et al. 2022): random experts per token (two during training), no gate.

    What THOR adds is in the loss (``Method.consistency``): the loop runs two forward
    passes, each drawing its own experts from this router's generator, and adds
    ``consistency_coef`` times the symmetric KL between their predictions.
    """


def build_router(name: str, options: RouterOptions = RouterOptions(), *, d_model: int, num_experts: int, k: int,
                 seed: int, vocab_size: int | None = None, rank: int = 0) -> Router:
    """Build a router by name. ``rank`` decorrelates the random routers' draws across ranks."""
    if name == "random-frozen":
        return RandomFrozenRouter(d_model, num_experts, k, seed)
    if name == "learned":
        return LearnedRouter(d_model, num_experts, k, seed, options.balance_coef, options.z_loss_coef)
    if name == "hash":
        if not vocab_size:
            raise ValueError("the hash router needs vocab_size: set it to the tokenizer's vocabulary size")
        return HashRouter(num_experts, k, vocab_size, seed)
    if name == "random":
        return RandomRouter(num_experts, k, seed + 7919 * rank)
    if name == "thor":
        return ThorRouter(num_experts, k, seed + 7919 * rank)
    raise ValueError(f"router '{name}' is unknown: use one of {', '.join(ROUTERS)}")
