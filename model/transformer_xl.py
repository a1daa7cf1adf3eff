"""Transformer-XL (Dai et al. 2019) for byte-level language modelling, around any feed-forward module.

The maths of kimiyoung/transformer-xl ``mem_transformer.py`` with the settings of its enwik8
scripts: relative attention with global content and position biases shared by all layers
(``attn_type=0``, ``untie_r=False``), post-LayerNorm, input embedding scaled by sqrt(d_model)
and tied to the output layer, a plain softmax over bytes. Written batch-first. Each layer's
feed-forward block comes from ``make_ffn`` (a dense MLP or an SMoE, see :mod:`smoe.model.dense`
and :mod:`smoe.model.moe`), so one model class trains every method of the paper.

Shapes: B batch, T segment length, M memory length, K = M + T keys, D d_model, H heads,
C d_head, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerXLConfig:
    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 8
    d_head: int = 64  # free: n_head * d_head need not equal d_model
    d_ff: int = 8192  # dense MLP width, for make_ffn; the model itself does not read it
    dropout: float = 0.1
    dropatt: float = 0.0
    tgt_len: int = 512  # training segment length (the data loader's); forward takes any T
    mem_len: int = 512
    clamp_len: int = -1  # > 0: distances beyond it share one position embedding; <= 0: no clamping
    same_length: bool = False  # every query sees mem_len keys, not more for later positions
    init_std: float = 0.02
    seed: int = 0  # attention, embedding and LayerNorm initialisation: the same on every rank

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "d_head", "d_ff", "tgt_len"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"TransformerXLConfig.{name} ({value}) must be at least 1: set a positive size")
        if self.d_model % 2:
            raise ValueError(f"TransformerXLConfig.d_model ({self.d_model}) must be even: the sinusoidal "
                             "position embedding pairs a sine with a cosine")
        for name in ("dropout", "dropatt"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"TransformerXLConfig.{name} ({value}) must be in [0, 1): use 0 to disable it")
        if self.mem_len < 0:
            raise ValueError(f"TransformerXLConfig.mem_len ({self.mem_len}) must be at least 0: "
                             "use 0 for no memory")
        if self.same_length and self.mem_len < 1:
            raise ValueError(f"TransformerXLConfig.mem_len ({self.mem_len}) must be at least 1 with "
                             "same_length=True, which lets each query see mem_len keys: raise mem_len "
                             "or set same_length=False")
        if not self.init_std > 0.0:
            raise ValueError(f"TransformerXLConfig.init_std ({self.init_std}) must be positive: the original "
                             "uses 0.02")


# Layer index -> its feed-forward module, called as ffn(x_BTD, token_ids_BT) -> (y_BTD, aux_loss, counts).
FFNFactory = Callable[[int], nn.Module]


class TransformerXLOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V), fp32
    mems: list[torch.Tensor]  # n_layer + 1 tensors (B, min(mem_len, M + T), D), detached
    aux_loss: torch.Tensor  # scalar: the FFNs' aux losses summed over layers
    expert_counts: list[torch.Tensor | None]  # per layer: tokens per expert, None for dense layers


class TransformerXLHidden(NamedTuple):
    """What the layers give before the LM head: a task head (a classifier) reads ``hidden``."""

    hidden: torch.Tensor  # (B, T, D): the last layer's output
    mems: list[torch.Tensor]
    aux_loss: torch.Tensor
    expert_counts: list[torch.Tensor | None]


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-byte cross-entropy in nats (divide by ln 2 for bits per character), averaged or summed."""
    return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), targets_BT.reshape(-1),
                           reduction=reduction)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of relative distances, as in Vaswani et al."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> torch.Tensor:
        """1 / 10000^(2i / d): computed, never saved (a model built on the meta device computes it again)."""
        return 1.0 / 10000 ** (torch.arange(0.0, self.d_model, 2.0) / self.d_model)

    def forward(self, pos_K: torch.Tensor) -> torch.Tensor:
        angle_KD = torch.outer(pos_K, self.inv_freq)
        return torch.cat([angle_KD.sin(), angle_KD.cos()], dim=-1)


def _rel_shift(x_BHTK: torch.Tensor) -> torch.Tensor:
    """Re-index position scores from "distance K-1-j" to "distance from query i to key j".

    Row i of the input scores the distances K-1, ..., 0; shifting it left by T-1-i puts
    the score of distance M+i-j at column j. The columns right of j = M+i wrap around
    into garbage, which the causal mask hides. The original's pad-and-reshape trick.
    """
    B, H, T, K = x_BHTK.shape
    padded_BHTK1 = F.pad(x_BHTK, (1, 0))
    return padded_BHTK1.view(B, H, K + 1, T)[:, :, 1:].reshape(B, H, T, K)


