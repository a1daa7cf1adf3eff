"""An equation decoder for math word problems: prefix equations generated from an encoder's states.

The output vocabulary is the fixed ``symbols`` (operators and the constants of the training
equations) followed by the problem's number slots: id ``len(symbols) + K`` is ``numberK``.
Number values never enter the model; a slot is represented by the encoder's state at the
word ``numberK`` in the text, which serves both as the decoder's input embedding when the
slot is fed back (through ``slot_in``) and as the key the decoder points at to output it
(through ``slot_key``), so any slot of any problem can be copied without a vocabulary entry.
The decoder is torch's ``nn.TransformerDecoder``, cross-attending to the encoder's states.

A prefix equation delimits itself, so there is no end token: generation stops when every
operator has its operands, or at ``max_tokens``, which leaves the equation cut short.

Shapes: B batch, T equation tokens, L text tokens, S number slots, D width, V vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

START = "<start>"  # the input before the first token; never an output


@dataclass(frozen=True)
class Grammar:
    """What the decoder writes, handed in by the task: prefix equations whose ``operators``
    each take two operands, over constants and number slots ``{slot_prefix}K``."""

    operators: tuple[str, ...]
    slot_prefix: str = "number"

    def slot(self, token: str) -> int | None:
        """K for the slot token ``{slot_prefix}K``, else None."""
        match = re.fullmatch(rf"{re.escape(self.slot_prefix)}(\d+)", token)
        return int(match.group(1)) if match else None


@dataclass
class DecoderConfig:
    d_model: int  # the encoder's width: its states are the decoder's memory as they are
    n_head: int
    n_layer: int = 2
    dropout: float = 0.1
    max_tokens: int = 32  # the longest equation generated; ASDiv-A/MAWPS/SVAMP equations have 1 to 15 tokens

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) is not divisible by n_head ({self.n_head})")


class EquationDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, symbols: list[str], grammar: Grammar):
        super().__init__()
        if START in symbols or any(grammar.slot(symbol) is not None for symbol in symbols):
            raise ValueError(f"symbols {symbols} must not hold {START} or number slots: slots come from the text")
        self.config = config
        self.grammar = grammar
        self.symbols = [START, *symbols]
        self.symbol_ids = {symbol: i for i, symbol in enumerate(self.symbols)}
        d = config.d_model
        self.embed = nn.Embedding(len(self.symbols), d)
        self.position = nn.Embedding(config.max_tokens, d)
        self.slot_in = nn.Linear(d, d)
        self.slot_key = nn.Linear(d, d)
        layer = nn.TransformerDecoderLayer(d, config.n_head, 4 * d, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, config.n_layer, norm=nn.LayerNorm(d))
        self.symbol_head = nn.Linear(d, len(self.symbols))

    def ids(self, equation: tuple[str, ...]) -> list[int]:
        """Output ids of an equation's tokens; a constant outside the vocabulary raises KeyError."""
        first_slot = len(self.symbols)
        return [self.symbol_ids[token] if (slot := self.grammar.slot(token)) is None else first_slot + slot
                for token in equation]

    def tokens(self, ids: list[int]) -> tuple[str, ...]:
        slot = len(self.symbols)
        return tuple(self.symbols[i] if i < slot else f"{self.grammar.slot_prefix}{i - slot}" for i in ids)

    def forward(self, ids_BT: torch.Tensor, memory_BLD: torch.Tensor, memory_mask_BL: torch.Tensor,
                slots_BSD: torch.Tensor, slot_mask_BS: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V + S) of the token after each of ``ids_BT`` (which starts with START).

        ``memory_mask_BL`` and ``slot_mask_BS`` are True where a text token / a slot exists."""
        V, T, D = len(self.symbols), ids_BT.shape[1], slots_BSD.shape[-1]
        is_slot_BT = ids_BT >= V
        slot_index_BTD = (ids_BT - V).clamp(min=0).unsqueeze(-1).expand(-1, -1, D)
        slot_in_BTD = self.slot_in(torch.gather(slots_BSD, 1, slot_index_BTD))
        x_BTD = torch.where(is_slot_BT.unsqueeze(-1), slot_in_BTD, self.embed(ids_BT.clamp(max=V - 1)))
        x_BTD = x_BTD + self.position(torch.arange(T, device=ids_BT.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=ids_BT.device, dtype=torch.bool)
        h_BTD = self.layers(x_BTD, memory_BLD, tgt_mask=causal, tgt_is_causal=True,
                            memory_key_padding_mask=~memory_mask_BL)
        symbol_logits_BTV = self.symbol_head(h_BTD)
        symbol_logits_BTV[..., self.symbol_ids[START]] = float("-inf")
        slot_logits_BTS = h_BTD @ self.slot_key(slots_BSD).transpose(1, 2) / D ** 0.5
        slot_logits_BTS = slot_logits_BTS.masked_fill(~slot_mask_BS.unsqueeze(1), float("-inf"))
        return torch.cat([symbol_logits_BTV, slot_logits_BTS], dim=-1)

    @torch.no_grad()
    def generate(self, memory_BLD: torch.Tensor, memory_mask_BL: torch.Tensor, slots_BSD: torch.Tensor,
                 slot_mask_BS: torch.Tensor) -> list[tuple[str, ...]]:
        """Greedy equations, each stopped once complete; one cut short at ``max_tokens`` comes back
        incomplete (the evaluator calls it unparseable)."""
        B = memory_BLD.shape[0]
        ids_BT = torch.full((B, 1), self.symbol_ids[START], device=memory_BLD.device)
        open_operands = [1] * B  # operands still missing: an equation is complete at 0
        lengths = [self.config.max_tokens] * B
        for step in range(self.config.max_tokens):
            next_B = self(ids_BT, memory_BLD, memory_mask_BL, slots_BSD, slot_mask_BS)[:, -1].argmax(dim=-1)
            ids_BT = torch.cat([ids_BT, next_B.unsqueeze(1)], dim=1)
            for b, token in enumerate(self.tokens(next_B.tolist())):
                if open_operands[b]:
                    open_operands[b] += 1 if token in self.grammar.operators else -1
                    if not open_operands[b]:
                        lengths[b] = step + 1
            if not any(open_operands):
                break
        return [self.tokens(row[1:1 + length]) for row, length in zip(ids_BT.tolist(), lengths)]
