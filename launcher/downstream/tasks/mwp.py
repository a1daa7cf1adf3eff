"""Math word problems: ASDiv-A and MAWPS (5-fold cross-validation) and SVAMP (trained on
MAWPS + ASDiv-A), solve rate on dev.

A BERT/RoBERTa encoder reads the problem, numbers masked as ``number0``..; an equation
decoder (:mod:`smoe.model.equation_decoder`) writes the prefix equation, trained by
teacher-forced cross-entropy and greedy at evaluation. A problem is solved when the
equation's value is the answer; an equation without a value (cut short, dividing by
zero) is unsolved and also counted in ``unparseable_fraction``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from smoe.data.mwp import FOLDS, OPERATORS, SLOT, SLOT_PREFIX, Problem, mwp_dir, read_split, solve_counts
from smoe.launcher.downstream.tasks.base import Split, Task, TransformersBody
from smoe.launcher.runtime.files import atomic_output, write_atomic
from smoe.model.equation_decoder import START, DecoderConfig, EquationDecoder, Grammar

GRAMMAR = Grammar(tuple(OPERATORS), SLOT_PREFIX)  # the data's equations, as the decoder writes them
DECODER_CONFIG, DECODER_WEIGHTS = "equation_decoder.json", "equation_decoder.safetensors"
IGNORE = -100  # cross-entropy's ignore_index: padding, and slots cut off by --max-length


def symbols_of(problems: list[Problem]) -> list[str]:
    """The decoder's fixed outputs: the operators, then the training equations' constants by value."""
    constants = {token for p in problems for token in p.equation
                 if token not in OPERATORS and not SLOT.fullmatch(token)}
    return [*OPERATORS, *sorted(constants, key=float)]


def slot_positions(problems: list[Problem], offsets_BL2: torch.Tensor) -> torch.Tensor:
    """(B, S): the first text token of each ``numberK`` word, -1 for a slot the truncated text lacks.

    Found from character offsets, which works for WordPiece and byte-level BPE alike."""
    slots = max(1, *(len(p.numbers) for p in problems))  # one at least, for the gathers to index
    positions_BS = torch.full((len(problems), slots), -1)
    starts_BL, ends_BL = offsets_BL2.unbind(-1)
    for b, problem in enumerate(problems):
        for match in reversed(list(SLOT.finditer(problem.question))):  # reversed: the first mention wins
            overlapping = ((starts_BL[b] < match.end()) & (ends_BL[b] > match.start())).nonzero()
            if len(overlapping):
                positions_BS[b, int(match.group(1))] = overlapping[0, 0]
    return positions_BS


class EquationSolver(TransformersBody):
    """One of our BERT/RoBERTa encoders (transformers' ``AutoModel``) with an equation decoder."""

    def __init__(self, model_dir: Path, max_length: int, symbols: list[str]):
        super().__init__("AutoModel", model_dir, max_length)
        if not self.tokenizer.is_fast:
            raise ValueError(f"the tokenizer of {model_dir} is not a fast (Rust) tokenizer: math word problems need "
                             "its character offsets to find the number slots; save a fast one with the model")
        config = self.model.config
        self.decoder = EquationDecoder(DecoderConfig(config.hidden_size, config.num_attention_heads,
                                                     dropout=config.hidden_dropout_prob), symbols, GRAMMAR)

    def encode(self, batch: list[Problem]):
        """The encoder's states (B, L, D) and mask, and the states at the number slots (B, S, D) and mask."""
        inputs = self.tokenizer([p.question for p in batch], truncation=True, max_length=self.max_length,
                                padding=True, return_offsets_mapping=True, return_tensors="pt")
        positions_BS = slot_positions(batch, inputs.pop("offset_mapping")).to(self.device)
        inputs = inputs.to(self.device)
        states_BLD = self.model(**inputs).last_hidden_state
        index_BSD = positions_BS.clamp(min=0).unsqueeze(-1).expand(-1, -1, states_BLD.shape[-1])
        return states_BLD, inputs["attention_mask"].bool(), torch.gather(states_BLD, 1, index_BSD), positions_BS >= 0

    def forward(self, batch: list[Problem]) -> torch.Tensor:
        memory_BLD, memory_mask_BL, slots_BSD, slot_mask_BS = self.encode(batch)
        start, V = self.decoder.symbol_ids[START], len(self.decoder.symbols)
        T = max(len(p.equation) for p in batch)
        targets_BT = torch.full((len(batch), T), IGNORE, device=self.device)
        for b, problem in enumerate(batch):
            targets_BT[b, :len(problem.equation)] = torch.tensor(self.decoder.ids(problem.equation))
        inputs_BT = torch.cat([torch.full_like(targets_BT[:, :1], start), targets_BT[:, :-1]], dim=1)
        inputs_BT = inputs_BT.masked_fill(inputs_BT == IGNORE, start)
        lost_slot_BT = (targets_BT >= V) & ~torch.gather(slot_mask_BS, 1, (targets_BT - V).clamp(min=0))
        logits_BTO = self.decoder(inputs_BT, memory_BLD, memory_mask_BL, slots_BSD, slot_mask_BS)
        loss = F.cross_entropy(logits_BTO.flatten(0, 1).float(), targets_BT.masked_fill(lost_slot_BT, IGNORE).flatten(),
                               ignore_index=IGNORE)
        return loss + self.aux_loss()

    def new_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.decoder.parameters())

    @torch.no_grad()
    def evaluate(self, examples: list[Problem], batch_size: int = 64) -> dict[str, float]:
        was_training = self.training
        self.eval()
        equations = []
        for start in range(0, len(examples), batch_size):
            equations += self.decoder.generate(*self.encode(examples[start:start + batch_size]))
        self.train(was_training)
        solved, unparseable = solve_counts(equations, examples)
        return {"solve_rate": solved / len(examples), "unparseable_fraction": unparseable / len(examples)}

    def save(self, out: Path) -> None:
        super().save(out)
        save_decoder(self.decoder, out)