class RelativeAttention(nn.Module):
    """Multi-head attention of the segment over [memory; segment] with relative positions.

    score(i, j) = (q_i + u) . k_j + (q_i + v) . W_r R(i - j), scaled by 1/sqrt(C). The
    biases u (r_w_bias) and v (r_r_bias) are passed in because the model shares them.
    """

    def __init__(self, config: TransformerXLConfig):
        super().__init__()
        self.n_head = config.n_head
        self.d_head = config.d_head
        inner = config.n_head * config.d_head
        self.qkv_net = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.r_net = nn.Linear(config.d_model, inner, bias=False)
        self.o_net = nn.Linear(inner, config.d_model, bias=False)
        self.dropatt = nn.Dropout(config.dropatt)
        self.scale = config.d_head ** -0.5

    def forward(self, x_BTD: torch.Tensor, mem_BMD: torch.Tensor, pos_KD: torch.Tensor, r_w_bias_HC: torch.Tensor,
                r_r_bias_HC: torch.Tensor, mask_TK: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, C = self.n_head, self.d_head
        c_BKD = torch.cat([mem_BMD, x_BTD], dim=1)
        K = c_BKD.shape[1]
        # The original projects q for the memory too and drops it; only the segment needs queries.
        w_q, w_kv = self.qkv_net.weight.split([H * C, 2 * H * C])
        q_BTHC = F.linear(x_BTD, w_q).view(B, T, H, C)
        k_BKHC, v_BKHC = F.linear(c_BKD, w_kv).view(B, K, 2, H, C).unbind(2)
        r_KHC = self.r_net(pos_KD).view(K, H, C)

        content_BHTK = torch.einsum("bthc,bkhc->bhtk", q_BTHC + r_w_bias_HC, k_BKHC)
        position_BHTK = _rel_shift(torch.einsum("bthc,khc->bhtk", q_BTHC + r_r_bias_HC, r_KHC))
        score_BHTK = ((content_BHTK + position_BHTK) * self.scale).float().masked_fill(mask_TK, float("-inf"))
        prob_BHTK = self.dropatt(score_BHTK.softmax(dim=-1).to(v_BKHC.dtype))
        out_BTHC = torch.einsum("bhtk,bkhc->bthc", prob_BHTK, v_BKHC)
        return self.o_net(out_BTHC.reshape(B, T, H * C))


class Block(nn.Module):
    """Post-LayerNorm layer: x -> LN(x + drop(attn)) -> LN(h + drop(ffn(h)))."""

    def __init__(self, config: TransformerXLConfig, ffn: nn.Module):
        super().__init__()
        self.attn = RelativeAttention(config)
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.ffn = ffn  # its dropout on the hidden units is inside; the output dropout is ours
        self.ln_ffn = nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BTD, mem_BMD, pos_KD, r_w_bias_HC, r_r_bias_HC, mask_TK, token_ids_BT):
        h_BTD = self.ln_attn(x_BTD + self.drop(self.attn(x_BTD, mem_BMD, pos_KD, r_w_bias_HC, r_r_bias_HC,
                                                         mask_TK)))
        y_BTD, aux_loss, counts = self.ffn(h_BTD, token_ids_BT)
        return self.ln_ffn(h_BTD + self.drop(y_BTD)), aux_loss, counts