def save_decoder(decoder: EquationDecoder, out: Path) -> None:
    """``equation_decoder.json`` (config and symbols) and ``equation_decoder.safetensors``, atomically."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / DECODER_CONFIG, json.dumps({"config": asdict(decoder.config), "symbols": decoder.symbols[1:]},
                                                  indent=2))
    with atomic_output(out / DECODER_WEIGHTS) as tmp:
        save_file({name: t.contiguous() for name, t in decoder.state_dict().items()}, str(tmp))


def load_decoder(directory: Path) -> EquationDecoder:
    """The decoder :func:`save_decoder` wrote, with this task's grammar."""
    from safetensors.torch import load_file

    saved = json.loads((directory / DECODER_CONFIG).read_text())
    decoder = EquationDecoder(DecoderConfig(**saved["config"]), saved["symbols"], GRAMMAR)
    decoder.load_state_dict(load_file(directory / DECODER_WEIGHTS))
    return decoder


class MathWordProblems(Task):
    """A cross-validated benchmark: ``folder/fold0..fold4/{train,dev}.csv`` under --data."""

    metric = "solve_rate"
    folder: str

    def splits(self, data_dir: str | None) -> list[Split]:
        root = mwp_dir(data_dir, self.folder)
        return [Split(fold, **read_split(root / fold)) for fold in FOLDS]

    def build(self, model_dir: Path, split: Split, max_length: int) -> EquationSolver:
        solver = EquationSolver(model_dir, max_length, symbols_of(split.train))
        longest, max_tokens = max(split.train, key=lambda p: len(p.equation)), solver.decoder.config.max_tokens
        if len(longest.equation) > max_tokens:
            raise ValueError(f"the training equation {' '.join(longest.equation)!r} has {len(longest.equation)} "
                             f"tokens, more than the {max_tokens} the decoder writes: drop it from train.csv")
        return solver


class ASDivA(MathWordProblems):
    name = "asdiv-a"
    folder = "cv_asdiv-a"


class MAWPS(MathWordProblems):
    name = "mawps"
    folder = "cv_mawps"


class SVAMP(MathWordProblems):
    """Trained on MAWPS + ASDiv-A, tested on SVAMP's 1,000 problems: one split, "svamp"."""

    name = "svamp"
    folder = "mawps-asdiv-a_svamp"

    def splits(self, data_dir: str | None) -> list[Split]:
        return [Split("svamp", **read_split(mwp_dir(data_dir, self.folder)))]