class TransformerXL(nn.Module):
    """Byte-level Transformer-XL with segment-level recurrence.

    Feed each segment with the ``mems`` returned by the previous one: every layer attends
    to the last ``mem_len`` inputs of that layer, kept without gradient. ``mem_len`` is an
    attribute so evaluation can lengthen it, as the original's ``reset_length`` does when
    it evaluates shorter segments with the same total context.
    """

    def __init__(self, config: TransformerXLConfig, make_ffn: FFNFactory):
        super().__init__()
        self.config = config
        self.mem_len = config.mem_len
        self.emb_scale = config.d_model ** 0.5
        self.word_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = PositionalEmbedding(config.d_model)
        self.r_w_bias = nn.Parameter(torch.empty(config.n_head, config.d_head))
        self.r_r_bias = nn.Parameter(torch.empty(config.n_head, config.d_head))
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, make_ffn(i)) for i in range(config.n_layer))
        # The output layer is the tied embedding plus its own bias (the original's softmax with no cutoffs).
        self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self._init_weights(torch.Generator().manual_seed(config.seed))

    def _init_weights(self, generator: torch.Generator) -> None:
        """The original ``weights_init`` (init='normal'), drawn from ``generator`` so that every
        rank builds the same model. The FFN modules initialise themselves and are left alone."""
        std = self.config.init_std
        ffn_modules = {id(m) for block in self.layers for m in block.ffn.modules()}

        def normal_(tensor: torch.Tensor, mean: float = 0.0) -> None:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std + mean)

        with torch.no_grad():
            for module in self.modules():
                if id(module) in ffn_modules:
                    continue
                if isinstance(module, (nn.Linear, nn.Embedding)):  # the attention Linears have no bias
                    normal_(module.weight)
                elif isinstance(module, nn.LayerNorm):
                    normal_(module.weight, mean=1.0)
                    module.bias.zero_()
            normal_(self.r_w_bias)
            normal_(self.r_r_bias)

    def init_mems(self, batch_size: int) -> list[torch.Tensor]:
        """Empty memories for the first segment: n_layer + 1 tensors (B, 0, D)."""
        weight = self.word_emb.weight
        return [weight.new_empty(batch_size, 0, self.config.d_model) for _ in range(self.config.n_layer + 1)]

    def _attention_mask(self, T: int, M: int, device: torch.device) -> torch.Tensor:
        """True where query i may not look: keys after it, and with same_length the keys
        that would give it more than mem_len keys."""
        ones_TK = torch.ones(T, M + T, dtype=torch.bool, device=device)
        mask_TK = ones_TK.triu(1 + M)
        if self.config.same_length:
            overflow = M + T - self.mem_len
            mask_TK |= ones_TK.tril(-(T - overflow if overflow > 0 else T))
        return mask_TK

    @torch.no_grad()
    def _update_mems(self, hiddens: list[torch.Tensor], mems: list[torch.Tensor]) -> list[torch.Tensor]:
        """The last mem_len positions of [old memory; this segment] of every layer input."""
        new_mems = []
        for mem_BMD, h_BTD in zip(mems, hiddens):
            cat_BKD = torch.cat([mem_BMD.to(h_BTD.dtype), h_BTD], dim=1)
            new_mems.append(cat_BKD[:, max(0, cat_BKD.shape[1] - self.mem_len):].detach())
        return new_mems

    def forward(self, input_ids_BT: torch.Tensor, mems: list[torch.Tensor] | None = None) -> TransformerXLOutput:
        """Next-token logits: the layers, then the output layer tied to the embedding."""
        out = self.hidden_states(input_ids_BT, mems)
        logits_BTV = F.linear(self.drop(out.hidden), self.word_emb.weight, self.out_bias).float()
        return TransformerXLOutput(logits_BTV, out.mems, out.aux_loss, out.expert_counts)

    def hidden_states(self, input_ids_BT: torch.Tensor, mems: list[torch.Tensor] | None = None) -> TransformerXLHidden:
        B, T = input_ids_BT.shape
        if mems is None:
            mems = self.init_mems(B)
        if len(mems) != self.config.n_layer + 1:
            raise ValueError(f"got {len(mems)} memories for a model with n_layer={self.config.n_layer}: pass "
                             "the mems of the previous segment's output, or None")
        M = mems[0].shape[1]
        K = M + T

        x_BTD = self.word_emb(input_ids_BT) * self.emb_scale
        mask_TK = self._attention_mask(T, M, input_ids_BT.device)
        pos_K = torch.arange(K - 1, -1, -1.0, device=input_ids_BT.device)
        if self.config.clamp_len > 0:
            pos_K = pos_K.clamp(max=self.config.clamp_len)
        pos_KD = self.drop(self.pos_emb(pos_K).to(x_BTD.dtype))

        x_BTD = self.drop(x_BTD)
        hiddens = [x_BTD]
        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        expert_counts = []
        for block, mem_BMD in zip(self.layers, mems):
            x_BTD, layer_aux, counts = block(x_BTD, mem_BMD, pos_KD, self.r_w_bias, self.r_r_bias, mask_TK,
                                             input_ids_BT)
            hiddens.append(x_BTD)
            aux_loss = aux_loss + layer_aux.float()
            expert_counts.append(counts)

        return TransformerXLHidden(x_BTD, self._update_mems(hiddens, mems), aux_loss, expert_counts)
